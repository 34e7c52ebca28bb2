"""What the GPU tests share: the marks that run them only where CUDA is, a tracker that keeps what a
task logs, GPU memory handed back between tests, a test run alone in a process of its own, and the
greedy-decoding comparison that allows near-ties.

The GPU tier: `HF_HUB_OFFLINE=1 python -m pytest -q -m gpu tests/gpu` on a CUDA machine (docs/testing.md).
Without CUDA every test here is skipped with the reason "needs CUDA".
"""

from __future__ import annotations

import functools
import gc
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
OWN_PROCESS = "FIRSTSIGHT_GPU_OWN_PROCESS"  # set (to its node id) in the process a test runs alone in
OWN_PROCESS_TIMEOUT_S = 900

GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs CUDA (the GPU tier: HF_HUB_OFFLINE=1 python -m pytest -q -m gpu tests/gpu)",
    ),
]


def release_cuda() -> None:
    """Hand the caching allocator's memory back and lift any per-process cap, so that one test's
    models and limits never reach the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def in_own_process() -> bool:
    """Whether this is the process of its own that in_a_process_of_its_own started for a test."""
    return OWN_PROCESS in os.environ


def in_a_process_of_its_own(test: Callable) -> Callable:
    """Decorate a test to run alone in a new Python process (pytest on its node id), where nothing
    an earlier test left behind can hold GPU memory: empty_cache() hands back only the caching
    allocator's free blocks, not cuBLAS's per-stream workspaces, graph pools or what a failed
    test's traceback keeps alive. The test here passes if it passed there and fails with that
    process's output otherwise; its fixtures are set up in both."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        node = os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]  # "<node id> (call)"
        if os.environ.get(OWN_PROCESS) == node:
            return test(*args, **kwargs)
        basetemp = tempfile.mkdtemp(prefix="firstsight-gpu-own-process-")
        command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu"]
        try:
            done = subprocess.run(
                [*command, f"--basetemp={basetemp}", node],
                cwd=ROOT,
                env=dict(os.environ, **{OWN_PROCESS: node}),
                capture_output=True,
                text=True,
                timeout=OWN_PROCESS_TIMEOUT_S,
            )
        finally:
            shutil.rmtree(basetemp, ignore_errors=True)
        output = (done.stdout + done.stderr)[-8000:]
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        if done.returncode == 0 and "1 passed" in summary:
            return None
        if done.returncode == 0 and "1 skipped" in summary:
            pytest.skip(f"skipped in a process of its own: {output[-500:]}")
        pytest.fail(f"failed in a process of its own (exit {done.returncode}):\n{output}", pytrace=False)

    return run


class RecordingTracker:
    """Stands in for the job's MLflow run: every metric per step, and the tags, as the task logged them."""

    run_id = None

    def __init__(self):
        self.steps: Dict[int, Dict[str, float]] = {}
        self.tags: Dict[str, str] = {}

    @property
    def metrics(self) -> Dict[str, float]:
        """The latest value of each metric, whatever its step."""
        latest: Dict[str, float] = {}
        for step in sorted(self.steps):
            latest.update(self.steps[step])
        return latest

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        self.steps.setdefault(step, {}).update({k: float(v) for k, v in metrics.items()})

    def set_tags(self, tags: Dict[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_text(self, *args: Any, **kwargs: Any) -> None: ...
    def log_artifacts(self, *args: Any, **kwargs: Any) -> None: ...
    def log_model(self, *args: Any, **kwargs: Any) -> None: ...
    def flush(self) -> None: ...


# Logit tolerance |ours - generate's| <= RTOL * max|generate's logit| + ATOL, per dtype. bf16: the
# one benchmarks/generation.py and tests/unit/test_generation.py use (8 significant bits, rounding in
# another order). fp32: the static cache's attention (a longer, masked cache) and the compiled
# step's fused kernels reorder float32 sums only.
LOGIT_TOLERANCE = {torch.float32: (1e-3, 1e-3), torch.bfloat16: (2**-6, 1e-2)}


def near_tie_margin(logits: Any, dtype: Any) -> float:
    """Two picks whose logits are within this of each other may go either way: twice the tolerance."""
    rtol, atol = LOGIT_TOLERANCE[dtype]
    return 2 * (rtol * float(logits.abs().max()) + atol)


def assert_greedy_tokens_follow(reference: Any, got: Any, dtype: Any, what: str) -> List[Optional[int]]:
    """`got` (a Generated) picks `reference`'s tokens (model.generate's, with its logits recorded),
    row by row, up to the first near-tie where the two part: a step whose top-2 logits in generate's
    own logits are within `near_tie_margin`, `got`'s pick being within that margin of generate's
    best too. After it that row is not compared. A pick that differs at any other step fails.
    Where `got` recorded logits too, they must match generate's within the dtype's tolerance at
    every step compared. Where no row parted, the tokens (and their number: the stop) must be
    generate's exactly. Returns, per row, the step where it parted at a near-tie (None: never)."""
    ref_tokens, tokens = reference.tokens.cpu(), got.tokens.cpu()
    ref_logits = reference.logits.float().cpu()
    ours_logits = got.logits.float().cpu() if got.logits is not None else None
    rtol, atol = LOGIT_TOLERANCE[dtype]
    steps = min(ref_tokens.shape[1], tokens.shape[1])
    parted: List[Optional[int]] = []
    for row in range(ref_tokens.shape[0]):
        at = None
        for step in range(steps):
            theirs = ref_logits[step, row]
            if ours_logits is not None:  # fed the same tokens so far: the same logits, within tolerance
                diff = float((ours_logits[step, row] - theirs).abs().max())
                allowed = rtol * float(theirs.abs().max()) + atol
                assert diff <= allowed, (
                    f"{what}: row {row}, step {step}: logits differ from generate's by {diff:.3g} "
                    f"(tolerance {allowed:.3g}) although the tokens fed so far are the same"
                )
            ours, expected = int(tokens[row, step]), int(ref_tokens[row, step])
            if ours == expected:
                continue
            top2 = theirs.topk(2).values
            margin = near_tie_margin(theirs, dtype)
            tie, gap = float(top2[0] - top2[1]), float(top2[0] - theirs[ours])
            assert tie <= margin and gap <= margin, (
                f"{what}: row {row}, step {step}: token {ours} where generate picked {expected}, and that "
                f"was no near-tie (generate's top-2 logits {tie:.3g} apart, the pick {gap:.3g} below its "
                f"best; margin {margin:.3g}); row {tokens[row].tolist()} vs generate's {ref_tokens[row].tolist()}"
            )
            at = step  # a near-tie went the other way: the row's later tokens follow another prefix
            break
        parted.append(at)
    if all(at is None for at in parted):
        assert tokens.tolist() == ref_tokens.tolist(), (
            f"{what}: no row parted from generate's at a near-tie, yet the tokens differ "
            f"(shapes {tuple(tokens.shape)} vs {tuple(ref_tokens.shape)}): {tokens.tolist()} vs {ref_tokens.tolist()}"
        )
    return parted


def assert_finite(metrics: Dict[str, float], what: str) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    assert not bad, f"{what}: non-finite values {bad}"
