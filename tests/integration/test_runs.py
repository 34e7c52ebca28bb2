"""A representative set of jobs runs a few steps in-process; a CPU run is repeatable; the shipped
tiny teacher really beats chance on the validation split."""

from __future__ import annotations

import math

import pytest
from conftest import compose

from firstsight.config.specs import model_spec
from firstsight.suite.dispatch import run_task


def _run(tmp_path, overrides):
    cfg = compose(
        [
            "train.max_steps=3",
            "train.throughput_warmup_steps=1",
            "train.progress_bar=false",
            "train.save_checkpoint=false",
            "data.validation_size=16",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *overrides,
        ]
    )
    return run_task(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        ["distill_loss=forward_kl", "precision=fp32"],
        ["distill_loss=reverse_kl", "precision=bf16", "hardware.grad_accum_steps=2", "hardware.batch_size=2"],
        ["distill_loss=jsd", "precision=nf4"],
        ["distill_loss=forward_kl", "precision=int8", "distill_loss.alpha=1.0", "distill_loss.temperature=4"],
        ["distill_loss=skew_reverse_kl"],
    ],
    ids=["forward_kl-fp32", "reverse_kl-bf16-accum2", "jsd-nf4", "forward_kl-int8-alpha1", "skew_reverse_kl"],
)
def test_representative_jobs_run(cache_dir, tmp_path, overrides):
    result = _run(tmp_path, overrides)
    for name in (
        "train/loss",
        "train/kd_loss",
        "train/ce_loss",
        "perf/throughput_samples_per_s",
        "perf/throughput_tokens_per_s",
        "perf/peak_rss_gb",
        "eval/teacher_accuracy",
    ):
        assert math.isfinite(result[name]), name
    assert result["train/kd_loss"] > 0
    assert result["perf/peak_rss_gb"] > 0.1  # a real process footprint, in GB
    assert "perf/peak_vram_gb" not in result  # no VRAM on a CPU
    # the total is the documented mix of its terms (last step; T and alpha from the config)
    cfg = compose(overrides)
    t, alpha = cfg.distill_loss.temperature, cfg.distill_loss.alpha
    expected = alpha * t * t * result["train/kd_loss"] + (1 - alpha) * result["train/ce_loss"]
    assert result["train/loss"] == pytest.approx(expected, rel=1e-4)


def test_quantized_teacher_is_smaller(cache_dir, tmp_path):
    fp32 = _run(tmp_path, ["precision=fp32", "train.eval_at_end=false"])
    int8 = _run(tmp_path, ["precision=int8", "train.eval_at_end=false"])
    assert int8["model/teacher_weights_gb"] < 0.6 * fp32["model/teacher_weights_gb"]


def test_a_cpu_run_is_repeatable(cache_dir, tmp_path):
    first = _run(tmp_path, ["seed=3", "train.eval_at_end=false"])
    second = _run(tmp_path, ["seed=3", "train.eval_at_end=false"])
    other = _run(tmp_path, ["seed=4", "train.eval_at_end=false"])
    assert first["train/loss"] == second["train/loss"]
    assert first["train/kd_loss"] == second["train/kd_loss"]
    assert first["train/loss"] != other["train/loss"]


def test_a_teacher_for_other_settings_is_trained_on_first_use_and_cached(cache_dir, tmp_path):
    overrides = [
        "model.teacher.tiny.pretrain_steps=2",
        "model.teacher.tiny.pretrain_batch_size=4",
        "data.train_size=16",
        "train.eval_at_end=false",
    ]
    _run(tmp_path, overrides)
    built = sorted(cache_dir.glob("tiny-teacher-*/firstsight_complete.json"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime
    _run(tmp_path, overrides)  # second time: loaded from the cache, not rebuilt
    assert built[0].stat().st_mtime == mtime
    assert not list(cache_dir.glob("tiny-teacher-*.tmp-*"))  # no half-written leftovers


def test_shipped_tiny_teacher_beats_chance_clearly(cache_dir):
    """Measured here, not read from the file: teacher-forced exact match on the validation split."""
    import torch

    from firstsight.data.batching import QACollator, in_order
    from firstsight.data.synthetic import SyntheticEgoQA
    from firstsight.models.loading import load_model, load_processor
    from firstsight.models.pretrain import model_info

    cfg = compose()
    processor = load_processor(cfg.model, cfg.cache_dir)
    teacher = load_model(model_spec(cfg), "teacher", processor, "cpu", frozen=True)
    assert "assets" in teacher.origin  # the shipped one, not a freshly trained one
    from firstsight.training.loop import answer_accuracy

    size = model_info(teacher.origin)["validation_size"]  # the split its pre-training was checked on
    validation = SyntheticEgoQA("validation", size=size, seed=cfg.seed)
    accuracy = answer_accuracy(teacher.model, in_order(validation, QACollator(processor), 32), "cpu", torch.float32)
    chance = validation.chance_accuracy()
    assert accuracy > chance + 0.15, (accuracy, chance)
    assert accuracy == pytest.approx(model_info(teacher.origin)["validation_accuracy"], abs=0.02)


@pytest.mark.parametrize("target", ["student", "teacher"])
def test_profile_measures_the_model_under_test(cache_dir, tmp_path, target):
    result = _run(
        tmp_path,
        [
            "task=profile",
            f"task.target={target}",
            "task.new_tokens=4",
            "task.warmup_queries=1",
            "task.latency_queries=3",
            "task.throughput_batch_size=2",
            "task.throughput_batches=2",
        ],
    )
    assert 0 < result["infer/latency_p50_s"] <= result["infer/latency_p90_s"]
    assert result["infer/throughput_tokens_per_s"] == pytest.approx(4 * result["infer/throughput_qps"])
    assert result["infer/load_time_s"] > 0 and result["perf/peak_rss_gb"] > 0.1
    size = {"student": 0.0003228, "teacher": 0.001319}[target]  # tiny params, billions
    assert result["model/params_b"] == pytest.approx(size, rel=0.01)


def test_a_distilled_checkpoint_loads_as_a_local_model(cache_dir, tmp_path, monkeypatch):
    """What distill writes is a stock save_pretrained directory: profile it by path."""
    monkeypatch.chdir(tmp_path)  # outside Hydra the job's output directory is the working directory
    _run(tmp_path, ["train.save_checkpoint=true", "train.eval_at_end=false"])
    checkpoint = tmp_path / "checkpoints" / "student"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "tokenizer.json").is_file()
    assert not list((tmp_path / "checkpoints").glob("*.tmp-*"))
    result = _run(
        tmp_path,
        [
            "task=profile",
            f"model.student.source={checkpoint}",
            "model.student.weights=pretrained",
            "task.new_tokens=2",
            "task.latency_queries=2",
            "task.throughput_batches=1",
        ],
    )
    assert result["model/params_b"] == pytest.approx(0.0003228, rel=0.01)


def test_the_no_kd_control_trains_on_cross_entropy_alone(cache_dir, tmp_path):
    result = _run(tmp_path, ["distill_loss=none"])
    assert result["train/kd_loss"] == 0.0
    assert result["train/loss"] == pytest.approx(result["train/ce_loss"], rel=1e-6)


def test_no_kd_with_a_kd_weight_is_refused():
    from firstsight.core.errors import ConfigError
    from firstsight.suite.validate import validate

    with pytest.raises(ConfigError, match="alpha must be 0"):
        validate(compose(["distill_loss=none", "distill_loss.alpha=0.5"]))
