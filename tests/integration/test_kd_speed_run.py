"""A distill job with the KD step's speed settings, in process; what they are and the equality tests of
each against the naive path: unit/test_kd_speed.py."""

from __future__ import annotations

import math

import pytest
from conftest import compose

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_distill_job_with_adamw_8bit_starts_as_adamw_and_trains(cache_dir):
    """Same first loss as torch's AdamW (the forward before any update), then finite losses."""

    from firstsight.tasks.distill import distill

    class Tracker:
        run_id = None

        def __init__(self):
            self.losses = {}

        def log_metrics(self, metrics, step=0):
            if "train/loss" in metrics:
                self.losses[step] = metrics["train/loss"]

        def set_tags(self, tags): ...
        def log_text(self, *args): ...
        def log_artifacts(self, *args): ...
        def flush(self): ...

    losses = {}
    for name in ("adamw", "adamw_8bit"):
        cfg = compose(
            [
                "model.teacher.weights=random",
                "data.train_size=12",
                "hardware.batch_size=4",
                "train.max_steps=3",
                "train.throughput_warmup_steps=1",
                "train.progress_bar=false",
                "train.eval_at_end=false",
                "train.save_checkpoint=false",
                "train.log_every_n_steps=1",
                f"train.optimizer={name}",
            ]
        )
        tracker = Tracker()
        distill(cfg, tracker)
        losses[name] = [tracker.losses[step] for step in (1, 2, 3)]
    assert losses["adamw_8bit"][0] == losses["adamw"][0]
    assert all(math.isfinite(loss) for loss in losses["adamw_8bit"])
    assert losses["adamw_8bit"][-1] != losses["adamw"][-1]  # another update rule
