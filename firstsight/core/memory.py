"""Memory budgets: "does this configuration fit this device?" as a measured result.

`hardware.memory_budget_gb` (GB = 10^9 bytes, like every *_gb metric; presets `hardware=edge_4gb`,
`edge_8gb`, `edge_16gb`) is judged by the profile task:

- on CUDA the process is capped before anything is loaded
  (`torch.cuda.set_per_process_memory_fraction(budget / total)`), so the caching allocator refuses
  to grow past the budget; the verdict compares the measured peak
  (`torch.cuda.max_memory_allocated`) with the budget, and an out-of-memory while loading or
  profiling is the verdict "does not fit" — the run finishes normally, it never fails the sweep.
  The CUDA context and other memory outside PyTorch's allocator are not counted (basis
  `cuda_allocator`);
- on the CPU nothing is capped: the budget is compared with the process's measured peak resident
  set (VmHWM), which includes the Python interpreter and its libraries (basis `cpu_rss`).

Logged: metrics `edge/fits` (1/0), `edge/budget_gb`, `edge/peak_gb` (on an out-of-memory: the peak
reached before it), `edge/headroom_gb` (budget − peak; not on an out-of-memory), and tags
`firstsight.edge.basis` (cuda_allocator | cpu_rss), `firstsight.edge.verdict` (fits | does not fit),
`firstsight.edge.reason` (one line saying why) and, on an out-of-memory, `firstsight.edge.oom_stage`
(loading | profiling).

`verdict` is pure and `run_within_budget` takes the work as a callable, so the verdict logic and
the out-of-memory path are tested on a CPU by injecting the exception. torch is imported inside
functions only.
"""

from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterator, Optional, Tuple, TypeVar

import torch

from firstsight.core.errors import FirstSightError

if TYPE_CHECKING:  # the section's type only: config sits above core
    from firstsight.config.schema import HardwareConfig

GB = 1e9
CUDA_BASIS = "cuda_allocator"
CPU_BASIS = "cpu_rss"
FITS = "fits"
DOES_NOT_FIT = "does not fit"
T = TypeVar("T")


@dataclass
class EdgeResult:
    fits: bool
    metrics: Dict[str, float] = field(default_factory=dict)
    tags: Dict[str, str] = field(default_factory=dict)


def budget_fraction(budget_gb: float, total_bytes: int) -> float:
    """The share of the device's memory a budget allows (for set_per_process_memory_fraction)."""
    if not (math.isfinite(budget_gb) and budget_gb > 0):
        raise FirstSightError(f"hardware.memory_budget_gb={budget_gb!r} must be a positive number of GB")
    fraction = budget_gb * GB / total_bytes
    if fraction > 1:
        raise FirstSightError(
            f"hardware.memory_budget_gb={budget_gb:g} is more than this GPU's {total_bytes / GB:.1f} GB: "
            f"choose a budget of at most that, or null (no budget)"
        )
    return fraction


def apply_memory_budget(budget_gb: float, device: str) -> Tuple[str, Dict[str, str]]:
    """Cap a CUDA process at the budget (before anything is loaded); the basis of the verdict and
    tags describing the cap."""
    if device != "cuda":
        return CPU_BASIS, {}
    index = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = budget_fraction(budget_gb, total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return CUDA_BASIS, {
        "firstsight.edge.memory_fraction": f"{fraction:.6f}",
        "firstsight.edge.device_total_gb": f"{total / GB:.3f}",
    }


@contextlib.contextmanager
def uncapped(device: str) -> Iterator[None]:
    """Lift a CUDA memory cap for scaffolding that is not the model's cost (the unquantized copy a
    random-weight model is quantized from), then put it back with that memory released."""
    if device != "cuda":
        yield
        return
    fraction = torch.cuda.get_per_process_memory_fraction()
    if fraction >= 1.0:
        yield
        return
    torch.cuda.set_per_process_memory_fraction(1.0)
    try:
        yield
    finally:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(fraction)


def is_out_of_memory(err: BaseException) -> bool:
    """PyTorch's out-of-memory error (torch.OutOfMemoryError, alias torch.cuda.OutOfMemoryError), or a
    RuntimeError saying so (kernels that allocate outside the caching allocator report it that way)."""
    if type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def verdict(
    budget_gb: float, peak_gb: float, basis: str, oom: Optional[str] = None, oom_stage: Optional[str] = None
) -> EdgeResult:
    """Fits when no out-of-memory happened and the measured peak is within the budget."""
    metrics = {"edge/budget_gb": float(budget_gb), "edge/peak_gb": float(peak_gb)}
    what = "peak allocated" if basis == CUDA_BASIS else "peak RSS"
    tags = {"firstsight.edge.basis": basis}
    if oom is not None:
        fits = False
        reason = (
            f"out of memory while {oom_stage or 'running'} under a {budget_gb:g} GB budget "
            f"({what} before it: {peak_gb:.3f} GB): {oom}"
        )
        tags["firstsight.edge.oom_stage"] = oom_stage or "running"
    else:
        fits = peak_gb <= budget_gb
        metrics["edge/headroom_gb"] = float(budget_gb - peak_gb)
        sign = "<=" if fits else ">"
        reason = f"{what} {peak_gb:.3f} GB {sign} budget {budget_gb:g} GB (headroom {budget_gb - peak_gb:.3f} GB)"
    metrics["edge/fits"] = 1.0 if fits else 0.0
    tags["firstsight.edge.verdict"] = FITS if fits else DOES_NOT_FIT
    tags["firstsight.edge.reason"] = reason[:4000]
    return EdgeResult(fits=fits, metrics=metrics, tags=tags)


def run_within_budget(
    work: Callable[[], T],
    budget_gb: float,
    basis: str,
    peak_gb: Callable[[], float],
    stage: Callable[[], str] = lambda: "running",
) -> Tuple[Optional[T], EdgeResult]:
    """Run `work` under the budget: (its result, the verdict), or (None, "does not fit") when it ran
    out of memory under a CUDA cap. Any other error — and an out-of-memory on the CPU, which is the
    machine's limit, not the budget's — propagates."""
    oom: Optional[str] = None
    try:
        result: Optional[T] = work()
    except Exception as err:  # noqa: BLE001 - filtered right below
        if basis != CUDA_BASIS or not is_out_of_memory(err):
            raise
        oom = (str(err).strip().splitlines() or [type(err).__name__])[0][:500]
        result = None
    # outside the except block: the traceback (and the tensors its frames held) is released
    if oom is not None:
        _release_memory()
    return result, verdict(budget_gb, peak_gb(), basis, oom=oom, oom_stage=stage() if oom else None)


def _release_memory() -> None:
    gc.collect()
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort after an out-of-memory
        pass


def describe(result: EdgeResult) -> str:
    return f"edge: {result.tags['firstsight.edge.verdict']} ({result.tags['firstsight.edge.reason']})"


def budget_of(hardware: HardwareConfig) -> Optional[float]:
    """hardware.memory_budget_gb, or None (no budget)."""
    value = hardware.get("memory_budget_gb")
    return None if value is None else float(value)
