"""Teacher-logit cache: the sparse (top-k + tail) loss against float64 references, the cache key,
build then hit without a teacher pass, stale/corrupt caches refused, and miss → hit from the CLI."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
from conftest import compose, default_store_runs

from firstsight.config.specs import model_spec, teacher_cache_spec
from firstsight.core.errors import FirstSightError
from firstsight.losses.kd import JSD, ForwardKL, NoKD, ReverseKL, SkewForwardKL, SkewReverseKL
from firstsight.losses.sparse import SparseTargets, topk_targets

# tiny tensors: extra OpenMP threads only wait for each other on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the sparse loss


def _batch(seed=0, vocab=13, teacher_vocab=16, batch=3, length=7):
    g = torch.Generator().manual_seed(seed)
    student = 3 * torch.randn(batch, length, vocab, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(batch, length, teacher_vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[torch.rand(batch, length, generator=g) > 0.6] = -100
    labels[0, -1] = 1
    return student, teacher, labels


def _sparse(teacher, labels, vocab, k, temperature):
    """What the cache stores for these answer tokens (teacher padding rows cut at `vocab`)."""
    rows = teacher[:, :-1][labels[:, 1:] != -100]
    return SparseTargets(*topk_targets(rows, vocab, k, temperature))


LOSSES = [
    ForwardKL(temperature=1.7, alpha=0.6, chunk_size=3),
    ReverseKL(temperature=0.8, alpha=0.6, chunk_size=3),
    JSD(temperature=1.7, alpha=0.6, beta=0.3, chunk_size=3),
    SkewForwardKL(temperature=1.0, alpha=0.6, skew=0.2, chunk_size=3),
    SkewReverseKL(temperature=2.0, alpha=0.6, skew=0.2, chunk_size=3),
    NoKD(temperature=1.0, alpha=0.0, chunk_size=3),
]


def _value_and_grad(loss_fn, student, target, labels):
    student = student.detach().clone().requires_grad_()
    out = loss_fn(student, target, labels, num_answer_tokens=int((labels[:, 1:] != -100).sum()) + 2)
    out.loss.backward()
    return out, student.grad


@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda f: type(f).__name__)
def test_sparse_loss_with_k_equal_to_the_vocabulary_is_the_full_loss(loss_fn):
    student, teacher, labels = _batch()
    full, full_grad = _value_and_grad(loss_fn, student, teacher, labels)
    targets = _sparse(teacher, labels, student.shape[-1], student.shape[-1], loss_fn.temperature)
    assert torch.isneginf(targets.tail_logprob).all()  # k = V: the tail is empty
    assert torch.equal(targets.token_ids, torch.arange(student.shape[-1]).expand_as(targets.token_ids))  # in order
    dense = SparseTargets(None, targets.logprobs, targets.tail_logprob)  # what a cache of every id hands over
    for given in (targets, dense):
        sparse, sparse_grad = _value_and_grad(loss_fn, student, given, labels)
        for name in ("loss", "kd_loss", "ce_loss"):
            torch.testing.assert_close(getattr(sparse, name), getattr(full, name), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sparse_grad, full_grad, rtol=1e-10, atol=1e-12)
        assert sparse.num_tokens == full.num_tokens


def _bucket_reference(kind, student, teacher, labels, vocab, k, temperature, beta=0.3):
    """Mean over answer tokens of the divergence between the (k+1)-bucket distributions, float64,
    token by token: buckets = the teacher's top-k ids, then 1 − their sum."""
    values = []
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if labels[b, i + 1] == -100:
                continue
            p = torch.softmax(teacher[b, i, :vocab] / temperature, -1)
            q = torch.softmax(student[b, i] / temperature, -1)
            ids = p.topk(k).indices
            pb = torch.cat([p[ids], (1 - p[ids].sum()).reshape(1)])
            qb = torch.cat([q[ids], (1 - q[ids].sum()).reshape(1)])
            kl = lambda a, c: (a * (a.log() - c.log())).sum()  # noqa: E731
            if kind == "forward":
                values.append(kl(pb, qb))
            elif kind == "reverse":
                values.append(kl(qb, pb))
            else:
                m = beta * pb + (1 - beta) * qb
                values.append(beta * kl(pb, m) + (1 - beta) * kl(qb, m))
    return torch.stack(values).mean()


@pytest.mark.parametrize("kind, cls", [("forward", ForwardKL), ("reverse", ReverseKL), ("jsd", JSD)])
@pytest.mark.parametrize("k", [1, 4])
def test_small_k_uses_the_tail_bucket(kind, cls, k):
    student, teacher, labels = _batch(seed=1)
    vocab, temperature = student.shape[-1], 1.5
    loss_fn = cls(temperature=temperature, alpha=1.0, chunk_size=2, **({"beta": 0.3} if kind == "jsd" else {}))
    targets = _sparse(teacher, labels, vocab, k, temperature)
    out = loss_fn(student, targets, labels)
    reference = _bucket_reference(kind, student, teacher, labels, vocab, k, temperature)
    torch.testing.assert_close(out.kd_loss, reference, rtol=1e-10, atol=1e-12)
    # coarser buckets lose information: at most the full divergence (data-processing inequality)
    assert out.kd_loss <= loss_fn(student, teacher, labels).kd_loss + 1e-12


def test_sparse_gradcheck():
    student, teacher, labels = _batch(seed=2, vocab=6, teacher_vocab=7, batch=2, length=5)
    loss_fn = JSD(temperature=1.3, alpha=0.7, beta=0.4, chunk_size=2)
    targets = _sparse(teacher, labels, 6, 2, 1.3)
    student.requires_grad_()
    assert torch.autograd.gradcheck(lambda s: loss_fn(s, targets, labels).loss, (student,))


def test_tail_mass_is_accurate_when_tiny():
    """The top-k hold all but ~e^-60 of the mass: 1 - sum(top-k) would round to 0 in float32; the
    logsumexp over the rest keeps the tail's log exactly (teacher and student alike)."""
    vocab, k = 50, 5
    logits = torch.full((2, vocab), -60.0)
    logits[:, :k] = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0])
    ids, logprobs, tail = topk_targets(logits, vocab, k, 1.0)
    exact = torch.logsumexp(torch.log_softmax(logits.double(), -1)[:, k:], -1)
    torch.testing.assert_close(tail.double(), exact, rtol=1e-6, atol=0)
    assert (ids.sort(-1).values == torch.arange(k)).all()
    # the student side: its bucket loss stays finite and matches a float64 evaluation
    labels = torch.tensor([[-100, 3]])
    student = logits[:1].unsqueeze(0).repeat(1, 2, 1) + 0.1
    sparse = SparseTargets(ids[:1], logprobs[:1], tail[:1])
    out32 = ReverseKL(alpha=1.0)(student, sparse, labels)
    sparse64 = SparseTargets(ids[:1], logprobs[:1].double(), exact[:1])
    out64 = ReverseKL(alpha=1.0)(student.double(), sparse64, labels)
    assert math.isfinite(out32.kd_loss.item())
    torch.testing.assert_close(out32.kd_loss.double(), out64.kd_loss, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- the key


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


_PROCESSOR = {}  # the tiny processor and the base config, made once


def _processor(cache_dir):
    from firstsight.models.tiny import tiny_processor

    if "processor" not in _PROCESSOR:  # loaded once: it is only read here
        _PROCESSOR["processor"] = tiny_processor(cache_dir)
    return _PROCESSOR["processor"]


def _key(cache_dir, overrides, vocab=448, processor=None):
    from omegaconf import OmegaConf

    from firstsight.core.files import content_key
    from firstsight.data import load_split
    from firstsight.kd.teacher_cache import key_inputs

    if "cfg" not in _PROCESSOR:  # composed once (Hydra's compose is slow); overrides are dotted keys
        _PROCESSOR["cfg"] = compose(BASE)
    cfg = _PROCESSOR["cfg"].copy()
    for override in overrides:
        key, value = override.split("=", 1)
        value = None if value == "null" else value[1:-1].split(",") if value.startswith("[") else value
        OmegaConf.update(cfg, key, value)
    processor = processor or _processor(cache_dir)
    top_k = vocab if cfg.teacher_cache.top_k is None else cfg.teacher_cache.top_k
    return content_key(
        key_inputs(teacher_cache_spec(cfg), processor, vocab, load_split(cfg.data, "train", cfg.seed), "cpu", top_k)
    )


def test_the_key_changes_with_each_determining_input_only(cache_dir):
    base = _key(cache_dir, [])
    assert _key(cache_dir, []) == base  # stable
    changed = {
        "teacher size": _key(cache_dir, ["model.teacher.tiny.hidden_size=64"]),
        "precision": _key(cache_dir, ["precision.dtype=bfloat16"]),
        "quantization": _key(cache_dir, ["precision.quantization=int8"]),
        "train size": _key(cache_dir, ["data.train_size=17"]),
        "image size": _key(cache_dir, ["data.image_size=84"]),
        "kinds": _key(cache_dir, ["data.kinds=[count,held]"]),
        "seed": _key(cache_dir, ["seed=1"]),
        "temperature": _key(cache_dir, ["distill_loss.temperature=3.0"]),
        "top_k": _key(cache_dir, ["teacher_cache.top_k=8"]),
        "top_k null (every id)": _key(cache_dir, ["teacher_cache.top_k=null"]),
        "student vocabulary": _key(cache_dir, [], vocab=512),
    }
    processor = copy.deepcopy(_processor(cache_dir))
    processor.tokenizer.chat_template = processor.tokenizer.chat_template + " "
    changed["processor"] = _key(cache_dir, [], processor=processor)
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed
    # null is the whole vocabulary: the same cache as naming its size
    assert changed["top_k null (every id)"] == _key(cache_dir, ["teacher_cache.top_k=448"])
    # the shipped pretrained tiny teacher (for the default data settings) against a random one
    default_data = ["data.train_size=512"]
    assert _key(cache_dir, default_data) != _key(cache_dir, [*default_data, "model.teacher.weights=pretrained"])
    # student-side settings share one cache
    for same in (
        ["distill_loss._target_=firstsight.losses.ReverseKL"],
        ["distill_loss.alpha=0.9"],
        ["train.lr=0.1"],
        ["lora.enabled=true"],
        ["teacher_cache.shard_size=3"],
        ["hardware.batch_size=2"],
        ["data.validation_size=9"],
    ):
        assert _key(cache_dir, same) == base, same


def _touch_later(path, seconds=10):
    """Move `path`'s mtime `seconds` later, as a rewrite a little later would."""
    import os

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))


def test_a_local_teacher_s_key_follows_its_weight_files(cache_dir, tmp_path):
    """A teacher in a local directory, retrained in place: the key changes with its weight files
    (a rewrite of the same size, a shard added) and its config, not with other files there."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text('{"hidden_size": 32}')
    weights = teacher / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    local = [f"model.teacher.source={teacher}", "model.teacher.weights=pretrained"]
    first = _key(cache_dir, local)
    assert _key(cache_dir, local) == first  # stable
    (teacher / "README.md").write_text("notes")  # not a weight file
    assert _key(cache_dir, local) == first

    weights.write_bytes(b"b" * 64)  # retrained: the same file name and size, new contents
    _touch_later(weights)
    retrained = _key(cache_dir, local)
    assert retrained != first
    (teacher / "model-00002-of-00002.safetensors").write_bytes(b"c" * 8)  # a shard added
    sharded = _key(cache_dir, local)
    assert sharded not in (first, retrained)
    (teacher / "config.json").write_text('{"hidden_size": 64}')
    assert _key(cache_dir, local) not in (first, retrained, sharded)


def test_a_hub_teacher_s_key_follows_its_revision_and_cached_commit(cache_dir, tmp_path, monkeypatch):
    """A hub id: keyed by the revision asked for and the commit of the local snapshot it resolves to
    (huggingface_hub's cache layout: refs/<revision> holds the commit, snapshots/<commit>/ the files)."""
    from huggingface_hub import constants

    from firstsight.kd.teacher_cache import teacher_identity

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--teacher"
    old, new = "1" * 40, "2" * 40
    for commit in (old, new):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(old)
    hub = ["model.teacher.source=org/teacher", "model.teacher.weights=pretrained"]

    assert teacher_identity(model_spec(compose([*BASE, *hub])), None, "cpu")["commit"] == old  # main, through refs/main

    on_main = _key(cache_dir, hub)
    assert _key(cache_dir, hub) == on_main
    (repo / "refs" / "main").write_text(new)  # main moved on: another snapshot downloaded
    moved = _key(cache_dir, hub)
    assert moved != on_main
    by_commit = {c: _key(cache_dir, [*hub, f"model.teacher.revision={c}"]) for c in (old, new)}
    assert by_commit[old] != by_commit[new]  # revisions that are commits
    # revisions not in the local cache (no commit known) are still told apart by name
    uncached = {r: _key(cache_dir, [*hub, f"model.teacher.revision={r}"]) for r in ("v1.0", "v2.0")}
    assert uncached["v1.0"] != uncached["v2.0"]


# ----------------------------------------------------------------------------- build, hit, refuse


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


def test_file_data_keys_on_the_file_and_its_media(cache_dir, tmp_path):
    from conftest import ROOT

    fixture = ROOT / "tests" / "fixtures" / "conversations.jsonl"
    copy_ = tmp_path / "conversations.jsonl"
    shutil.copy(fixture, copy_)
    files = ["data=conversations", f"data.train_file={copy_}", f"data.image_root={fixture.parent}"]
    first = _key_composed(cache_dir, files)
    assert _key_composed(cache_dir, files) == first
    copy_.write_text(copy_.read_text() + "\n")  # same records, other bytes: conservatively another cache
    assert _key_composed(cache_dir, files) != first


def test_a_key_part_json_cannot_write_is_keyed_by_its_text():
    """A path or a dtype in the key: keyed as its text, never refused."""
    from pathlib import Path

    from firstsight.core.files import content_key

    assert content_key({"file": Path("data/train.jsonl")}) == content_key({"file": "data/train.jsonl"})
    assert content_key(torch.bfloat16) != content_key(torch.float16)


def _key_composed(cache_dir, overrides):
    from firstsight.core.files import content_key
    from firstsight.data import load_split
    from firstsight.kd.teacher_cache import key_inputs

    cfg = compose([*BASE, *overrides])
    train = load_split(cfg.data, "train", cfg.seed)
    return content_key(key_inputs(teacher_cache_spec(cfg), _processor(cache_dir), 448, train, "cpu", 64))


def test_validation(cache_dir):
    from firstsight.core.errors import ConfigError
    from firstsight.kd.teacher_cache import cache_wanted
    from firstsight.suite.validate import validate

    with pytest.raises(ConfigError, match="teacher_cache.top_k"):
        validate(compose([*BASE, "teacher_cache.top_k=0"]))
    with pytest.raises(ConfigError, match="teacher_cache.shard_size"):
        validate(compose([*BASE, "teacher_cache.shard_size=0"]))

    def wanted(overrides):
        cfg = compose(overrides)
        return cache_wanted(cfg.teacher_cache, cfg.distill_loss)

    assert wanted(BASE)
    assert not wanted([*BASE, "distill_loss=none"])  # no teacher: ignored, with a message
    assert not wanted(BASE[:-1])


def test_top_k_larger_than_the_student_vocabulary_stops(cache_dir, tmp_path):
    from firstsight.tasks.distill import distill

    cfg = compose([*BASE, f"teacher_cache.dir={tmp_path}", "teacher_cache.top_k=100000"])
    with pytest.raises(FirstSightError, match="exceeds the student's vocabulary"):
        distill(cfg, _Tracker())


# ----------------------------------------------------------------------------- the CLI


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
