"""A teacher of another architecture (`model=tiny_llava`: a tiny LLaVA-OneVision) runs the real path
in process: distill with the live teacher and with its cache (which hits on the second run and
gives the live step's loss), evaluate answering through the teacher's own processor, and the bad
inputs refused before any run exists."""

from __future__ import annotations

import json
import math

import pytest
from conftest import compose

from firstsight.suite.dispatch import run_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the tiny LLaVA-OneVision with random weights: the path under test, without its pre-training
LLAVA = ["model=tiny_llava", "model.teacher.weights=random"]


def _cfg(tmp_path, overrides):
    return compose(
        [
            "train.max_steps=2",
            "train.throughput_warmup_steps=0",
            "train.progress_bar=false",
            "train.save_checkpoint=false",
            "data.validation_size=8",
            "data.train_size=16",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *LLAVA,
            *overrides,
        ]
    )


@pytest.mark.parametrize("overrides", [["distill_loss=jsd"], ["precision=nf4"]], ids=["jsd", "nf4-teacher"])
def test_distill_from_a_llava_onevision_teacher(cache_dir, tmp_path, monkeypatch, overrides):
    """Every loss and figure finite; the teacher answers the validation questions through its own
    processor (its labels, its <image> tokens), the student through the student's; a 4-bit teacher
    is also measured at full precision, through its own processor."""
    import firstsight.kd.paired as paired

    seen = []
    targets = paired.teacher_answer_targets

    def spy(model, batch, vocab, temperature):
        seen.append((type(model).__name__, batch["input_ids"].shape, vocab))
        return targets(model, batch, vocab, temperature)

    monkeypatch.setattr(paired, "teacher_answer_targets", spy)
    result = run_task(_cfg(tmp_path, overrides))
    for name in ("train/loss", "train/kd_loss", "train/ce_loss", "eval/teacher_accuracy", "eval/student_accuracy"):
        assert math.isfinite(result[name]), name
    assert result["train/kd_loss"] > 0
    assert seen and {name for name, _, _ in seen} == {"LlavaOnevisionForConditionalGeneration"}
    assert {vocab for _, _, vocab in seen} == {result_vocab(cache_dir)}  # cut to the student's rows
    if "precision=nf4" in overrides:
        assert math.isfinite(result["eval/full_precision_teacher_accuracy"])


def result_vocab(cache_dir) -> int:
    """The tiny student's output rows (its vocabulary padded to a multiple of 64)."""
    from firstsight.models.tiny import tiny_processor

    return -(-len(tiny_processor(cache_dir).tokenizer) // 64) * 64


def test_the_cache_of_a_llava_teacher_gives_the_live_loss(cache_dir, tmp_path):
    """teacher_cache with the whole distribution (top_k null): built from the teacher's own inputs,
    hit on the second run, and the first step's KD loss is the live teacher's."""
    live = run_task(_cfg(tmp_path / "live", ["train.max_steps=1"]))
    cache = [
        "train.max_steps=1",
        "teacher_cache.enabled=true",
        "teacher_cache.top_k=null",
        f"teacher_cache.dir={tmp_path / 'cache'}",
    ]
    built = run_task(_cfg(tmp_path / "built", cache))
    hit = run_task(_cfg(tmp_path / "hit", cache))
    assert built["teacher_cache/misses"] == 1 and hit["teacher_cache/hits"] == 1
    assert built["train/kd_loss"] == pytest.approx(live["train/kd_loss"], rel=1e-4)
    assert hit["train/kd_loss"] == built["train/kd_loss"]
    [manifest] = (tmp_path / "cache").glob("topk-*/manifest.json")
    assert "teacher_processor" in json.loads(manifest.read_text())["key_inputs"]


def test_evaluate_a_llava_teacher(cache_dir, tmp_path):
    """The shipped tiny LLaVA-OneVision answers 32 questions through its own processor (generate):
    its interval lies above chance, which a teacher fed the student's inputs could not reach."""
    overrides = [
        "task=evaluate",
        "task.max_new_tokens=4",
        "model.teacher.weights=pretrained",
        "data.validation_size=32",
    ]
    result = run_task(_cfg(tmp_path, overrides))
    assert result["eval/teacher_accuracy_ci_low"] > result["eval/chance_accuracy"]
    assert math.isfinite(result["eval/student_accuracy"])


def _refused(tmp_path, monkeypatch, capsys, overrides):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_task(_cfg(tmp_path, overrides))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    [message] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and not (tmp_path / "mlflow.db").exists()
    return message


def test_the_hidden_state_term_is_refused(cache_dir, tmp_path, monkeypatch, capsys):
    message = _refused(tmp_path, monkeypatch, capsys, ["distill_loss.hidden_weight=0.5"])
    assert "distill_loss.hidden_weight=0.5" in message and "set distill_loss.hidden_weight=0" in message


def test_a_teacher_class_the_suite_cannot_pair_is_refused(cache_dir, tmp_path, monkeypatch, capsys):
    teacher = tmp_path / "llama"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (teacher / "model.safetensors").write_bytes(b"x")
    message = _refused(
        tmp_path, monkeypatch, capsys, [f"model.teacher.source={teacher}", "model.teacher.weights=pretrained"]
    )
    assert "is a 'llama' model" in message and "qwen2_vl or llava_onevision" in message


def test_tokenizers_that_differ_on_the_answers_are_refused(cache_dir, tmp_path, monkeypatch, capsys):
    import firstsight.models.loading as loading

    real = loading.tiny_llava_processor

    def shifted(*args, **kwargs):  # the teacher's tokenizer with every id moved by one
        processor = real(*args, **kwargs)
        vocab = {t: i + 1 for t, i in processor.tokenizer.get_vocab().items()}
        processor.tokenizer.get_vocab = lambda: vocab
        return processor

    monkeypatch.setattr(loading, "tiny_llava_processor", shifted)
    message = _refused(tmp_path, monkeypatch, capsys, [])
    assert "tokenize answers differently" in message and "'tiny'" in message


def test_a_frame_one_processor_refuses_is_named_before_the_run(cache_dir, tmp_path, monkeypatch, capsys):
    """A teacher's image processor that refuses frames under 64 pixels a side (as a processor with a
    minimum size does): the job stops with the sample, the frame's size and the processor, before
    any model or run; the frames both take pass."""
    from PIL import Image

    import firstsight.models.loading as loading

    real = loading.tiny_llava_processor

    def with_a_minimum(*args, **kwargs):
        processor = real(*args, **kwargs)
        take = processor.image_processor.__call__

        def image_processor(images, **options):
            if min(min(image.size) for image in images) < 64:
                raise ValueError("height and width must be at least 64 pixels")
            return take(images, **options)

        processor.image_processor = image_processor
        return processor

    monkeypatch.setattr(loading, "tiny_llava_processor", with_a_minimum)
    (tmp_path / "media").mkdir()
    Image.new("RGB", (200, 200)).save(tmp_path / "media" / "large.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "media" / "small.png")  # fitted to 56 x 56 (data.min_pixels)
    record = lambda image: {  # noqa: E731
        "image": f"media/{image}",
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "red"}],
    }
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(record(name)) for name in ("large.png", "small.png")) + "\n")
    files = ["data=conversations", f"data.train_file={data}", f"data.validation_file={data}"]
    message = _refused(tmp_path, monkeypatch, capsys, files)
    assert f"{data}:2: a frame of 56x56 pixels" in message
    assert "refused by the teacher's processor" in message and "at least 64 pixels" in message


def test_the_shipped_tiny_llava_teacher_beats_chance_clearly(cache_dir, tmp_path):
    """model=tiny_llava as shipped (pre-trained, not trained again here): on 64 validation questions
    its accuracy's 95 % interval lies above chance, and the run says which teacher taught."""
    import mlflow

    cfg = _cfg(tmp_path, ["model.teacher.weights=pretrained", "train.max_steps=1", "data.validation_size=64"])
    result = run_task(cfg)
    assert result["eval/teacher_accuracy_ci_low"] > result["eval/chance_accuracy"] + 0.2
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    try:
        [run] = mlflow.search_runs(experiment_names=[cfg.tracking.experiment_name], output_format="list")
    finally:
        mlflow.set_tracking_uri(None)
    assert run.data.tags["firstsight.teacher_architecture"] == "llava_onevision"
    assert "tiny-teacher-8398779c22b745ea" in run.data.tags["firstsight.teacher"]  # the shipped directory
