"""Teacher-logit cache: the sparse (top-k + tail) loss against float64 references, the cache key,
build then hit without a teacher pass, stale/corrupt caches refused, and miss → hit from the CLI."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import compose

from firstsight.config.specs import teacher_cache_spec
from firstsight.core.errors import FirstSightError

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


def test_build_then_hit_without_the_teacher(built):
    cfg, root, ((first, first_result, first_calls), (second, second_result, second_calls)) = built
    assert first.tags["firstsight.teacher_cache"] == "built"
    assert first.metrics["teacher_cache/misses"] == 1 and first.metrics["teacher_cache/hits"] == 0
    assert first_calls["loads"] == 1 and first_calls["forwards"] >= 16 / 4  # one pass over the train split
    assert second.tags["firstsight.teacher_cache"] == "hit"
    assert second.metrics["teacher_cache/hits"] == 1 and second.metrics["teacher_cache/misses"] == 0
    assert second_calls == {"loads": 0, "forwards": 0}  # a hit never loads or runs the teacher
    assert second_result["model/teacher_load_time_s"] == 0
    assert second.tags["firstsight.teacher_cache_path"] == first.tags["firstsight.teacher_cache_path"]
    # the same training either way, and the teacher accuracy recorded at build time
    assert second_result["train/loss"] == first_result["train/loss"]
    assert second_result["eval/teacher_accuracy"] == first_result["eval/teacher_accuracy"]
    assert "recorded" in second.tags["firstsight.teacher_accuracy_source"]
    manifest = json.loads((root / f"topk-{first.tags['firstsight.teacher_cache_key']}" / "manifest.json").read_text())
    assert manifest["num_samples"] == 16 and len(manifest["shards"]) == 4 and manifest["top_k"] == 16
    assert math.isfinite(second_result["train/kd_loss"]) and second_result["train/kd_loss"] > 0


def _copy(built, tmp_path):
    from firstsight.kd.teacher_cache import load_verified

    cfg, root, runs = built
    key = runs[0][0].tags["firstsight.teacher_cache_key"]
    path = tmp_path / f"topk-{key}"
    shutil.copytree(root / f"topk-{key}", path)
    return path, key, lambda p=path, k=key: load_verified(p, k, 16, 448, 16)


def test_an_intact_copy_opens(built, tmp_path):
    path, key, open_it = _copy(built, tmp_path)
    manifest, arrays = open_it()
    assert arrays["token_ids"].shape == (manifest["num_rows"], 16)
    assert arrays["offsets"].shape == (17,)


@pytest.mark.parametrize(
    "damage", ["flip a byte", "truncate", "delete", "edit manifest", "edit manifest and marker", "wrong directory"]
)
def test_corrupt_or_stale_caches_are_refused(built, tmp_path, damage):
    path, key, open_it = _copy(built, tmp_path)
    shard = path / "shard-00001.safetensors"
    manifest = path / "manifest.json"
    if damage == "flip a byte":
        blob = bytearray(shard.read_bytes())
        blob[-3] ^= 0x01
        shard.write_bytes(bytes(blob))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-8])
    elif damage == "delete":
        shard.unlink()
    elif damage.startswith("edit manifest"):
        data = json.loads(manifest.read_text())
        data["key_inputs"]["temperature"] = 9.0
        manifest.write_text(json.dumps(data))
        if damage.endswith("marker"):  # its recorded hash updated too: the key inputs no longer hash to the key
            import hashlib

            marker = path / "firstsight_complete.json"
            info = json.loads(marker.read_text())
            info["manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
            marker.write_text(json.dumps(info))
    else:  # a cache moved under another key's name
        other = tmp_path / "topk-0000000000000000"
        path.rename(other)
        from firstsight.kd.teacher_cache import load_verified

        open_it = lambda: load_verified(other, "0000000000000000", 16, 448, 16)  # noqa: E731
    with pytest.raises(FirstSightError, match="stale or corrupt.*delete"):
        open_it()


def test_a_batch_that_disagrees_with_the_cache_is_refused(built, cache_dir):
    from firstsight.data import load_split
    from firstsight.data.batching import QACollator
    from firstsight.kd.teacher_cache import TeacherCache, _Context, load_verified
    from firstsight.models.tiny import tiny_processor

    cfg, root, runs = built
    processor = tiny_processor(cache_dir)
    train = load_split(cfg.data, "train", cfg.seed)
    ctx = _Context(teacher_cache_spec(cfg), processor, "cpu", train, 448, 16)
    manifest, arrays = load_verified(ctx.path, ctx.key, 16, 448, 16)
    cache = TeacherCache(ctx, _Tracker(), manifest, arrays, "hit", None, {})
    batch = QACollator(processor, with_index=True)([train[i] for i in (3, 7)])
    targets = cache.targets(batch)
    assert targets.num_rows == int((batch["labels"][:, 1:] != -100).sum())
    relabelled = dict(batch, labels=batch["labels"].clone())
    answer = relabelled["labels"] != -100
    relabelled["labels"][answer] = (relabelled["labels"][answer] + 1) % 448
    with pytest.raises(FirstSightError, match="answer tokens of train sample 3"):
        cache.targets(relabelled)
    with pytest.raises(FirstSightError, match="stale or corrupt"):  # rows looked up for the wrong samples
        cache.targets(dict(batch, sample_index=torch.tensor([7, 3])))


def test_teacher_accuracy_without_a_record_loads_the_teacher_once(built, cache_dir):
    from firstsight.data import load_split
    from firstsight.kd.teacher_cache import TeacherCache, _Context
    from firstsight.models.tiny import tiny_processor

    cfg, root, runs = built
    cfg = cfg.copy()
    cfg.data.validation_size = 5  # a validation split the build did not measure
    ctx = _Context(
        teacher_cache_spec(cfg), tiny_processor(cache_dir), "cpu", load_split(cfg.data, "train", cfg.seed), 448, 16
    )
    tracker = _Tracker()
    cache = TeacherCache(
        ctx,
        tracker,
        {},
        {name: torch.zeros(1) for name in ("token_ids", "logprobs", "tail_logprob", "labels", "offsets")},
        "hit",
        None,
        {},
    )
    validation = load_split(cfg.data, "validation", cfg.seed)
    measured, blind = cache.teacher_outcomes(validation)
    assert len(measured) == len(blind) == 5
    assert tracker.tags["firstsight.teacher_accuracy_source"] == "teacher loaded for the evaluation"
    assert cache.teacher_outcomes(validation) == (measured, blind)
    assert cache.teacher_outcomes(validation, blind=False) == (measured, None)
    assert "recorded" in tracker.tags["firstsight.teacher_accuracy_source"]


def test_top_k_larger_than_the_student_vocabulary_stops(cache_dir, tmp_path):
    from firstsight.tasks.distill import distill

    cfg = compose([*BASE, f"teacher_cache.dir={tmp_path}", "teacher_cache.top_k=100000"])
    with pytest.raises(FirstSightError, match="exceeds the student's vocabulary"):
        distill(cfg, _Tracker())


# ----------------------------------------------------------------------------- the CLI


def test_top_k_null_keeps_every_id_and_trains_as_the_live_teacher(cache_dir, tmp_path):
    """teacher_cache.top_k=null: k = the student's vocabulary, no tail bucket, so the losses of a
    run from the cache are the live teacher's (fp32 on the CPU: equal to rounding). Its ids are the
    vocabulary in order, so opening it drops them."""
    from firstsight.kd.teacher_cache import load_verified
    from firstsight.tasks.distill import distill

    live = distill(compose([*BASE, "teacher_cache.enabled=false"]), _Tracker())
    tracker = _Tracker()
    cached = distill(compose([*BASE, f"teacher_cache.dir={tmp_path}", "teacher_cache.top_k=null"]), tracker)
    manifest = json.loads(
        (tmp_path / f"topk-{tracker.tags['firstsight.teacher_cache_key']}" / "manifest.json").read_text()
    )
    assert manifest["top_k"] == manifest["student_vocab_rows"] == 448
    path = tmp_path / f"topk-{manifest['key']}"
    _, arrays = load_verified(path, manifest["key"], manifest["num_samples"], 448, 448)
    assert arrays["token_ids"] is None and arrays["logprobs"].shape == (manifest["num_rows"], 448)  # ids dropped
    for name in ("train/loss", "train/kd_loss", "train/ce_loss"):
        assert cached[name] == pytest.approx(live[name], rel=1e-5, abs=1e-7), name
    assert cached["train/kd_loss"] > 0


def test_a_cache_too_large_for_host_memory_stops_the_teacher_pass_early(cache_dir, tmp_path, monkeypatch):
    """Training holds the whole cache in host memory: a pass whose projected cache exceeds what is
    available stops at its first batch, naming the sizes and the setting to change, and leaves no
    cache behind."""
    from firstsight.core import perf
    from firstsight.tasks.distill import distill

    # the tiny pair's 16 samples of a few answer tokens x (4 * 448 + 8) bytes: ~0.1 MB
    monkeypatch.setattr(perf, "available_host_memory_bytes", lambda: 10_000)
    root = tmp_path / "caches"
    with pytest.raises(
        FirstSightError,
        match=r"teacher_cache.top_k=null \(every id\): the cache of the 16 train "
        r"samples would take ~0.\d\d MB of host memory",
    ) as err:
        distill(compose([*BASE, f"teacher_cache.dir={root}", "teacher_cache.top_k=null"]), _Tracker())
    assert "the 0.01 MB available" in str(err.value) and "data.train_size" in str(err.value)
    assert not list(root.glob("topk-*/manifest.json")) and not list(root.glob("*.tmp-*"))
    monkeypatch.setattr(perf, "available_host_memory_bytes", lambda: None)  # unknown: no check
    tracker = _Tracker()
    distill(compose([*BASE, f"teacher_cache.dir={root}", "teacher_cache.top_k=8"]), tracker)
    assert tracker.tags["firstsight.teacher_cache"] == "built"
