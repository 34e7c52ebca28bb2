"""Preemption-safe training: resumable checkpoints, their manifest, and the stop signals.

A resumable checkpoint is one directory `<job output dir>/checkpoints/resume/step-NNNNNNN/`:

    trainable.safetensors   the trained tensors: the student's trainable parameters (all of them,
                            or only the LoRA adapters) and the extra ones (hidden-state projections)
    optimizer.pt            optimizer.state_dict() (AdamW moments), read back with weights_only=True
    state.json              step, scheduler and GradScaler state, data position, RNG states, the
                            MLflow run id, the resolved config and the last logged metrics
    manifest.json           size and sha256 of each file above; written last

It is written into a temporary sibling and renamed into place, so a kill at any moment leaves the
previous checkpoints whole; one whose manifest is missing or does not match its files (a disk
that filled up, a copy cut short) is skipped with a warning and the one before it is used.

Stop signals: during training, SIGUSR2 (SLURM's warning before a time limit or preemption, as
submitit asks for it) and SIGTERM only set a flag; at the end of the current optimizer step the
loop writes a checkpoint, then the signal goes on to the handler that was there before
(submitit's: requeue the job; none: the job ends with `Preempted`, its MLflow run marked KILLED,
exit status 128 + signal). See StopSignals.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import safetensors.torch
import torch
from hydra.utils import get_original_cwd
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import distribute_tensor

from firstsight.config.schema import TrainConfig
from firstsight.core.errors import FirstSightError
from firstsight.core.files import sha256_file, staged_dir
from firstsight.core.records import flatten_container
from firstsight.core.signals import STOP

log = logging.getLogger(__name__)

RESUME_SUBDIR = Path("checkpoints") / "resume"
MANIFEST = "manifest.json"
STATE = "state.json"
TENSORS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Config keys a resumed run may change: where and how it runs, not what it computes.
MAY_DIFFER = (
    "train.resume",
    "train.checkpoint_every_n_steps",
    "train.keep_checkpoints",
    "train.progress_bar",
    "train.log_every_n_steps",
    "train.eval_at_end",
    "train.eval_before",
    "train.eval_blind",
    "train.save_checkpoint",
    "tracking.",
    "cache_dir",
    "hardware.eval_batch_size",
    "hardware.name",
    "hardware.dataloader_workers",
    "hardware.num_threads",
    "hardware.device",
    "hardware.attn_implementation",
    "hardware.gradient_checkpointing",
    "teacher_cache.dir",
    # how fast, not what is computed: the same loss either way
    "train.logits",
    "train.fused_optimizer",
    "train.host_positions",
    "hardware.compile",
    "hardware.compile_memory_budget",
    "hardware.compile_cpp_wrapper",
    "hardware.generation",
    "hardware.batched_vision_attention",
    "hardware.grouped_decode_attention",
    "hardware.pad_to_multiple_of",
)


@dataclass
class ResumePoint:
    """A verified checkpoint to continue from."""

    path: Path
    step: int
    state: Dict[str, Any]

    @property
    def run_id(self) -> Optional[str]:
        return self.state.get("mlflow_run_id")

    @property
    def data_position(self) -> Dict[str, int]:
        return self.state["data_position"]


# ----------------------------------------------------------------------------- finding checkpoints


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / RESUME_SUBDIR


def step_dirs(root: Path) -> List[Path]:
    """Checkpoint directories under `root`, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def verify(path: Path) -> Optional[str]:
    """None if the checkpoint at `path` is whole, else why not."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError) as error:
        return f"unreadable manifest.json ({error})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict) and {"bytes", "sha256"} <= entry.keys() for entry in files.values()
    ):
        return "manifest.json does not list its files with their bytes and sha256"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if sha256_file(file) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def latest_valid(root: Path) -> Optional[Path]:
    """The newest whole checkpoint under `root`; broken ones are reported and skipped."""
    for path in step_dirs(root):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def _resume_source(asked: str, output_dir: Path) -> Optional[Path]:
    """The checkpoint `train.resume` asks for: auto = this job's own latest (a requeued or
    restarted job in the same output directory), never = none, else a path (a run's output
    directory, its checkpoints/resume directory, or one step directory)."""
    if asked == "never":
        return None
    if asked == "auto":
        return latest_valid(checkpoint_root(output_dir))
    path = Path(asked).expanduser()
    if not path.is_absolute():
        with contextlib.suppress(ValueError):  # outside a Hydra job: relative to the cwd
            path = Path(get_original_cwd()) / path
    if _STEP_DIR.match(path.name) and path.is_dir():
        problem = verify(path)
        if problem:
            raise FirstSightError(f"train.resume={asked!r}: that checkpoint is not usable: {problem}")
        return path
    for root in (path / RESUME_SUBDIR, path):
        if step_dirs(root):
            found = latest_valid(root)
            if found is None:
                raise FirstSightError(f"train.resume={asked!r}: no checkpoint under {root} is whole (see the warnings)")
            return found
    raise FirstSightError(
        f"train.resume={asked!r}: no resumable checkpoint there (expected a run's output directory, its "
        f"{RESUME_SUBDIR} directory or a step-NNNNNNN directory in it); valid values: auto, never or such a path"
    )


def locate(train: TrainConfig, record: Dict[str, Any], output_dir: Path) -> Optional[ResumePoint]:
    """The checkpoint `train.resume` names, checked against the job's config `record`, or None."""
    path = _resume_source(str(train.resume), output_dir)
    if path is None:
        return None
    point = read_point(path)
    differences = config_differences(point.state["config"], record)
    if differences:
        shown = "; ".join(differences[:8]) + ("; ..." if len(differences) > 8 else "")
        raise FirstSightError(
            f"cannot resume from {path}: the run it belongs to was configured differently ({shown}). "
            "Resume with the same settings, or start a new run with train.resume=never"
        )
    return point


def read_point(path: Path) -> ResumePoint:
    """The checkpoint at `path` (already verified) as a ResumePoint."""
    state = json.loads((path / STATE).read_text())
    return ResumePoint(path=path, step=int(state["step"]), state=state)


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """`key: saved → current` for every setting that changes what training computes."""
    old, new = flatten_container(saved), flatten_container(current)
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}"
        for k in keys
        if old.get(k) != new.get(k) and not any(k == m or (m.endswith(".") and k.startswith(m)) for m in MAY_DIFFER)
    ]


# ----------------------------------------------------------------------------- RNG states


def rng_states() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states: Dict[str, Any]) -> None:
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


# ----------------------------------------------------------------------------- stop signals


# ----------------------------------------------------------------------------- writing and reading


class Checkpointer:
    """Writes resumable checkpoints of a training loop and restores one into it.

    `record`: the job's config record, saved with each checkpoint; `tensors`: name → the trained tensors (trainable parameters, by their names in the unwrapped
    model, and extra ones); `writer`: this process writes (rank 0 of a multi-GPU job);
    `before_save`: called first (the tracker's flush, so the metrics of every step up to the
    checkpoint are in MLflow before a resume would skip those steps)."""

    def __init__(
        self,
        train: TrainConfig,
        record: Dict[str, Any],
        output_dir: Path,
        tensors: Dict[str, Any],
        run_id: Optional[str],
        resume: Optional[ResumePoint] = None,
        writer: bool = True,
        before_save: Optional[Callable[[], None]] = None,
        sharded_model: Optional[Any] = None,
    ):
        self.every = int(train.checkpoint_every_n_steps)
        self.keep = int(train.keep_checkpoints)
        self.root = checkpoint_root(output_dir)
        self.config = record  # the job's config record: a resume is checked against it
        self.tensors = tensors
        self.run_id = run_id
        self.resume = resume
        self.writer = writer
        self.before_save = before_save  # the tracker's flush: metrics up to a checkpoint are never lost with it
        # FSDP: the sharded module; every process takes part in gathering (and scattering) the
        # tensors and the optimizer state, which are written whole, as without sharding
        self.sharded_model = sharded_model
        self.last_saved: Optional[Path] = None

    def restore(self, optimizer: Any, scheduler: Any, scaler: Any) -> int:
        """Load the resume point into the tensors, optimizer, scheduler, scaler and RNGs; return
        the number of steps already done (0 without a resume point)."""
        if self.resume is None:
            return 0
        saved = load_file(str(self.resume.path / TENSORS))
        missing = sorted(set(self.tensors) - set(saved))
        unexpected = sorted(set(saved) - set(self.tensors))
        if missing or unexpected:
            raise FirstSightError(
                f"checkpoint {self.resume.path} does not hold this run's trained tensors "
                f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
            )
        with torch.no_grad():
            for name, tensor in self.tensors.items():
                if saved[name].shape != tensor.shape:
                    raise FirstSightError(
                        f"checkpoint {self.resume.path}: {name} has shape {tuple(saved[name].shape)}, "
                        f"this run's has {tuple(tensor.shape)}"
                    )
                if self.sharded_model is not None:  # this process's shard of the whole tensor
                    tensor.copy_(
                        distribute_tensor(saved[name].to(tensor.device), tensor.device_mesh, tensor.placements)
                    )
                else:
                    tensor.copy_(saved[name])
        optimizer_state = torch.load(self.resume.path / OPTIMIZER, map_location="cpu", weights_only=True)
        if self.sharded_model is not None:
            set_optimizer_state_dict(
                self.sharded_model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
            )
        else:
            optimizer.load_state_dict(optimizer_state)
        state = self.resume.state
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        log.info("resumed from %s (step %d)", self.resume.path, self.resume.step)
        return self.resume.step

    def due(self, step: int, last_step: int) -> bool:
        """A checkpoint after this step: a stop signal arrived, or every N steps (but not after the
        last step: the task saves the final student then)."""
        return STOP.requested is not None or (self.every > 0 and step % self.every == 0 and step < last_step)

    def save(
        self,
        step: int,
        optimizer: Any,
        scheduler: Any,
        scaler: Any,
        data_position: Dict[str, int],
        metrics: Dict[str, float],
    ) -> Optional[Path]:
        tensors, optimizer_state = self._gathered(optimizer)
        if not self.writer:
            return None

        if self.before_save is not None:
            self.before_save()

        target = self.root / f"step-{step:07d}"
        state = {
            "step": step,
            "mlflow_run_id": self.run_id,
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "data_position": data_position,
            "rng": rng_states(),
            "metrics": metrics,
            "config": self.config,
        }
        previous = self.last_saved or (self.resume.path if self.resume else None)  # a failed write keeps it
        kept = (
            f"the previous checkpoint {previous} is kept (rerunning the same command resumes from it)"
            if previous
            else "no earlier checkpoint of this run exists"
        )
        with staged_dir(str(target), kept=kept) as tmp:
            tmp_path = Path(tmp)
            safetensors.torch.save_file(tensors, str(tmp_path / TENSORS))  # module attribute: tests patch it
            torch.save(optimizer_state, tmp_path / OPTIMIZER)
            (tmp_path / STATE).write_text(json.dumps(state))
            files = {
                name: {"bytes": (tmp_path / name).stat().st_size, "sha256": sha256_file(tmp_path / name)}
                for name in (TENSORS, OPTIMIZER, STATE)
            }
            for name in files:  # on disk before the manifest says they are
                _fsync(tmp_path / name)
            (tmp_path / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
            _fsync(tmp_path / MANIFEST)
        self.last_saved = target
        self._prune()
        log.info("checkpoint written: %s", target)
        return target

    def _gathered(self, optimizer: Any) -> Any:
        """The tensors and optimizer state to write, whole and on the CPU (FSDP: gathered from
        every process's shards, a collective all processes take part in)."""
        if self.sharded_model is None:
            return {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, optimizer.state_dict()
        tensors = {k: v.detach().full_tensor().contiguous().cpu() for k, v in self.tensors.items()}
        state = get_optimizer_state_dict(
            self.sharded_model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return tensors, state

    def discard(self) -> None:
        """The run is complete (its final student saved): resumable checkpoints are no longer needed."""
        if self.writer:
            shutil.rmtree(self.root, ignore_errors=True)

    def _prune(self) -> None:
        """Keep the newest `keep` whole checkpoints (and the one a resume started from is no
        longer needed once a newer one is whole)."""
        whole = [p for p in step_dirs(self.root) if (p / MANIFEST).is_file()]
        for old in whole[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def named_trained_tensors(model: Any, extra_modules: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """name → tensor of what training changes: the model's trainable parameters (LoRA: only the
    adapters) and those of `extra_modules` (prefix → module, e.g. the hidden-state projections)."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for prefix, module in (extra_modules or {}).items():
        tensors.update({f"{prefix}.{name}": p for name, p in module.named_parameters() if p.requires_grad})
    return tensors
