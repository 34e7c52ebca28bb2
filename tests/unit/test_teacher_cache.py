"""Teacher-logit cache: the sparse (top-k + tail) loss against float64 references, the cache key,
build then hit without a teacher pass, stale/corrupt caches refused, and miss → hit from the CLI."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
from conftest import compose

from firstsight.config.specs import model_spec, teacher_cache_spec
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


# ----------------------------------------------------------------------------- helpers of the key and the build


def test_the_weight_files_are_the_checkpoint_files_of_the_directory_in_name_order(tmp_path):
    from firstsight.kd.teacher_cache import _weight_files

    names = [
        "pytorch_model.bin",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "model.pt",
        "model.pth",
        "config.json",
        "README.md",
        "tokenizer.model",
    ]
    for name in names:
        (tmp_path / name).write_text(name)
    (tmp_path / "extra.bin").mkdir()  # a directory, whatever its name
    assert [f.name for f in _weight_files(tmp_path)] == [
        "model-00001-of-00002.safetensors",
        "model.pt",
        "model.pth",
        "model.safetensors.index.json",
        "pytorch_model.bin",
    ]


def test_the_hub_commit_is_the_cached_snapshot_of_the_revision_asked_for(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from firstsight.kd.teacher_cache import _hub_commit

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--teacher"
    on_main, tagged = "1" * 40, "2" * 40
    for commit in (on_main, tagged):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(on_main)
    (repo / "refs" / "v1").write_text(tagged)
    assert _hub_commit("org/teacher", None) == on_main
    assert _hub_commit("org/teacher", "v1") == tagged
    assert _hub_commit("org/teacher", "v2") is None  # not cached
    assert _hub_commit("org/other", None) is None


def test_a_shard_holds_int32_ids_and_labels_float32_log_probabilities_and_int64_offsets(tmp_path):
    """Whatever dtypes the teacher pass hands over (bfloat16 log-probabilities, int64 ids), a shard
    is written in the format the verification expects; shard_size samples fill one shard."""
    from safetensors import safe_open

    from firstsight.core.files import sha256_file
    from firstsight.kd.teacher_cache import FORMAT, TENSORS, _ShardWriter

    writer = _ShardWriter(tmp_path, "the-key", shard_size=2, top_k=3)
    rows = [2, 1, 3]  # answer tokens of three samples
    g = torch.Generator().manual_seed(0)
    samples = [
        (
            torch.randint(0, 50, (n, 3), generator=g),
            torch.randn(n, 3, generator=g).to(torch.bfloat16),
            torch.randn(n, generator=g, dtype=torch.float64),
            torch.randint(0, 50, (n,), generator=g),
        )
        for n in rows
    ]
    for sample in samples:
        writer.add(*sample)
    assert len(writer.shards) == 1 and len(writer.samples) == 1  # the third waits for the next shard
    writer.flush()
    assert [(s["file"], s["first_sample"], s["num_samples"], s["num_rows"]) for s in writer.shards] == [
        ("shard-00000.safetensors", 0, 2, 3),
        ("shard-00001.safetensors", 2, 1, 3),
    ]
    assert writer.rows == 6 and writer.first == 3 and writer.samples == []
    dtypes = {"I32": torch.int32, "F32": torch.float32, "I64": torch.int64}
    for shard, group in zip(writer.shards, (samples[:2], samples[2:])):
        path = tmp_path / shard["file"]
        assert shard["bytes"] == path.stat().st_size and shard["sha256"] == sha256_file(path)
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == {"format": FORMAT, "key": "the-key", "first_sample": str(shard["first_sample"])}
            for name, (dtype, _) in TENSORS.items():
                assert f.get_tensor(name).dtype == dtypes[dtype], name
            for index, name in enumerate(("token_ids", "logprobs", "tail_logprob", "labels")):
                expected = torch.cat([s[index] for s in group]).to(dtypes[TENSORS[name][0]])
                assert torch.equal(f.get_tensor(name), expected), name
            counts = [len(s[3]) for s in group]
            assert f.get_tensor("offsets").tolist() == [0, *torch.tensor(counts).cumsum(0).tolist()]
    writer.flush()  # nothing pending: no empty shard
    assert len(writer.shards) == 2


def test_sizes_in_messages():
    from firstsight.kd.teacher_cache import _size

    assert _size(2.34e9) == "2.3 GB"
    assert _size(1e8) == "0.1 GB"
    assert _size(99_990_000) == "99.99 MB"
    assert _size(2.5e6) == "2.50 MB"
    # just above a rounding boundary: in units of exactly 10^9 and 10^6 bytes
    assert _size(2_350_000_001) == "2.4 GB"
    assert _size(10_005_001) == "10.01 MB"


def test_a_cache_row_held_in_memory_is_its_log_probabilities_tail_label_and_ids_below_the_vocabulary():
    from firstsight.kd.teacher_cache import held_bytes_per_row

    assert held_bytes_per_row(64, 1000) == 4 * 64 + 8 + 4 * 64
    assert held_bytes_per_row(1, 2) == 16
    assert held_bytes_per_row(1000, 1000) == 4 * 1000 + 8  # k = V: the ids are dropped


def test_the_teacher_pass_stops_once_the_projected_cache_exceeds_the_memory_available():
    """3 answer tokens a sample so far, 100 samples, 520 bytes a row (k = 64 of 1000): 156 000 bytes.
    Exactly that much available fits; a byte less does not, and the error says the figures; no
    samples yet or no memory figure: nothing to check."""
    from firstsight.core.errors import FirstSightError
    from firstsight.kd.teacher_cache import _check_fits

    _check_fits(30, 10, 100, 64, 1000, 64, available=156_000)
    _check_fits(0, 0, 100, 64, 1000, 64, available=1)
    _check_fits(30, 10, 100, 64, 1000, 64, available=None)
    expected = (
        "teacher_cache.top_k=64: the cache of the 100 train samples would take ~0.16 MB of host memory "
        "(~3.0 answer tokens per sample x 520 bytes), more than the 0.16 MB available; choose a smaller "
        "teacher_cache.top_k (e.g. 64: 520 bytes per answer token) or fewer samples (data.train_size)"
    )
    with pytest.raises(FirstSightError) as error:
        _check_fits(30, 10, 100, 64, 1000, 64, available=155_999)
    assert str(error.value) == expected
    with pytest.raises(FirstSightError, match=r"^teacher_cache.top_k=null \(every id\): .* \(~4.0 answer tokens"):
        _check_fits(4, 1, 100, 1000, 1000, None, available=10_000)  # one sample is enough to project


# ----------------------------------------------------------------------------- the teacher pass and the build


class _TableTeacher:
    """A stand-in for a loaded teacher: its logits at a position are a fixed random row chosen by
    the input id there (so another input gives other targets); it records the batches it sees."""

    origin, params_b, weights_gb, vocab_rows, load_time_s = "table", 0.5, 1.25, 450, 0.25

    def __init__(self):
        self.table = torch.randn(997, self.vocab_rows, generator=torch.Generator().manual_seed(0))
        self.seen = []
        self.model = self

    def logits(self, input_ids):
        return self.table[input_ids % 997]

    def __call__(self, input_ids, **inputs):
        self.seen.append(input_ids)
        return type("Output", (), {"logits": self.logits(input_ids)})()


def _context(cache_dir, tmp_path, overrides=(), top_k=16, teacher_processor=None):
    from firstsight.data import load_split
    from firstsight.kd.teacher_cache import _Context

    cfg = compose([*BASE, f"teacher_cache.dir={tmp_path}", f"teacher_cache.top_k={top_k}", *overrides])
    train = load_split(cfg.data, "train", cfg.seed)
    return _Context(teacher_cache_spec(cfg), _processor(cache_dir), "cpu", train, 448, top_k, teacher_processor)


def _expected_rows(teacher, collate, samples, top_k, temperature):
    """The top-k targets of the teacher's logits at each answer token of `samples`, batched by 4."""
    ids, logprobs, tails = [], [], []
    for start in range(0, len(samples), 4):
        batch = collate(samples[start : start + 4])
        mask = batch["labels"][:, 1:] != -100
        rows = teacher.logits(batch["input_ids"])[:, :-1][mask]
        for part, value in zip((ids, logprobs, tails), topk_targets(rows, 448, top_k, temperature)):
            part.append(value)
    return [torch.cat(part) for part in (ids, logprobs, tails)]


def _written(writer, tmp_path):
    from safetensors.torch import load_file

    shards = [load_file(str(tmp_path / shard["file"])) for shard in writer.shards]
    return {name: torch.cat([s[name] for s in shards]) for name in ("token_ids", "logprobs", "tail_logprob", "labels")}


class _Bar:
    """Records what a tqdm progress bar is asked to show."""

    made = []

    def __init__(self, **kwargs):
        self.kwargs, self.updates, self.closed = kwargs, [], False
        _Bar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def close(self):
        self.closed = True


def test_the_teacher_pass_writes_the_top_k_of_the_teacher_s_own_inputs(cache_dir, tmp_path, monkeypatch):
    """A teacher of another architecture: it runs on its own processor's batches of the train split
    (other ids, the same answer tokens), in order, hardware.batch_size samples at a time; each
    answer token's row is the top-k of its logits at T. The memory check sees the answer tokens so
    far, the samples so far and the top_k setting; the progress bar counts the samples."""
    import tqdm.auto

    from firstsight.core import perf
    from firstsight.data.batching import QACollator
    from firstsight.kd import teacher_cache
    from firstsight.kd.teacher_cache import _ShardWriter, _teacher_pass
    from firstsight.models.llava_ov import tiny_llava_processor

    llava = tiny_llava_processor(cache_dir)
    ctx = _context(cache_dir, tmp_path, ["distill_loss.temperature=2.0", "distill_loss.chunk_size=3"], 16, llava)
    checks = []
    monkeypatch.setattr(teacher_cache, "_check_fits", lambda *args: checks.append(args))
    monkeypatch.setattr(perf, "available_host_memory_bytes", lambda: 123_456)
    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    _Bar.made = []
    teacher, writer = _TableTeacher(), _ShardWriter(tmp_path, ctx.key, 5, 16)
    assert _teacher_pass(ctx, teacher, writer) == 16

    samples = [ctx.train_set[i] for i in range(16)]
    ids, logprobs, tail = _expected_rows(teacher, QACollator(llava), samples, 16, 2.0)
    written = _written(writer, tmp_path)
    assert torch.equal(written["token_ids"], ids.to(torch.int32))
    assert torch.equal(written["logprobs"], logprobs) and torch.equal(written["tail_logprob"], tail)
    student = QACollator(_processor(cache_dir))(samples)
    assert torch.equal(written["labels"], student["labels"][:, 1:][student["labels"][:, 1:] != -100].to(torch.int32))
    assert [s["first_sample"] for s in writer.shards] == [0, 5, 10, 15]
    image = llava.tokenizer.convert_tokens_to_ids("<image>")
    assert [x.shape[0] for x in teacher.seen] == [4, 4, 4, 4] and all((x == image).any() for x in teacher.seen)

    per_sample = (student["labels"][:, 1:] != -100).sum(1)
    so_far = per_sample.cumsum(0)[3::4].tolist()
    assert checks == [(tokens, 4 * (i + 1), 16, 16, 448, 16, 123_456) for i, tokens in enumerate(so_far)]
    (bar,) = _Bar.made
    assert bar.kwargs == {
        "total": 16,
        "desc": "teacher cache: top-16 of the teacher (first use, cached)",
        "disable": True,  # train.progress_bar=false
        "dynamic_ncols": True,
    }
    assert bar.updates == [4, 4, 4, 4] and bar.closed
    _Bar.made = []
    _teacher_pass(
        _context(cache_dir, tmp_path, ["train.progress_bar=true"]), teacher, _ShardWriter(tmp_path, "k", 8, 16)
    )
    assert _Bar.made[0].kwargs["disable"] is False


def test_samples_without_answer_tokens_make_empty_rows_of_the_shard_s_shapes(cache_dir, tmp_path, monkeypatch):
    """A batch (here a whole shard) of samples without an answer token: no rows, but a shard of
    the format the verification expects ([0, k] ids and log-probabilities), and the next samples'
    rows where they belong."""
    from firstsight.data import batching
    from firstsight.kd.teacher_cache import _ShardWriter, _teacher_pass, _verified_shard

    class FirstFourUnanswered(batching.QACollator):
        def _answer_labels(self, input_ids, samples):
            labels = super()._answer_labels(input_ids, samples)
            for row, sample in enumerate(samples):
                if sample.index < 4:
                    labels[row] = -100
            return labels

    monkeypatch.setattr(batching, "QACollator", FirstFourUnanswered)
    ctx = _context(cache_dir, tmp_path)
    writer = _ShardWriter(tmp_path, ctx.key, 4, 16)
    assert _teacher_pass(ctx, _TableTeacher(), writer) == 16
    assert [s["num_rows"] for s in writer.shards][0] == 0 and all(s["num_rows"] > 0 for s in writer.shards[1:])
    first = _verified_shard(tmp_path, writer.shards[0], ctx.key, 0, 448, 16)
    assert first["token_ids"].shape == first["logprobs"].shape == (0, 16)
    assert first["tail_logprob"].shape == first["labels"].shape == (0,)
    assert first["offsets"].tolist() == [0, 0, 0, 0, 0]
    _verified_shard(tmp_path, writer.shards[1], ctx.key, 4, 448, 16)


def test_a_train_split_out_of_order_stops_the_teacher_pass(cache_dir, tmp_path):
    from dataclasses import replace

    from firstsight.core.errors import FirstSightError
    from firstsight.kd.teacher_cache import _ShardWriter, _teacher_pass

    ctx = _context(cache_dir, tmp_path, ["hardware.batch_size=6"])
    order = [0, 1, 2, 3, 4, 5, 7, 6, 8, 9, 10, 11]
    ctx.train_set = [replace(ctx.train_set[i], index=i) for i in order]
    with pytest.raises(FirstSightError) as error:
        _teacher_pass(ctx, _TableTeacher(), _ShardWriter(tmp_path, ctx.key, 4, 16))
    assert str(error.value) == "the train split yielded samples [7, 6, 8, 9]..., expected 6..."


def _stale_text(where, problem, cache):
    return (
        f"teacher-logit cache {where}: {problem}. The cache is stale or corrupt and was not used; "
        f"delete {cache} and rerun to rebuild it (it is rebuilt automatically once deleted)."
    )


def _refusal(call):
    from firstsight.core.errors import FirstSightError

    with pytest.raises(FirstSightError) as error:
        call()
    return str(error.value)


def test_the_build_writes_the_manifest_of_what_it_holds_and_how_it_was_built(cache_dir, tmp_path, monkeypatch, caplog):
    """A miss: the teacher's pass, its accuracy on the validation split (loaded as the student's
    processor batches it) while it is loaded, the manifest (the module docstring's fields), shared
    like a checkpoint; the report the open logs; the completion marker's record of the manifest."""
    import datetime
    import json
    import logging
    import os
    import time

    from firstsight import data
    from firstsight.core.files import sha256_file
    from firstsight.core.runtime import device_name
    from firstsight.kd.teacher_cache import FORMAT, VERSION, _build

    ctx = _context(cache_dir, tmp_path, ["train.eval_at_end=true", "teacher_cache.shard_size=6"])
    teacher = _TableTeacher()
    ctx.load_teacher = lambda: teacher
    measured, loaded, outcomes = [], [], [1, 0, 1, 1]
    ctx.measure_accuracy = lambda model, validation: (measured.append((model, validation)), (outcomes, [0] * 4))[1]
    load_split = data.load_split
    monkeypatch.setattr(data, "load_split", lambda *a: (loaded.append(a), load_split(*a))[1])
    out, report = tmp_path / "out", {}
    out.mkdir(mode=0o700)
    umask = os.umask(0o022)
    try:
        with caplog.at_level(logging.INFO, logger="firstsight.kd.teacher_cache"):
            before = time.time()
            marker = _build(ctx, out, report)
    finally:
        os.umask(umask)
    manifest = json.loads((out / "manifest.json").read_text())
    assert marker == {
        "key": ctx.key,
        "manifest": "manifest.json",
        "manifest_sha256": sha256_file(out / "manifest.json"),
    }
    assert loaded == [(ctx.spec.models.data, "validation", ctx.spec.models.seed, ctx.processor)]
    assert len(measured) == 1 and measured[0][0] is teacher and len(measured[0][1]) == 8
    built = manifest.pop("built")
    assert 0 <= built.pop("seconds") == report["build_time_s"] < time.time() - before + 1
    at = datetime.datetime.strptime(built.pop("at"), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    assert before - 1 <= at <= time.time() + 1
    assert built == {
        "device": device_name("cpu"),
        "device_type": "cpu",
        "attn_implementation": ctx.spec.models.hardware.attn_implementation,
        "batch_size": 4,
    }
    assert report == {"build_time_s": report["build_time_s"], "teacher_load_time_s": 0.25}
    shards = manifest.pop("shards")
    assert [(s["file"], s["first_sample"], s["num_samples"]) for s in shards] == [
        ("shard-00000.safetensors", 0, 6),
        ("shard-00001.safetensors", 6, 6),
        ("shard-00002.safetensors", 12, 4),
    ]
    assert manifest == {
        "format": FORMAT,
        "version": VERSION,
        "key": ctx.key,
        "key_inputs": json.loads(json.dumps(ctx.inputs, default=str)),
        "top_k": 16,
        "temperature": float(ctx.spec.loss.temperature),
        "student_vocab_rows": 448,
        "dtypes": {"token_ids": "I32", "logprobs": "F32", "tail_logprob": "F32", "labels": "I32", "offsets": "I64"},
        "num_samples": 16,
        "num_rows": sum(s["num_rows"] for s in shards),
        "shard_size": 6,
        "teacher": {
            "origin": "table",
            "params_b": 0.5,
            "weights_gb": 1.25,
            "vocab_rows": 450,
            "validation_accuracy": 0.75,
        },
    }
    assert (out / "manifest.json").read_text().startswith('{\n  "format"')  # indented for a person to read
    assert {(p.name, p.stat().st_mode & 0o777) for p in [out, *out.iterdir()]} == {
        ("out", 0o755),
        *((name, 0o644) for name in ["manifest.json", *(s["file"] for s in shards)]),
    }
    messages = [r.getMessage() for r in caplog.records]
    assert f"teacher-logit cache miss: running the teacher once over the 16 train samples into {ctx.path}" in messages
    rows = manifest["num_rows"]
    built_in = (
        f"teacher-logit cache built in {report['build_time_s']:.1f} s: 16 samples, {rows} answer tokens, 3 shard(s)"
    )
    assert built_in in messages

    # without eval_at_end: no accuracy measured, none recorded
    ctx.spec = teacher_cache_spec(compose([*BASE, "teacher_cache.top_k=16", "train.eval_at_end=false"]))
    (tmp_path / "again").mkdir()
    _build(ctx, tmp_path / "again", {})
    assert len(measured) == 1
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["teacher"]["validation_accuracy"] is None
    # a validation split of one question: its one outcome is the accuracy
    ctx.spec, outcomes[:] = teacher_cache_spec(compose([*BASE, "teacher_cache.top_k=16"])), [1]
    (tmp_path / "one").mkdir()
    _build(ctx, tmp_path / "one", {})
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["teacher"]["validation_accuracy"] == 1.0


def test_a_teacher_pass_short_of_the_train_split_stops_the_build(cache_dir, tmp_path, monkeypatch):
    from firstsight.kd import teacher_cache

    ctx = _context(cache_dir, tmp_path)
    ctx.load_teacher = _TableTeacher
    monkeypatch.setattr(teacher_cache, "_teacher_pass", lambda ctx, teacher, writer: 15)
    message = _refusal(lambda: teacher_cache._build(ctx, tmp_path, {}))
    assert message == "the teacher pass saw 15 samples, the train split has 16"


def _small_cache():
    """An opened cache of three samples: 2, 0 and 3 answer tokens (rows 0-1, none, rows 2-4)."""
    from pathlib import Path

    from firstsight.kd.teacher_cache import TeacherCache

    arrays = {
        "token_ids": torch.arange(10, dtype=torch.int32).reshape(5, 2),
        "logprobs": -torch.arange(10, dtype=torch.float32).reshape(5, 2),
        "tail_logprob": -torch.arange(5, dtype=torch.float32) - 10,
        "labels": torch.tensor([10, 11, 20, 21, 22], dtype=torch.int32),
        "offsets": torch.tensor([0, 2, 2, 5]),
    }
    ctx = type("Ctx", (), {"path": Path("/caches/topk-k")})()
    return TeacherCache(ctx, None, {}, arrays, "hit", None, {})


def _answer_batch(index, *rows):
    """A batch whose row r has the answer tokens rows[r], starting at position 1 (a one-token prompt)."""
    labels = torch.full((len(rows), 5), -100)
    for r, answers in enumerate(rows):
        labels[r, 1 : 1 + len(answers)] = torch.tensor(answers)
    return {"labels": labels, "sample_index": torch.tensor(index)}


def test_a_batch_s_targets_are_its_samples_rows_and_a_batch_that_disagrees_is_named():
    from pathlib import Path

    cache = _small_cache()
    where, cache_dir = Path("/caches/topk-k/manifest.json"), Path("/caches/topk-k")
    targets = cache.targets(_answer_batch([2, 1, 0], [20, 21, 22], [], [10, 11]))
    assert torch.equal(targets.token_ids, cache.token_ids[[2, 3, 4, 0, 1]])
    assert torch.equal(targets.logprobs, cache.logprobs[[2, 3, 4, 0, 1]])
    assert torch.equal(targets.tail_logprob, cache.tail_logprob[[2, 3, 4, 0, 1]])

    batch = _answer_batch([0], [10, 11])
    del batch["sample_index"]
    assert _refusal(lambda: cache.targets(batch)) == (
        "a batch without sample_index reached the teacher-logit cache (its collator needs with_index=True)"
    )
    for index in ([0, 3], [-1, 0]):
        problem = f"a batch asks for sample {index}, the cache holds 3"
        assert _refusal(lambda: cache.targets(_answer_batch(index, [10, 11], [10, 11]))) == _stale_text(
            where, problem, cache_dir
        )
    message = _refusal(lambda: cache.targets(_answer_batch([0, 2], [10, 11], [20, 21])))
    assert message == _stale_text(where, "train sample 2 has 2 answer tokens now, the cache 3", cache_dir)
    message = _refusal(lambda: cache.targets(_answer_batch([0, 2], [10, 11], [20, 99, 22])))
    assert message == _stale_text(where, "the answer tokens of train sample 2 differ from the cached ones", cache_dir)


def test_a_shard_that_disagrees_with_its_manifest_entry_is_named(tmp_path):
    """Each check of a shard names the file, what is wrong and the cache directory to delete."""
    import hashlib

    from firstsight.kd.teacher_cache import _ShardWriter, _verified_shard

    writer = _ShardWriter(tmp_path, "the-key", 2, 3)
    for n in (2, 1):
        writer.add(torch.zeros(n, 3, dtype=torch.int64), torch.zeros(n, 3), torch.zeros(n), torch.zeros(n))
    writer.flush()
    (shard,) = writer.shards
    file = tmp_path / shard["file"]

    def refused(entry, key="the-key", first=0):
        return _refusal(lambda: _verified_shard(tmp_path, entry, key, first, 50, 3))

    assert _verified_shard(tmp_path, shard, "the-key", 0, 50, 3)["offsets"].tolist() == [0, 2, 3]
    problem = "shard shard-00000.safetensors starts at sample 0, expected 3"
    assert refused(shard, first=3) == _stale_text(tmp_path / "manifest.json", problem, tmp_path)
    gone = tmp_path / "shard-00009.safetensors"
    problem = f"missing or unreadable shard ([Errno 2] No such file or directory: '{gone}')"
    assert refused(dict(shard, file=gone.name)) == _stale_text(gone, problem, tmp_path)
    problem = f"{shard['bytes']} bytes, the manifest says {shard['bytes'] + 1} (truncated?)"
    assert refused(dict(shard, bytes=shard["bytes"] + 1)) == _stale_text(file, problem, tmp_path)
    problem = "its sha256 differs from the manifest's"
    assert refused(dict(shard, sha256="0" * 64)) == _stale_text(file, problem, tmp_path)
    problem = "its metadata (key 'the-key', first sample '0') belongs elsewhere"
    assert refused(shard, key="another-key") == _stale_text(file, problem, tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00{]}!")
    entry = dict(shard, file=junk.name, bytes=12, sha256=hashlib.sha256(junk.read_bytes()).hexdigest())
    message = refused(entry)
    assert message.startswith(f"teacher-logit cache {junk}: not a readable safetensors file (") and message.endswith(
        f"). The cache is stale or corrupt and was not used; delete {tmp_path} and rerun to rebuild it "
        "(it is rebuilt automatically once deleted)."
    )
