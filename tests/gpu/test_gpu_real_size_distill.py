"""bf16 distillation at real size on a GPU: task=distill with the study's pair built at full size
with random weights (Qwen2-VL-7B teacher, Qwen2-VL-2B student; no download), hardware=gpu,
precision=bf16, two optimizer steps at batch 2, then the end-of-run evaluation on 4 validation
questions. In this process, with a tracker that keeps what the task logs (no MLflow store): the
losses, gradient norms and every figure it logs are finite, and the models are the real sizes."""

from __future__ import annotations

import math

import pytest
from conftest import compose
from gpu_support import GPU_MARKS, RecordingTracker, assert_finite, release_cuda

pytestmark = GPU_MARKS

OVERRIDES = [
    "task=distill",
    "model=qwen2vl_7b_2b",
    "model.teacher.weights=random",
    "model.student.weights=random",
    "hardware=gpu",
    "precision=bf16",
    "train.max_steps=2",
    "hardware.batch_size=2",
    "hardware.eval_batch_size=4",
    "hardware.dataloader_workers=0",
    "data.train_size=8",
    "data.validation_size=4",
    "train.throughput_warmup_steps=1",
    "train.log_every_n_steps=1",
    "train.save_checkpoint=false",
    "train.progress_bar=false",
    "tracking.enabled=false",
]


@pytest.fixture(autouse=True)
def _released():
    yield
    release_cuda()


def test_bf16_distillation_at_real_size_runs_two_finite_steps(cache_dir, tmp_path, monkeypatch):
    from firstsight.suite.validate import validate
    from firstsight.tasks.distill import distill

    monkeypatch.chdir(tmp_path)  # anything the job writes lands here
    cfg = compose(OVERRIDES)
    validate(cfg)
    tracker = RecordingTracker()
    result = distill(cfg, tracker)

    assert tracker.tags["firstsight.device"] == "cuda"
    assert result["model/params_b"] == pytest.approx(2.21, abs=0.05), "the student is not Qwen2-VL-2B's size"
    assert result["model/teacher_params_b"] == pytest.approx(8.29, abs=0.05), "the teacher is not Qwen2-VL-7B's size"

    steps = {step: m for step, m in tracker.steps.items() if "train/loss" in m}
    assert sorted(steps) == [1, 2], f"train/loss logged at steps {sorted(steps)}"
    for step, metrics in steps.items():
        assert_finite(metrics, f"step {step}")
        # random weights at init: near-uniform predictions over ~152k tokens, cross-entropy about ln(152k) = 11.9
        assert 8.0 < metrics["train/ce_loss"] < 16.0, f"step {step}: ce_loss {metrics['train/ce_loss']}"
        assert metrics["train/kd_loss"] >= 0.0 and metrics["train/loss"] > 0.0
        assert metrics["train/grad_norm"] > 0.0 and metrics["train/lr"] > 0.0
        assert metrics["perf/step_time_s"] > 0.0

    logged = tracker.metrics
    assert_finite(logged, "the run's logged metrics")
    assert_finite({k: v for k, v in result.items() if isinstance(v, float)}, "the run's result")
    assert 0 < logged["perf/peak_vram_gb"] < 80, f"peak {logged['perf/peak_vram_gb']} GB"
    assert logged["perf/throughput_tokens_per_s"] > 0
    assert logged["eval/questions"] == 4.0
    for name in ("eval/student_accuracy", "eval/teacher_accuracy", "eval/student_accuracy_before"):
        assert 0.0 <= logged[name] <= 1.0, f"{name} = {logged[name]}"
    assert math.isfinite(result["train/loss"]) and result["train/loss"] == steps[2]["train/loss"]
