"""Measured performance figures: peak memory and steady-state throughput.

Peak memory is `torch.cuda.max_memory_allocated` on CUDA (logged as perf/peak_vram_gb) and the
process's peak resident set (VmHWM, reset per job through /proc/self/clear_refs) on the CPU
(logged as perf/peak_rss_gb): never a VRAM figure where there is no VRAM.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

log = logging.getLogger(__name__)

GB = 1e9


class PeakMemory:
    """Peak memory since `reset()`, under the metric name of what it measures."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.scope = "job"

    def reset(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # writing 5 resets the peak RSS (VmHWM) of this process (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.scope = "process"  # peak since the process started (earlier jobs of a sweep included)

    @property
    def metric_name(self) -> str:
        return "perf/peak_vram_gb" if self.device_type == "cuda" else "perf/peak_rss_gb"

    def peak_gb(self) -> float:
        if self.device_type == "cuda":
            return torch.cuda.max_memory_allocated() / GB
        return vm_hwm_bytes() / GB


def available_host_memory_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo: what the host can still give processes without swapping
    (None where there is no /proc/meminfo)."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def vm_hwm_bytes() -> int:
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_bytes(path: str, key: str) -> Optional[int]:
    """The `key:` line of a /proc file (its value in kB) in bytes; None if it is not there."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclass
class ThroughputMeter:
    """Samples and tokens per second over the steps after `warmup_steps` (first steps excluded:
    allocator growth, lazy initialisation and caches make them unrepresentative).

    A run too short for its warm-up (train.max_steps <= train.throughput_warmup_steps, a smoke run)
    is not refused: it measures what it can, the steps after its first (where allocation and lazy
    initialisation fall), and a one-step run logs no throughput, only perf/measured_steps = 0.
    Either way `summary` warns once, naming the steps measured."""

    warmup_steps: int
    steps: List[Tuple[float, int, int]] = field(default_factory=list)  # (seconds, samples, tokens) per step

    def add_step(self, seconds: float, samples: int, tokens: int) -> None:
        self.steps.append((seconds, samples, tokens))

    def summary(self) -> Dict[str, float]:
        warmup = self.warmup_steps
        if self.steps and len(self.steps) <= warmup:  # every step fell in the warm-up: leave the first one out
            warmup = 1
            self._warn_short(warmup)
        measured = self.steps[warmup:]
        seconds = sum(s for s, _, _ in measured)
        if not measured or seconds <= 0:
            return {"perf/measured_steps": 0.0} if self.steps else {}
        return {
            "perf/throughput_samples_per_s": sum(n for _, n, _ in measured) / seconds,
            "perf/throughput_tokens_per_s": sum(t for _, _, t in measured) / seconds,
            "perf/measured_steps": float(len(measured)),
        }

    def _warn_short(self, warmup: int) -> None:
        ran = len(self.steps)
        what = (
            "throughput is not measured (no perf/throughput_* metrics; perf/measured_steps = 0)"
            if ran - warmup <= 0
            else f"throughput is measured on the last {ran - warmup} of them only (the first one left out), "
            "so it is not a steady-state figure"
        )
        log.warning(
            "this run had %d optimizer step(s), no more than train.throughput_warmup_steps=%d: %s. "
            "For a throughput to compare, run more steps than the warm-up (train.max_steps).",
            ran,
            self.warmup_steps,
            what,
        )


class StepTimer:
    """Wall time of one step; synchronises CUDA so queued kernels are counted."""

    def __init__(self, device_type: str):
        self.device_type = device_type

    def _sync(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()

    def __enter__(self) -> StepTimer:
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start
