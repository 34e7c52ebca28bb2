"""The optimisation loop (firstsight.training.loop.optimize) on tiny models whose answers are known:
gradient accumulation gives what one large batch gives, the learning-rate schedule and the `lr`
it logs, and gradient clipping (`grad_norm` is the norm before clipping; the update is the clipped
gradient's). One short in-process distillation checks the same through task=distill."""

from __future__ import annotations

import pytest

# tiny tensors: extra OpenMP threads only wait for each other on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHORT_DISTILL = [
    "train.max_steps=2",
    "train.eval_at_end=false",
    "train.save_checkpoint=false",
    "train.progress_bar=false",
    "train.throughput_warmup_steps=1",
    "hardware.num_threads=1",
]


class _StepTracker:
    """What distill() logs, per step (no MLflow)."""

    run_id = None

    def __init__(self):
        self.steps = {}

    def log_metrics(self, metrics, step=None):
        if step is not None:
            self.steps.setdefault(step, {}).update(metrics)

    def set_tags(self, tags): ...
    def log_text(self, *args): ...
    def log_artifacts(self, *args): ...
    def flush(self): ...


def test_a_distill_run_with_accumulation_logs_what_one_large_batch_logs(cache_dir, tmp_path, monkeypatch):
    """task=distill with hardware.batch_size=2 hardware.grad_accum_steps=2 against batch_size=4: the
    same samples in each step, so the same per-step train/* figures up to float rounding (the
    micro-batches are padded to their own longest prompt), and train/lr follows the warm-up."""
    from conftest import compose

    from firstsight.tasks.distill import distill

    monkeypatch.chdir(tmp_path)  # train_history.json
    steps = {}
    for name, overrides in (
        ("accumulated", ["hardware.batch_size=2", "hardware.grad_accum_steps=2"]),
        ("whole", ["hardware.batch_size=4", "hardware.grad_accum_steps=1"]),
    ):
        tracker = _StepTracker()
        distill(compose([*SHORT_DISTILL, *overrides]), tracker)
        steps[name] = tracker.steps
    cfg = compose(SHORT_DISTILL)
    assert cfg.train.warmup_steps == 4 and cfg.train.lr == 1e-3  # both steps in the linear warm-up
    for step in (1, 2):
        a, w = steps["accumulated"][step], steps["whole"][step]
        for key in ("train/loss", "train/kd_loss", "train/ce_loss", "train/grad_norm"):
            assert a[key] == pytest.approx(w[key], rel=1e-5), (step, key, a[key], w[key])
        assert a["train/lr"] == w["train/lr"] == pytest.approx(1e-3 * step / 4, rel=1e-12)


# ----------------------------------------------------------------------------- learning-rate schedule
