"""Teacher-logit cache: the teacher's top-k log-probabilities on the train split, computed once.

A sweep over student settings (loss, alpha, LoRA, learning rate, ...) would otherwise run the
same frozen teacher over the same samples in every job. With ``teacher_cache.enabled=true`` the
distill task instead looks for a cache of the teacher's targets under
``teacher_cache.dir`` (default ``<cache_dir>/teacher-logits``):

- **hit**: the students train from the cache; the teacher is not loaded at all (no weights in
  memory, no load time, no teacher forward per step);
- **miss**: the teacher is loaded, makes one pass over the train split in order (with a progress
  bar) writing the cache, and is freed; training then proceeds from the cache exactly as on a hit.

Concurrent jobs of a sweep build a cache once: it is written into a temporary sibling and renamed
into place under a file lock (firstsight.core.files.cached_dir); the others wait and then hit.

**What is stored.** For every train sample (by its dataset index) and each of its answer positions
(``labels[:, 1:] != -100``, the logits at position i predicting label i+1, as in KDLoss), with
p = softmax(teacher_logits[:Vs] / T) over the student's Vs vocabulary rows (the teacher's padding
rows cut away first):

- ``token_ids`` int32 [R, k]: the k most probable ids, by decreasing p (k = Vs: 0..Vs-1 in order,
  which a reader checks and then drops, so the cache takes half the host memory and the loss
  compares whole distributions without a gather);
- ``logprobs`` float32 [R, k]: their log p at the run's temperature T (float32: exactly what the
  live loss computes, which works in float32);
- ``tail_logprob`` float32 [R]: log(1 - sum of those p) = logsumexp of log p over every other id,
  computed directly (no cancellation), -inf when k = Vs;
- ``labels`` int32 [R]: the answer token of the row, to check that a batch and its cache rows agree;
- ``offsets`` int64 [S + 1]: sample j of the shard owns rows offsets[j]:offsets[j+1].

One safetensors file holds ``shard_size`` consecutive samples (``shard-00000.safetensors``, ...;
its metadata names the cache key and its first sample). ``manifest.json`` holds the key, every
input of the key, the sizes and dtypes, and each shard's sample range, row count, byte size and
sha256. ``teacher_cache.top_k=null`` keeps every id (k = Vs, tail -inf): the loss is then the
live teacher's exactly, at ~8 * Vs bytes per answer token on disk and ~4 * Vs in host memory.
Log-probabilities at T cannot be recovered from top-k values at another temperature (the tail's
shape is unknown), so T is part of the key: each temperature has its own cache.

**The key** is a hash (firstsight.core.files.content_key) of everything that determines the values:
the teacher's identity (tiny: its cache directory's name and the sha256 of its config and weights;
a local directory: its path, config.json's sha256 and each weight file's name, size and mtime;
a hub id: id, revision and the resolved commit of the local snapshot; random weights: source,
architecture, seed and the device they were initialised on), the precision's dtype and the
teacher's quantization (and each part's: firstsight/models/parts.py), the train split's definition
(synthetic: seed, size, image size, frames, kinds and the generator's source hash; files: path,
sha256, media settings and the size and mtime of every media file), the processor (tokenizer
vocabulary, chat template, image processor settings), the student's vocabulary rows, T, k and the
format version. The cache lives in ``topk-<key>``: a change in any input is simply another directory.

**Stale or corrupt caches are never used silently.** Opening a cache checks the manifest (its
sha256 against the one the completion marker recorded at build time, format, version, its key
against the directory's and against a re-hash of its recorded inputs, the sample count, contiguous
shards) and every shard (size, sha256, safetensors header, the key in its
metadata, tensor names, dtypes and shapes, offsets, id range); training then checks each batch's
answer tokens against the cached ``labels`` rows. Any disagreement raises FirstSightError naming
the file and telling the user to delete the cache directory so the next run rebuilds it.

**The end-of-run teacher accuracy** (``eval/teacher_accuracy``) needs the teacher. It is computed
while the teacher is loaded for the build and recorded beside the caches in
``teacher-accuracy-<key>.json`` (keyed by teacher, precision, processor and the validation split);
a hit reads it. A hit without a record for its validation split loads the teacher once at the end
to compute it (tag ``firstsight.teacher_accuracy_source``), and records it for the next runs.

Logged: metrics ``teacher_cache/hits`` and ``teacher_cache/misses`` (1/0), ``teacher_cache/size_gb``,
``teacher_cache/open_time_s`` (finding, verifying and loading it; on a miss including the build)
and on a miss ``teacher_cache/build_time_s``; tags ``firstsight.teacher_cache`` (hit | built),
``firstsight.teacher_cache_path`` and ``firstsight.teacher_cache_key``. On a hit the
``model/teacher_*`` size metrics come from the manifest and ``model/teacher_load_time_s`` is 0.
The cache is held in host memory while training: about R * (8k + 8) bytes, e.g. 100k samples
of 20 answer tokens at k = 64 take 1 GB (R * (4k + 8) at k = Vs, whose ids are dropped).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import safetensors.torch  # safetensors.torch.save_file: tests patch it
import torch
import tqdm.auto  # tqdm.auto.tqdm: a module attribute, tests patch it
from huggingface_hub import try_to_load_from_cache
from hydra.utils import to_absolute_path
from omegaconf import OmegaConf
from safetensors.torch import load as load_tensors
from torch.utils.data import DataLoader

import firstsight.data  # firstsight.data.load_split: a module attribute, tests patch it
from firstsight.config.schema import DataConfig, DistillLossConfig, TeacherCacheConfig
from firstsight.config.specs import ModelSpec, TeacherCacheSpec
from firstsight.core import perf  # perf.available_host_memory_bytes: a module attribute, tests patch it
from firstsight.core.errors import FirstSightError
from firstsight.core.files import COMPLETE_MARKER, cached_dir, content_key, sha256_file, write_atomically
from firstsight.core.runtime import device_name
from firstsight.data import (
    Blinded,
    batching,  # batching.QACollator: a module attribute, tests patch it
    synthetic,
)
from firstsight.data.batching import IGNORE_INDEX, in_order
from firstsight.data.files import is_file_data
from firstsight.kd.paired import TEACHER, PairedCollator
from firstsight.losses.build import build_loss
from firstsight.losses.sparse import SparseTargets, topk_targets
from firstsight.models import loading  # loading.load_model: a module attribute, tests patch it
from firstsight.models.loading import LoadedModel
from firstsight.models.parts import quantization_of, resolve_parts
from firstsight.models.pretrain import tiny_model_dir
from firstsight.training.loop import answer_outcomes, model_inputs, to_device

log = logging.getLogger(__name__)

FORMAT = "firstsight-teacher-topk"
VERSION = 2  # 2: at k = Vs the ids are in vocabulary order (1 sorted them by probability)
MANIFEST = "manifest.json"
ACCURACY_RECIPE = "teacher-outcomes-v2"  # per question, with and without the frames
TENSORS = {  # name: (dtype name as safetensors writes it, rank; [R, k] / [R] / [S + 1])
    "token_ids": ("I32", 2),
    "logprobs": ("F32", 2),
    "tail_logprob": ("F32", 1),
    "labels": ("I32", 1),
    "offsets": ("I64", 1),
}


def _value(x: Any) -> str:
    return x.value if hasattr(x, "value") else str(x)


def cache_wanted(cache: Optional[TeacherCacheConfig], loss: DistillLossConfig) -> bool:
    """Whether this distill job trains from the teacher-logit cache. The control
    (distill_loss=none) never runs the teacher, so a cache would be pointless: ignored, said so."""
    if cache is None or not cache.enabled:
        return False
    if not build_loss(loss).uses_teacher:
        log.warning("teacher_cache.enabled=true is ignored: distill_loss=%s does not use the teacher", loss.name)
        return False
    return True


def cache_root(cache: TeacherCacheConfig, cache_dir: str) -> Path:
    if cache.dir:
        return Path(to_absolute_path(os.path.expanduser(str(cache.dir))))
    return Path(cache_dir) / "teacher-logits"


# ----------------------------------------------------------------------------- the key


def _weight_files(path: Path) -> List[Path]:
    return [
        f
        for f in sorted(path.iterdir())
        if f.is_file() and (f.suffix in (".safetensors", ".bin", ".pt", ".pth") or f.name.endswith(".index.json"))
    ]


def teacher_identity(models: ModelSpec, processor: Any, device: str) -> Dict[str, Any]:
    """What determines the teacher's weights (see the module docstring)."""
    side = models.model.teacher
    if _value(side.weights) == "random":
        tiny = OmegaConf.to_container(side.tiny, resolve=True) if side.source == "tiny" and side.tiny else None
        if tiny is not None and tiny.get("architecture") is None:  # Qwen2-VL, keyed as before the field
            tiny.pop("architecture", None)
        # random init: seeded from the run's seed, drawn on the device the model is built on
        return {
            "source": side.source,
            "revision": side.revision,
            "weights": "random",
            "tiny": tiny,
            "seed": models.seed,
            "init_device": device,
        }
    if side.source == "tiny":
        path = tiny_model_dir(models, "teacher", processor)  # trained on first use (a miss needs it anyway)
        files = {f.name: sha256_file(f) for f in [path / "config.json", *_weight_files(path)] if f.is_file()}
        return {"source": "tiny", "weights": "pretrained", "dir": path.name, "sha256": files}
    path = Path(os.path.expanduser(side.source))
    if path.is_dir():  # a local directory: hashing many GB each run would be slow, so sizes and mtimes
        config = path / "config.json"
        return {
            "source": str(path.resolve()),
            "weights": "pretrained",
            "config_sha256": sha256_file(config) if config.is_file() else None,
            "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in _weight_files(path)},
        }
    return {
        "source": side.source,
        "weights": "pretrained",
        "revision": side.revision,
        "commit": _hub_commit(side.source, side.revision),
    }


def _hub_commit(repo_id: str, revision: Optional[str]) -> Optional[str]:
    """The commit of the locally cached snapshot a hub id (and revision) resolves to, if cached."""
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:
        return None
    if not isinstance(found, str):
        return None
    parts = Path(found).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def data_identity(data: DataConfig, seed: int, dataset: Any, split: str) -> Dict[str, Any]:
    """What determines the samples of `split` (see the module docstring)."""
    if is_file_data(data):
        media = sorted(
            {str(p) for record in getattr(dataset, "_records", ()) for item in record.media for p in item.paths}
        )
        stats = []
        for name in media:
            try:
                st = os.stat(name)
                stats.append([name, st.st_size, st.st_mtime_ns])
            except OSError:
                stats.append([name, None, None])
        return {
            "kind": "files",
            "split": split,
            "format": data.format,
            "file": str(dataset.path),
            "sha256": sha256_file(Path(dataset.path)),
            "num_samples": len(dataset),
            "image_root": str(dataset.image_root),
            "max_pixels": data.max_pixels,
            "min_pixels": data.min_pixels,
            "fps": data.fps,
            "max_frames": data.max_frames,
            "on_bad_sample": data.on_bad_sample,
            "media": content_key(stats),
        }
    return {
        "kind": "synthetic",
        "split": split,
        "seed": seed,
        "size": len(dataset),
        "image_size": data.image_size,
        "num_frames": data.num_frames,
        "kinds": list(data.kinds),
        "generator": sha256_file(Path(synthetic.__file__))[:16],
    }


def processor_identity(processor: Any) -> str:
    """A hash of the tokenizer's vocabulary, special tokens and chat template and of the image
    processor's settings: what turns a sample into the ids and pixels the teacher sees."""
    tokenizer = processor.tokenizer
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    image = getattr(processor, "image_processor", None)
    image_settings = image.to_dict() if image is not None else None
    return content_key(
        type(processor).__name__,
        type(tokenizer).__name__,
        vocab,
        tokenizer.chat_template,
        tokenizer.all_special_tokens,
        image_settings,
    )


def key_inputs(
    spec: TeacherCacheSpec,
    processor: Any,
    student_vocab_rows: int,
    train_set: Any,
    device: str,
    top_k: int,
    teacher_processor: Optional[Any] = None,
) -> Dict[str, Any]:
    """What the cache's key hashes; a teacher of another architecture adds its own processor (the
    ids and pixels it sees) and its architecture."""
    models, precision = spec.models, spec.models.precision
    parts = {part: [p.dtype, p.quantization] for part, p in resolve_parts(precision, "teacher").items()}
    own = {} if teacher_processor is None else {"teacher_processor": processor_identity(teacher_processor)}
    return {
        **own,
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher_identity(models, teacher_processor or processor, device),
        "precision": {
            "dtype": _value(precision.dtype),
            "teacher_quantization": quantization_of(precision, "teacher"),
            "parts": parts,
        },
        "data": data_identity(models.data, models.seed, train_set, "train"),
        "processor": processor_identity(processor),
        "student_vocab_rows": int(student_vocab_rows),
        "temperature": float(spec.loss.temperature),
        "top_k": int(top_k),
    }


# ----------------------------------------------------------------------------- errors


def _stale(path: Path, problem: str, cache_dir: Path) -> FirstSightError:
    return FirstSightError(
        f"teacher-logit cache {path}: {problem}. The cache is stale or corrupt and was not used; "
        f"delete {cache_dir} and rerun to rebuild it (it is rebuilt automatically once deleted)."
    )


# ----------------------------------------------------------------------------- building


class _ShardWriter:
    """Collects per-sample rows and writes a safetensors shard every `shard_size` samples."""

    def __init__(self, out_dir: Path, key: str, shard_size: int, top_k: int):
        self.out_dir, self.key, self.shard_size, self.top_k = out_dir, key, shard_size, top_k
        self.shards: List[Dict[str, Any]] = []
        self.samples: List[Tuple[Any, ...]] = []  # (ids, logprobs, tail, labels) of each sample
        self.first = 0
        self.rows = 0

    def add(self, ids: Any, logprobs: Any, tail: Any, labels: Any) -> None:
        self.samples.append((ids, logprobs, tail, labels))
        if len(self.samples) == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.samples:
            return
        counts = torch.tensor([0] + [len(s[3]) for s in self.samples], dtype=torch.int64)
        tensors = {
            "token_ids": torch.cat([s[0] for s in self.samples]).to(torch.int32).contiguous(),
            "logprobs": torch.cat([s[1] for s in self.samples]).to(torch.float32).contiguous(),
            "tail_logprob": torch.cat([s[2] for s in self.samples]).to(torch.float32).contiguous(),
            "labels": torch.cat([s[3] for s in self.samples]).to(torch.int32).contiguous(),
            "offsets": counts.cumsum(0),
        }
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = self.out_dir / name
        safetensors.torch.save_file(
            tensors, str(path), metadata={"format": FORMAT, "key": self.key, "first_sample": str(self.first)}
        )
        rows = int(tensors["labels"].shape[0])
        self.shards.append(
            {
                "file": name,
                "first_sample": self.first,
                "num_samples": len(self.samples),
                "num_rows": rows,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
        self.first += len(self.samples)
        self.rows += rows
        self.samples = []


class _Context:
    """What opening, building and evaluating a cache share."""

    def __init__(
        self,
        spec: TeacherCacheSpec,
        processor: Any,
        device: str,
        train_set: Any,
        vocab: int,
        top_k: int,
        teacher_processor: Optional[Any] = None,
    ):
        self.spec, self.processor, self.device, self.train_set, self.vocab = spec, processor, device, train_set, vocab
        self.top_k = top_k  # teacher_cache.top_k resolved: null is the whole vocabulary
        # a teacher of another architecture sees the samples through its own processor (kd/paired.py)
        self.teacher_processor = teacher_processor
        self.inputs = key_inputs(spec, processor, vocab, train_set, device, top_k, teacher_processor)
        self.key = content_key(self.inputs)
        self.root = cache_root(spec.cache, spec.models.cache_dir)
        self.path = self.root / f"topk-{self.key}"

    def load_teacher(self) -> Any:
        own = self.teacher_processor or self.processor
        teacher = loading.load_model(self.spec.models, "teacher", own, self.device, frozen=True)
        if teacher.vocab_rows < self.vocab:
            raise FirstSightError(
                f"the teacher has {teacher.vocab_rows} output rows, fewer than the student's {self.vocab}: "
                "the teacher's distribution cannot cover the student's vocabulary"
            )
        return teacher

    def accuracy_record(self, validation: Any) -> Path:
        key = content_key(
            ACCURACY_RECIPE,
            self.inputs["teacher"],
            self.inputs["precision"],
            self.inputs["processor"],
            data_identity(self.spec.models.data, self.spec.models.seed, validation, "validation"),
        )
        return self.root / f"teacher-accuracy-{key}.json"

    def measure_accuracy(self, teacher_model: Any, validation: Any) -> Tuple[List[bool], List[bool]]:
        """The teacher's per-question outcomes as distill measures them (teacher-forced exact match),
        with the frames and with grey frames, recorded for later runs (atomically)."""
        collator = batching.QACollator(self.teacher_processor or self.processor)
        hardware = self.spec.models.hardware
        batch = hardware.eval_batch_size or hardware.batch_size
        outcomes = answer_outcomes(teacher_model, in_order(validation, collator, batch), self.device, torch.float32)
        blind = answer_outcomes(
            teacher_model, in_order(Blinded(validation), collator, batch), self.device, torch.float32
        )
        record = self.accuracy_record(validation)
        write_atomically(
            record,
            json.dumps(
                {
                    "recipe": ACCURACY_RECIPE,
                    "accuracy": sum(outcomes) / max(len(outcomes), 1),
                    "outcomes": _bits(outcomes),
                    "blind_outcomes": _bits(blind),
                    "cache_key": self.key,
                    "validation_size": len(validation),
                },
                indent=2,
            ),
        )
        return outcomes, blind


def _bits(outcomes: List[bool]) -> str:
    return "".join("1" if o else "0" for o in outcomes)


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def held_bytes_per_row(top_k: int, vocab: int) -> int:
    """Host memory a cache row takes while training: its log-probabilities, tail and label, and
    its ids unless k = V (then they are 0..V-1 and dropped on loading)."""
    return 4 * top_k + 8 + (4 * top_k if top_k < vocab else 0)


def _check_fits(
    answer_tokens: int, samples: int, total: int, top_k: int, vocab: int, setting: Any, available: Optional[int]
) -> None:
    """Stop the teacher pass as soon as the whole cache, projected from the samples so far (its
    R * held_bytes_per_row bytes), would not fit in the host memory that was available when the
    pass began: training holds all of it there, and would run out of memory only after the whole pass."""
    if available is None or samples == 0:
        return
    per_token = held_bytes_per_row(top_k, vocab)
    projected = answer_tokens / samples * total * per_token
    if projected > available:
        setting = "null (every id)" if setting is None else setting
        raise FirstSightError(
            f"teacher_cache.top_k={setting}: the cache of the {total} train samples would take "
            f"~{_size(projected)} of host memory (~{answer_tokens / samples:.1f} answer tokens per "
            f"sample x {per_token} bytes), more than the {_size(available)} available; choose a smaller "
            f"teacher_cache.top_k (e.g. 64: {held_bytes_per_row(64, vocab)} bytes per answer token) "
            "or fewer samples (data.train_size)"
        )


def _teacher_pass(ctx: _Context, teacher: Any, writer: _ShardWriter) -> int:
    """Run the teacher over the train split in order; each sample's top-k rows go to `writer`.
    Returns the number of samples seen."""
    spec, hardware, top_k = ctx.spec, ctx.spec.models.hardware, ctx.top_k
    temperature, chunk = float(spec.loss.temperature), int(spec.loss.chunk_size)
    collate = batching.QACollator(ctx.processor, with_index=True)
    if ctx.teacher_processor is not None:  # the teacher's own inputs beside, the answers checked equal
        collate = PairedCollator(collate, batching.QACollator(ctx.teacher_processor))
    loader = DataLoader(
        ctx.train_set,
        batch_size=hardware.batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=hardware.dataloader_workers,
    )
    available = perf.available_host_memory_bytes()  # training holds the whole cache in host memory
    answer_tokens, expected = 0, 0
    bar = tqdm.auto.tqdm(
        total=len(ctx.train_set),
        desc=f"teacher cache: top-{top_k} of the teacher (first use, cached)",
        disable=not spec.models.progress_bar,
        dynamic_ncols=True,
    )
    try:
        with torch.no_grad():
            for batch in loader:
                indices = batch["sample_index"].tolist()
                if indices != list(range(expected, expected + len(indices))):  # samples must come in order
                    raise FirstSightError(f"the train split yielded samples {indices[:4]}..., expected {expected}...")
                expected += len(indices)
                batch = to_device(batch, ctx.device)
                batch = batch.get(TEACHER, batch)  # another architecture: its own ids, the same answer tokens
                # the frozen teacher runs in its own dtype, without autocast, as in kd_step
                logits = teacher.model(**model_inputs(batch)).logits
                shifted = batch["labels"][:, 1:]
                mask = shifted != IGNORE_INDEX
                rows = logits[:, :-1][mask]  # [N, Vt], the rows predicting an answer token, row-major
                del logits
                parts = [topk_targets(c, ctx.vocab, top_k, temperature) for c in rows.split(chunk)]
                if parts:
                    ids, logprobs, tail = (torch.cat(t).cpu() for t in zip(*parts))
                else:
                    ids = torch.zeros(0, top_k, dtype=torch.int64)
                    logprobs, tail = torch.zeros(0, top_k), torch.zeros(0)
                answers = shifted[mask].cpu()
                answer_tokens += answers.numel()
                _check_fits(answer_tokens, expected, len(ctx.train_set), top_k, ctx.vocab, spec.cache.top_k, available)
                begin = 0
                for count in mask.sum(1).tolist():
                    end = begin + count
                    writer.add(ids[begin:end], logprobs[begin:end], tail[begin:end], answers[begin:end])
                    begin = end
                bar.update(len(indices))
        writer.flush()
    finally:
        bar.close()
    return expected


def _manifest(
    ctx: _Context, teacher: Any, writer: _ShardWriter, samples: int, accuracy: Optional[float], seconds: float
) -> Dict[str, Any]:
    """What the cache holds and how it was built (the module docstring lists what is checked of it)."""
    hardware = ctx.spec.models.hardware
    return {
        "format": FORMAT,
        "version": VERSION,
        "key": ctx.key,
        "key_inputs": ctx.inputs,
        "top_k": ctx.top_k,
        "temperature": float(ctx.spec.loss.temperature),
        "student_vocab_rows": ctx.vocab,
        "dtypes": {name: dtype for name, (dtype, _) in TENSORS.items()},
        "num_samples": samples,
        "num_rows": writer.rows,
        "shard_size": int(ctx.spec.cache.shard_size),
        "shards": writer.shards,
        "teacher": {
            "origin": teacher.origin,
            "params_b": teacher.params_b,
            "weights_gb": teacher.weights_gb,
            "vocab_rows": teacher.vocab_rows,
            "validation_accuracy": accuracy,
        },
        "built": {
            "seconds": seconds,
            "device": device_name(ctx.device),
            "device_type": ctx.device,
            "attn_implementation": hardware.attn_implementation,
            "batch_size": hardware.batch_size,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }


def _shared_like_a_checkpoint(out_dir: Path) -> None:
    """mkdtemp made the directory and its files private; a cache is shared like a checkpoint (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [out_dir, *out_dir.iterdir()]:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)


def _build(ctx: _Context, out_dir: Path, report: Dict[str, Any]) -> Dict[str, Any]:
    """The teacher's pass over the train split, in order, into shards under `out_dir`."""
    spec = ctx.spec
    start = time.perf_counter()
    log.info(
        "teacher-logit cache miss: running the teacher once over the %d train samples into %s",
        len(ctx.train_set),
        ctx.path,
    )
    teacher = ctx.load_teacher()
    writer = _ShardWriter(out_dir, ctx.key, spec.cache.shard_size, ctx.top_k)
    samples = _teacher_pass(ctx, teacher, writer)
    if samples != len(ctx.train_set):
        raise FirstSightError(f"the teacher pass saw {samples} samples, the train split has {len(ctx.train_set)}")
    accuracy = None
    if spec.eval_at_end:  # the teacher is loaded now: measure what the end of each run reports
        validation = firstsight.data.load_split(spec.models.data, "validation", spec.models.seed, ctx.processor)
        outcomes, _ = ctx.measure_accuracy(teacher.model, validation)
        accuracy = sum(outcomes) / max(len(outcomes), 1)
    seconds = time.perf_counter() - start
    manifest = _manifest(ctx, teacher, writer, samples, accuracy, seconds)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    _shared_like_a_checkpoint(out_dir)
    report.update(build_time_s=seconds, teacher_load_time_s=teacher.load_time_s)
    del teacher
    _free(ctx.device)
    log.info(
        "teacher-logit cache built in %.1f s: %d samples, %d answer tokens, %d shard(s)",
        seconds,
        samples,
        writer.rows,
        len(writer.shards),
    )
    # the completion marker (firstsight.core.files) records the manifest's hash: an edited manifest is refused
    return {"key": ctx.key, "manifest": MANIFEST, "manifest_sha256": sha256_file(out_dir / MANIFEST)}


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- verifying


def _safetensors_metadata(blob: bytes) -> Dict[str, Any]:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length].decode("utf-8"))


def _expect(ok: bool, problem: str, where: Path, cache: Path) -> None:
    """Raise the cache-is-stale error for `where` (a file of the cache in `cache`) unless `ok`."""
    if not ok:
        raise _stale(where, problem, cache)


def _read_manifest(path: Path) -> Dict[str, Any]:
    """The manifest of the cache in `path`, if its bytes are the ones the build sealed."""
    manifest_path = path / MANIFEST
    try:
        text = manifest_path.read_bytes()
        manifest = json.loads(text)
    except (OSError, ValueError) as err:
        raise _stale(manifest_path, f"unreadable manifest ({err})", path) from None
    try:
        recorded = json.loads((path / COMPLETE_MARKER).read_text()).get("manifest_sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != hashlib.sha256(text).hexdigest():
        raise _stale(
            manifest_path, f"its sha256 is not the one {COMPLETE_MARKER} recorded at build time (edited?)", path
        )
    if not isinstance(manifest, dict):
        raise _stale(manifest_path, "the manifest is not a JSON object", path)
    return manifest


def _check_manifest(manifest: Dict[str, Any], path: Path, key: str, num_samples: int, vocab: int, top_k: int) -> None:
    """The manifest is of this format, this key (and its inputs hash to it), this split and this top-k."""
    where = path / MANIFEST
    _expect(
        manifest.get("format") == FORMAT and manifest.get("version") == VERSION,
        f"format {manifest.get('format')!r} version {manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}",
        where,
        path,
    )
    _expect(manifest.get("key") == key, f"its key {manifest.get('key')!r} is not the directory's {key!r}", where, path)
    _expect(
        content_key(manifest.get("key_inputs")) == key,
        "its recorded key inputs do not hash to its key (the manifest was edited)",
        where,
        path,
    )
    _expect(
        manifest.get("num_samples") == num_samples,
        f"it holds {manifest.get('num_samples')} samples, the train split has {num_samples}",
        where,
        path,
    )
    _expect(
        manifest.get("top_k") == top_k and manifest.get("student_vocab_rows") == vocab,
        f"top_k={manifest.get('top_k')} and vocabulary rows {manifest.get('student_vocab_rows')}, "
        f"expected {top_k} and {vocab}",
        where,
        path,
    )
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(shard, dict) for shard in shards):
        raise _stale(where, "its shard list is malformed", path)


def _verified_shard(
    path: Path, shard: Dict[str, Any], key: str, first_sample: int, vocab: int, top_k: int
) -> Dict[str, Any]:
    """The tensors of one shard, after checking its bytes, metadata, dtypes, shapes, offsets, ids
    and log-probabilities; `token_ids` is None in a cache of every id (they are the vocabulary)."""
    file = path / str(shard.get("file"))

    def expect(ok: bool, problem: str, where: Path = file) -> None:
        _expect(ok, problem, where, path)

    expect(
        shard.get("first_sample") == first_sample,
        f"shard {shard.get('file')} starts at sample {shard.get('first_sample')}, expected {first_sample}",
        path / MANIFEST,
    )
    try:
        blob = file.read_bytes()
    except OSError as err:
        raise _stale(file, f"missing or unreadable shard ({err})", path) from None
    expect(len(blob) == shard.get("bytes"), f"{len(blob)} bytes, the manifest says {shard.get('bytes')} (truncated?)")
    expect(hashlib.sha256(blob).hexdigest() == shard.get("sha256"), "its sha256 differs from the manifest's")
    try:
        header = _safetensors_metadata(blob)
        tensors = load_tensors(blob)
    except Exception as err:
        raise _stale(file, f"not a readable safetensors file ({err})", path) from None
    meta = header.get("__metadata__") or {}
    expect(
        meta.get("key") == key and meta.get("first_sample") == str(first_sample),
        f"its metadata (key {meta.get('key')!r}, first sample {meta.get('first_sample')!r}) belongs elsewhere",
    )
    samples, rows = shard.get("num_samples"), shard.get("num_rows")
    for name, (dtype, rank) in TENSORS.items():
        expect(
            name in header and header[name].get("dtype") == dtype and len(header[name].get("shape", ())) == rank,
            f"tensor {name!r} missing or not {dtype} of rank {rank}",
        )
    shapes = {name: tuple(tensors[name].shape) for name in TENSORS}
    expected_shapes = {
        "token_ids": (rows, top_k),
        "logprobs": (rows, top_k),
        "tail_logprob": (rows,),
        "labels": (rows,),
        "offsets": (samples + 1,) if isinstance(samples, int) else None,
    }
    expect(shapes == expected_shapes, f"tensor shapes {shapes}, expected {expected_shapes}")
    offsets = tensors["offsets"]
    expect(
        int(offsets[0]) == 0 and int(offsets[-1]) == rows and bool((offsets[1:] >= offsets[:-1]).all()),
        "its offsets are not a non-decreasing 0..rows sequence",
    )
    ids = tensors["token_ids"]
    if top_k == vocab:  # every id, in vocabulary order: the ids say nothing more, and are dropped
        expect(
            bool((ids == torch.arange(vocab, dtype=ids.dtype)).all()),
            "its ids are not the vocabulary in order, as a cache of every id has them",
        )
        tensors["token_ids"] = None
    else:
        expect(
            ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < vocab),
            f"token ids outside the student's vocabulary [0, {vocab})",
        )
    expect(
        not bool(tensors["logprobs"].isnan().any() or tensors["tail_logprob"].isnan().any()),
        "NaN log-probabilities",
    )
    return tensors


def load_verified(
    path: Path, key: str, num_samples: int, vocab: int, top_k: int
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The manifest and the concatenated tensors of the cache in `path`, after checking everything
    (see the module docstring); raises FirstSightError at the first disagreement."""
    manifest = _read_manifest(path)
    _check_manifest(manifest, path, key, num_samples, vocab, top_k)
    parts: Dict[str, List[Any]] = {name: [] for name in TENSORS}
    next_sample, row_base = 0, 0
    for shard in manifest["shards"]:
        tensors = _verified_shard(path, shard, key, next_sample, vocab, top_k)
        tensors["offsets"] = tensors["offsets"][:-1] + row_base  # each sample's first row in the whole cache
        for name in TENSORS:
            if tensors[name] is not None:
                parts[name].append(tensors[name])
        next_sample += shard["num_samples"]
        row_base += shard["num_rows"]
    where = path / MANIFEST
    _expect(next_sample == num_samples, f"its shards cover {next_sample} samples, expected {num_samples}", where, path)
    _expect(
        row_base == manifest.get("num_rows"),
        f"its shards hold {row_base} rows, the manifest says {manifest.get('num_rows')}",
        where,
        path,
    )
    arrays = {name: torch.cat(values) if values else torch.zeros(0) for name, values in parts.items()}
    if top_k == vocab:
        arrays["token_ids"] = None
    arrays["offsets"] = torch.cat([arrays["offsets"].to(torch.int64), torch.tensor([row_base])])
    return manifest, arrays


# ----------------------------------------------------------------------------- using


class TeacherCache:
    """An opened, verified cache: the teacher's sparse targets by sample index."""

    def __init__(
        self,
        ctx: _Context,
        tracker: Any,
        manifest: Dict[str, Any],
        arrays: Dict[str, Any],
        status: str,
        teacher: Any,
        metrics: Dict[str, float],
    ):
        self.ctx, self.tracker, self.manifest, self.status = ctx, tracker, manifest, status
        self.teacher = teacher  # a LoadedModel with model=None: origin, sizes and vocabulary rows
        self.metrics = metrics
        self.path = ctx.path
        self.token_ids, self.logprobs = arrays["token_ids"], arrays["logprobs"]
        self.tail_logprob, self.labels, self.offsets = arrays["tail_logprob"], arrays["labels"], arrays["offsets"]

    def targets(self, batch: Dict[str, Any]) -> Any:
        """The SparseTargets of a batch (it must carry `sample_index`: QACollator(with_index=True)),
        after checking that its answer tokens are the ones the cache was computed for."""
        if "sample_index" not in batch:
            raise FirstSightError(
                "a batch without sample_index reached the teacher-logit cache (its collator needs with_index=True)"
            )
        index = batch["sample_index"].to("cpu", torch.int64)
        shifted = batch["labels"][:, 1:]
        mask = shifted != IGNORE_INDEX
        counts = mask.sum(1).cpu()
        num_samples = self.offsets.numel() - 1
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_samples):
            raise _stale(
                self.path / MANIFEST,
                f"a batch asks for sample {index.tolist()}, the cache holds {num_samples}",
                self.path,
            )
        starts = self.offsets[index]
        stored = self.offsets[index + 1] - starts
        if not torch.equal(stored, counts):
            row = int((stored != counts).nonzero()[0])
            raise _stale(
                self.path / MANIFEST,
                f"train sample {int(index[row])} has {int(counts[row])} answer tokens "
                f"now, the cache {int(stored[row])}",
                self.path,
            )
        total = int(counts.sum())
        first_row = torch.cumsum(counts, 0) - counts  # where each sample's rows start in the batch
        rows = torch.repeat_interleave(starts - first_row, counts) + torch.arange(total)
        answers = shifted[mask].cpu()
        cached = self.labels[rows].to(torch.int64)
        if not torch.equal(cached, answers.to(torch.int64)):
            bad = int((cached != answers).nonzero()[0])
            sample = int(torch.repeat_interleave(index, counts)[bad])
            raise _stale(
                self.path / MANIFEST,
                f"the answer tokens of train sample {sample} differ from the cached ones",
                self.path,
            )
        ids = None if self.token_ids is None else self.token_ids[rows]  # None: every id, in order
        targets = SparseTargets(ids, self.logprobs[rows], self.tail_logprob[rows])
        return targets.to(batch["labels"].device)

    def teacher_outcomes(self, validation: Any, blind: bool = True) -> Tuple[List[bool], Optional[List[bool]]]:
        """The teacher's per-question outcomes on `validation` (and with grey frames, if `blind`):
        the record made at build time, else the teacher is loaded now."""
        record = self.ctx.accuracy_record(validation)
        try:
            data = json.loads(record.read_text())
            if data.get("recipe") == ACCURACY_RECIPE and len(data.get("outcomes", "")) == len(validation):
                self.tracker.set_tags({"firstsight.teacher_accuracy_source": f"recorded in {record}"})
                return [c == "1" for c in data["outcomes"]], (
                    [c == "1" for c in data["blind_outcomes"]] if blind else None
                )
        except (OSError, ValueError, KeyError):
            pass
        log.info("no recorded teacher outcomes for this validation split: loading the teacher to measure them")
        teacher = self.ctx.load_teacher()
        outcomes, blind_outcomes = self.ctx.measure_accuracy(teacher.model, validation)
        del teacher
        _free(self.ctx.device)
        self.tracker.set_tags({"firstsight.teacher_accuracy_source": "teacher loaded for the evaluation"})
        return outcomes, (blind_outcomes if blind else None)


@contextlib.contextmanager
def _rng_untouched(device: str) -> Iterator[None]:
    """A hit and a miss leave the global RNG as they found it (LoRA init, dropout, data loaders
    draw from it later), so a run trains the same whether it built the cache or not."""
    devices = [torch.cuda.current_device()] if device == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def open_cache(
    spec: TeacherCacheSpec,
    tracker: Any,
    processor: Any,
    student: Any,
    device: str,
    teacher_processor: Optional[Any] = None,
) -> TeacherCache:
    """Find (or build, on a miss) and verify the cache of this run; log hit or miss."""
    settings = spec.cache
    vocab = int(student.vocab_rows)
    top_k = vocab if settings.top_k is None else int(settings.top_k)  # null: every id, the exact loss
    if top_k > vocab:
        raise FirstSightError(
            f"teacher_cache.top_k={settings.top_k} exceeds the student's vocabulary ({vocab} rows): "
            f"choose at most {vocab} (top_k={vocab} keeps the full distribution)"
        )
    start = time.perf_counter()
    report: Dict[str, Any] = {}
    with _rng_untouched(device):
        train_set = firstsight.data.load_split(spec.models.data, "train", spec.models.seed, processor)
        ctx = _Context(spec, processor, device, train_set, vocab, top_k, teacher_processor)
        cached_dir(ctx.path, lambda out: _build(ctx, out, report))
        manifest, arrays = load_verified(ctx.path, ctx.key, len(train_set), vocab, top_k)
    seconds = time.perf_counter() - start
    status = "built" if report else "hit"
    info = manifest["teacher"]
    teacher = LoadedModel(  # the teacher as described by the manifest; its weights are not loaded
        model=None,
        role="teacher",
        origin=info["origin"],
        params_b=info["params_b"],
        weights_gb=info["weights_gb"],
        load_time_s=report.get("teacher_load_time_s", 0.0),
        vocab_rows=info["vocab_rows"],
    )
    size_gb = sum(s["bytes"] for s in manifest["shards"]) / 1e9
    metrics = {
        "teacher_cache/hits": float(status == "hit"),
        "teacher_cache/misses": float(status == "built"),
        "teacher_cache/size_gb": size_gb,
        "teacher_cache/open_time_s": seconds,
    }
    if "build_time_s" in report:
        metrics["teacher_cache/build_time_s"] = report["build_time_s"]
    tracker.log_metrics(metrics)
    tracker.set_tags(
        {
            "firstsight.teacher_cache": status,
            "firstsight.teacher_cache_path": str(ctx.path),
            "firstsight.teacher_cache_key": ctx.key,
        }
    )
    log.info(
        "teacher-logit cache %s: %s (%d samples, %d answer tokens, top-%d, %.3f GB, %.1f s)",
        status,
        ctx.path,
        manifest["num_samples"],
        manifest["num_rows"],
        manifest["top_k"],
        size_gb,
        seconds,
    )
    return TeacherCache(ctx, tracker, manifest, arrays, status, teacher, metrics)
