"""hydra-submitit-launcher's launch, reporting every failed sweep point instead of the first.

The `hardware=slurm*` choices select `hydra/launcher: submitit_slurm` and point its `_target_` at
`hydra_plugins.firstsight_launcher.launcher.SlurmLauncher` (Hydra only instantiates launchers from
the `hydra_plugins` package), whose `launch` is `launch` here.

Upstream's `launch` ends in `[job.results()[0] for job in jobs]`: the first job that died on SLURM
(cancelled, out of memory, over its time limit, or ended by a user error's exit status) raises
submitit's bare `UncompletedJobError` and the later points are not waited for; a point whose task
raised comes back as a failed `JobReturn`, which Hydra re-raises without saying where its log is.

Here every point is waited for and the finished ones keep their results (each job logged its own
MLflow run). If any point failed, the sweep ends with exit status 1 and one entry per failed point:
its job number and overrides, why it failed (SLURM's state, or the exception) and its log files.
The same report goes to `<sweep dir>/failed_jobs.json`, which the sweep's MLflow callback reads to
tag the parent run and to close the runs of killed jobs (they never closed their own).

Imported by the submitting process only, when a sweep launches.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

FAILED_JOBS_FILE = "failed_jobs.json"

# What SLURM's final state of a job means, and what to change (sacct's State column).
_STATE_HINTS = {
    "OUT_OF_MEMORY": "ran out of memory: ask for more (hydra.launcher.mem_gb) or use less (hardware.batch_size)",
    "TIMEOUT": "hit its time limit: raise hydra.launcher.timeout_min",
    "CANCELLED": "was cancelled",
    "FAILED": "exited with an error",
    "NODE_FAIL": "lost its node",
    "PREEMPTED": "was preempted",
    "BOOT_FAIL": "could not start on its node",
    "DEADLINE": "missed its deadline",
}


class SweepJobsFailed(CompactHydraException):
    """Some points of a sweep failed; the message lists them (Hydra prints it without a traceback)."""


@dataclass
class PointFailure:
    job_num: int
    overrides: str
    reason: str
    logs: List[str]
    slurm_job_id: Optional[str] = None
    state: Optional[str] = None  # SLURM's state, when the job died outside Python

    def describe(self) -> str:
        where = "; ".join(self.logs) if self.logs else "no log written"
        job = f" (SLURM job {self.slurm_job_id})" if self.slurm_job_id else ""
        return f"  #{self.job_num} {self.overrides or '(no overrides)'}{job}\n    why: {self.reason}\n    logs: {where}"


def _error_line(text: str) -> Optional[str]:
    """The line of a job's stderr that says what went wrong: our `error: ...`, or an exception."""
    pattern = re.compile(r"^(error: |[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b)")
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and not line.startswith(("srun:", "slurmstepd:")) and pattern.match(line):
            return line[:500]
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _logs(job: Any, sweep_dir: Path, job_num: int) -> List[str]:
    paths = [Path(job.paths.stderr), Path(job.paths.stdout)]
    paths += sorted((sweep_dir / str(job_num)).glob("*.log"))  # the Hydra job's own log (run.log)
    return [str(p.resolve()) for p in paths if p.exists()]


# Final states of failed jobs: a missing result will not come (and would not change that the
# point failed; its stderr says why), so they get no grace period.
_FAILED_STATES = ("FAILED", "OUT_OF_MEMORY", "TIMEOUT", "CANCELLED", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE")


def wait_all(jobs: Sequence[Any], poll_s: float = 1.0) -> None:
    """Wait until every job is over (result written, or SLURM says it ended), then for results
    still missing from jobs that did not fail (SLURM says COMPLETED, the file is not visible yet),
    up to submitit's allowance for a slow shared filesystem (15 s): once for the whole sweep, not
    once per failed job as `job.results()` alone would wait."""
    while not all(job.done() for job in jobs):
        time.sleep(poll_s)

    def may_still_write(job: Any) -> bool:
        if Path(job.paths.result_pickle).exists():
            return False
        return not str(getattr(job, "state", "") or "").upper().startswith(_FAILED_STATES)

    waiting = [job for job in jobs if may_still_write(job)]
    grace_s = max((getattr(job, "_results_timeout_s", 15) for job in waiting), default=0)
    deadline = time.monotonic() + grace_s
    while waiting and time.monotonic() < deadline:
        time.sleep(poll_s)
        waiting = [job for job in waiting if not Path(job.paths.result_pickle).exists()]
    for job in jobs:
        job._results_timeout_s = 0  # the allowance was taken above


def failure_of(
    job: Any,
    error: Optional[BaseException],
    job_return: Optional[JobReturn],
    overrides: Sequence[str],
    job_num: int,
    sweep_dir: Path,
) -> Optional[PointFailure]:
    """The failure of one point, or None when it finished: `error` is what `job.results()` raised
    (the job died outside Python's reach, or submitit caught an exception), `job_return` what it
    returned (FAILED when the task raised and Hydra caught it)."""
    point = " ".join(filter_overrides(list(overrides)))
    logs = _logs(job, sweep_dir, job_num)
    job_id = str(getattr(job, "job_id", "")) or None
    if error is None:
        if job_return is None or job_return.status != JobStatus.FAILED:
            return None
        exc = job_return._return_value  # reading .return_value would raise it
        return PointFailure(job_num, point, f"{type(exc).__name__}: {exc}"[:1000], logs, job_id)
    state = str(getattr(job, "state", "") or "UNKNOWN")
    head = state.split()[0].upper() if state.strip() else "UNKNOWN"
    detail = _error_line(_read(Path(job.paths.stderr)))
    if head in _STATE_HINTS:
        reason = f"the job {_STATE_HINTS[head]} (SLURM state {state})"
    elif head in ("COMPLETED", "UNKNOWN"):  # ran to the end but left no result: submitit's error says why
        reason = f"the job left no result (SLURM state {state})"
        detail = detail or _error_line(str(error))
    else:
        reason = f"SLURM state {state}"
    if detail:
        reason += f": {detail}"
    return PointFailure(job_num, point, reason, logs, job_id, state)


def collect(
    jobs: Sequence[Any], job_overrides: Sequence[Sequence[str]], initial_job_idx: int, sweep_dir: Path
) -> List[JobReturn]:
    """Wait for every job; return their JobReturns, or raise SweepJobsFailed naming each failed point
    (after writing the report to <sweep_dir>/failed_jobs.json)."""
    wait_all(jobs)
    results: List[JobReturn] = []
    failures: List[PointFailure] = []
    for offset, (job, overrides) in enumerate(zip(jobs, job_overrides)):
        num = initial_job_idx + offset
        error: Optional[BaseException] = None
        job_return: Optional[JobReturn] = None
        try:
            job_return = job.results()[0]
            results.append(job_return)
        except Exception as err:  # submitit's UncompletedJobError / FailedJobError
            error = err
        failure = failure_of(job, error, job_return, overrides, num, sweep_dir)
        if failure is not None:
            log.error("sweep point #%d failed: %s", num, failure.reason)
            failures.append(failure)
    if failures:
        path = (sweep_dir / FAILED_JOBS_FILE).resolve()
        path.write_text(json.dumps([asdict(f) for f in failures], indent=2))
        finished = len(jobs) - len(failures)
        raise SweepJobsFailed(
            f"error: {len(failures)} of {len(jobs)} sweep point(s) failed "
            f"({finished} finished and keep their results and MLflow runs):\n"
            + "\n".join(f.describe() for f in failures)
            + f"\n(report: {path})"
        )
    return results


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> List[JobReturn]:
    """`launch` of hydra-submitit-launcher 1.2.0's BaseSubmititLauncher, except that the results
    are collected by `collect` and a refused submission is reported plainly."""
    import submitit  # deferred: SLURM launches only; the sweep callback imports this module

    config, params, kind = launcher.config, launcher.params, launcher._EXECUTOR
    assert config is not None and len(job_overrides) > 0
    specific_init_keys = {"max_num_timeout"}
    init_params = {"folder": params["submitit_folder"]}
    init_params.update({f"{kind}_{k}": v for k, v in params.items() if k in specific_init_keys})
    executor = submitit.AutoExecutor(cluster=kind, **init_params)
    base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            k if k in base_keys else f"{kind}_{k}": v
            for k, v in params.items()
            if k not in specific_init_keys | {"submitit_folder"}
        }
    )

    sweep_dir = Path(str(config.hydra.sweep.dir))
    log.info(f"Submitit '{kind}' sweep output dir : {sweep_dir}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in config.hydra.sweep:
        os.chmod(sweep_dir, mode=int(str(config.hydra.sweep.mode), 8))
    job_params = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    try:
        jobs = executor.map_array(launcher, *zip(*job_params))
    except (submitit.core.utils.FailedSubmissionError, submitit.core.utils.FailedJobError) as err:
        # submitit raises FailedJobError(sbatch's stderr) when sbatch refuses the request
        raise SweepJobsFailed(
            f"error: {kind} refused the sweep's jobs: {str(err).strip()} "
            "(check hydra.launcher.partition, gpus_per_node, mem_gb, timeout_min against the cluster)"
        ) from None
    log.info("submitted %d job(s): %s", len(jobs), " ".join(str(j.job_id) for j in jobs))
    return collect(jobs, job_overrides, initial_job_idx, sweep_dir)
