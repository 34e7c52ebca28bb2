"""The embedded default's student starts from a shipped pre-trained tiny student base: found, not
retrained; weaker than the shipped teacher and above chance; the teacher keeps its shipped name."""

from __future__ import annotations

import pytest
from conftest import compose

from firstsight.config.specs import model_spec

# The shipped teacher's directory: its key must never move (a new key would retrain it on first use).
TEACHER = "tiny-teacher-95aeb902855ef9c6"


@pytest.fixture(scope="module")
def processor(cache_dir):
    from firstsight.models.tiny import tiny_processor

    return tiny_processor(cache_dir)


def _fresh_cache(tmp_path):
    return [f"cache_dir={tmp_path / 'cache'}"]


def test_the_default_student_is_the_shipped_base_not_retrained(processor, tmp_path):
    from firstsight.core.files import SHIPPED
    from firstsight.models.pretrain import tiny_model_dir

    cfg = compose(_fresh_cache(tmp_path))
    assert cfg.model.student.source == "tiny" and cfg.model.student.weights.value == "pretrained"
    path = tiny_model_dir(model_spec(cfg), "student", processor)
    assert path.parent == SHIPPED and path.name.startswith("tiny-student-"), path
    assert (path / "model.safetensors").is_file()
    assert not (tmp_path / "cache").exists()  # nothing trained, nothing cached


def test_the_teacher_keeps_its_shipped_directory(processor, tmp_path):
    from firstsight.core.files import SHIPPED
    from firstsight.models.pretrain import tiny_model_dir

    cfg = compose(_fresh_cache(tmp_path))
    assert tiny_model_dir(model_spec(cfg), "teacher", processor) == SHIPPED / TEACHER
    assert not (tmp_path / "cache").exists()


def test_the_shipped_base_is_weaker_than_the_teacher_and_above_chance(processor, tmp_path):
    from firstsight.models.pretrain import RECIPES, model_info, tiny_model_dir

    cfg = compose(_fresh_cache(tmp_path))
    student = model_info(tiny_model_dir(model_spec(cfg), "student", processor))
    teacher = model_info(tiny_model_dir(model_spec(cfg), "teacher", processor))
    assert student["recipe"] == RECIPES["student"] and teacher["recipe"] == RECIPES["teacher"]
    assert student["steps"] == cfg.model.student.tiny.pretrain_steps
    assert student["train_size"] == cfg.model.student.tiny.pretrain_train_size
    chance = student["chance_accuracy"]
    # clear of chance and clearly below the teacher: distillation has room to lift it
    assert chance + 0.02 < student["validation_accuracy"] < teacher["validation_accuracy"] - 0.08, (student, teacher)


def test_the_shipped_base_is_small(processor, tmp_path):
    from firstsight.models.pretrain import tiny_model_dir

    path = tiny_model_dir(model_spec(compose(_fresh_cache(tmp_path))), "student", processor)
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 1.5e6, size  # bf16 weights of a 0.32 M-parameter model, and the processor's files


def test_the_recorded_accuracy_is_measured_again(processor, tmp_path):
    """Measured here, not read from the file: teacher-forced exact match on the validation split
    the base was checked on (its pre-training seed's)."""
    import torch

    from firstsight.data import synthetic_split
    from firstsight.data.batching import QACollator, in_order
    from firstsight.models.loading import load_model
    from firstsight.models.pretrain import model_info
    from firstsight.training.loop import answer_accuracy

    cfg = compose(_fresh_cache(tmp_path))
    student = load_model(model_spec(cfg), "student", processor, "cpu", frozen=True)
    assert "assets" in student.origin
    info = model_info(student.origin)
    checked = compose([*_fresh_cache(tmp_path), f"data.validation_size={info['validation_size']}"])
    validation = synthetic_split(checked.data, "validation", cfg.model.student.tiny.pretrain_seed)
    assert len(validation) == info["validation_size"]
    accuracy = answer_accuracy(student.model, in_order(validation, QACollator(processor), 32), "cpu", torch.float32)
    assert accuracy == pytest.approx(info["validation_accuracy"], abs=0.02)


def test_a_student_base_for_other_settings_is_trained_on_first_use_and_cached(processor, tmp_path):
    from firstsight.core.files import SHIPPED
    from firstsight.models.pretrain import model_info, tiny_model_dir

    cfg = compose(
        [
            *_fresh_cache(tmp_path),
            "model.student.tiny.pretrain_steps=2",
            "model.student.tiny.pretrain_batch_size=4",
            "model.student.tiny.pretrain_train_size=16",
            "data.validation_size=8",
            "train.progress_bar=false",
        ]
    )
    path = tiny_model_dir(model_spec(cfg), "student", processor)
    assert path.parent == tmp_path / "cache" and path.name.startswith("tiny-student-"), path
    info = model_info(path)
    assert (info["steps"], info["train_size"], info["validation_size"]) == (2, 16, 8)
    mtime = (path / "model.safetensors").stat().st_mtime
    assert tiny_model_dir(model_spec(cfg), "student", processor) == path  # second time: from the cache
    assert (path / "model.safetensors").stat().st_mtime == mtime
    assert not list((tmp_path / "cache").glob("tiny-teacher-*"))  # the teacher is the shipped one
    assert tiny_model_dir(model_spec(cfg), "teacher", processor) == SHIPPED / TEACHER


def test_the_base_key_follows_its_pretraining_split_not_the_runs(processor, tmp_path):
    """With their own pre-training split size the student base and the teacher do not depend on
    data.train_size (the distillation's transfer set): a run on fewer samples still uses both
    shipped models."""
    from firstsight.core.files import SHIPPED
    from firstsight.models.pretrain import tiny_model_dir

    for role in ("student", "teacher"):
        default = tiny_model_dir(model_spec(compose(_fresh_cache(tmp_path))), role, processor)
        assert (
            tiny_model_dir(model_spec(compose([*_fresh_cache(tmp_path), "data.train_size=16"])), role, processor)
            == default
        )
        assert default.parent == SHIPPED


def test_a_bad_pretraining_split_size_is_refused(processor, tmp_path):
    from firstsight.core.errors import ConfigError
    from firstsight.models.pretrain import tiny_model_dir

    cfg = compose([*_fresh_cache(tmp_path), "model.student.tiny.pretrain_train_size=0"])
    with pytest.raises(ConfigError, match="pretrain_train_size=0"):
        tiny_model_dir(model_spec(cfg), "student", processor)
    assert not (tmp_path / "cache").exists()
