"""Teacher-logit cache: the sparse (top-k + tail) loss against float64 references, the cache key,
build then hit without a teacher pass, stale/corrupt caches refused, and miss → hit from the CLI."""

from __future__ import annotations

import pytest
from conftest import compose, default_store_runs

# tiny tensors: extra OpenMP threads only wait for each other on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the sparse loss


BASE = [
    "model.teacher.weights=random",
    "data.train_size=16",
    "data.validation_size=8",
    "hardware.batch_size=4",
    "train.max_steps=3",
    "train.throughput_warmup_steps=1",
    "train.progress_bar=false",
    "train.save_checkpoint=false",
    "teacher_cache.enabled=true",
]


class _Tracker:
    run_id = None

    def __init__(self):
        self.tags, self.metrics = {}, {}

    def log_metrics(self, metrics, step=0):
        self.metrics.update(metrics)

    def set_tags(self, tags):
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_text(self, *args): ...
    def log_artifacts(self, *args): ...
    def flush(self): ...


@pytest.fixture(scope="module")
def built(cache_dir, tmp_path_factory):
    """Two in-process runs on one cache: the first builds it, the second hits. Teacher loads and
    teacher forward passes are counted."""
    from firstsight.models import loading as models
    from firstsight.tasks.distill import distill

    root = tmp_path_factory.mktemp("teacher-logits")
    cfg = compose([*BASE, f"teacher_cache.dir={root}", "teacher_cache.shard_size=5", "teacher_cache.top_k=16"])
    calls = {"loads": 0, "forwards": 0}
    original = models.load_model

    def counting_load(cfg, role, *args, **kwargs):
        loaded = original(cfg, role, *args, **kwargs)
        if role == "teacher":
            calls["loads"] += 1
            loaded.model.register_forward_hook(lambda *_: calls.__setitem__("forwards", calls["forwards"] + 1))
        return loaded

    models.load_model = counting_load
    try:
        runs = []
        for _ in range(2):
            tracker = _Tracker()
            before = dict(calls)
            result = distill(cfg, tracker)
            runs.append((tracker, result, {k: calls[k] - before[k] for k in calls}))
    finally:
        models.load_model = original
    return cfg, root, runs


def test_cli_miss_then_hit_in_mlflow(run_cli, tmp_path):
    args = [*BASE, "teacher_cache.top_k=12", "seed=7", "train.eval_at_end=false"]  # a key no other test builds
    for _ in range(2):
        done = run_cli(*args)
        assert done.returncode == 0, done.stderr[-3000:]
    runs = sorted(default_store_runs(tmp_path), key=lambda r: r.info.start_time)
    assert [r.data.tags["firstsight.teacher_cache"] for r in runs] == ["built", "hit"]
    assert [r.data.metrics["teacher_cache/hits"] for r in runs] == [0, 1]
    assert [r.data.metrics["teacher_cache/misses"] for r in runs] == [1, 0]
    assert runs[0].data.tags["firstsight.teacher_cache_path"] == runs[1].data.tags["firstsight.teacher_cache_path"]
    assert runs[1].data.params["teacher_cache.top_k"] == "12"
