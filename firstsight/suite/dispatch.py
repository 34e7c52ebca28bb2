"""Task dispatch: validate the composed config, open the job's MLflow run, run the task.

Each task registers here under its `task.name`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from firstsight.config.record import config_record
from firstsight.config.specs import tracking_spec
from firstsight.core.errors import FirstSightError, RunFailed
from firstsight.core.job import job_output_dir, write_job_metrics
from firstsight.core.signals import STOP, Preempted
from firstsight.suite.validate import validate


def _distill(cfg: DictConfig, tracker: Any, resume_point: Any = None, world: Any = None) -> Dict[str, float]:
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.tasks.distill import Stage, distill, out_of_memory_reported

    stage = Stage()  # where the job is, for the message of an out-of-memory error
    with out_of_memory_reported(cfg, stage):  # an OOM: one line with the step, batch and memory figures
        return distill(cfg, tracker, resume_point, world, stage)


def _profile(cfg: DictConfig, tracker: Any) -> Dict[str, float]:
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.tasks.profile import profile

    return profile(cfg, tracker)


def _evaluate(cfg: DictConfig, tracker: Any) -> Dict[str, float]:
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.tasks.evaluate import evaluate

    return evaluate(cfg, tracker)


def _report(cfg: DictConfig, tracker: Any) -> Dict[str, float]:
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.tasks.report import report

    return report(cfg, tracker)


def _export(cfg: DictConfig, tracker: Any) -> Dict[str, float]:
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.tasks.export import export

    return export(cfg, tracker)


TASKS: Dict[str, Callable[[DictConfig, Any], Dict[str, float]]] = {
    "distill": _distill,
    "profile": _profile,
    "evaluate": _evaluate,
    "export": _export,
    "report": _report,
}


def run_task(cfg: DictConfig) -> Dict[str, float]:
    """Run one job; user errors end it with a one-line message and exit status 2."""
    with exit_on_user_error():
        validate(cfg, tasks=TASKS)
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.core.world import setup

    world = setup(cfg.hardware)  # several processes (torchrun / SLURM tasks): join their group; else SINGLE
    try:
        metrics = _run_in_process(cfg, world)
    finally:
        world.close()
    if world.is_main:
        with exit_on_user_error():  # a full disk: one line and exit status 2
            write_job_metrics(metrics)
    return metrics


def _run_in_process(cfg: DictConfig, world: Any) -> Dict[str, float]:
    task: Callable[..., Dict[str, float]] = TASKS[cfg.task.name]
    record = config_record(cfg)  # resolved once: the resume check and the run's params read it
    resume_point = None
    if cfg.task.name == "distill":  # a requeued/restarted job continues its checkpoint and MLflow run
        # deferred: a bad config fails in one line before torch, transformers and mlflow load
        from firstsight.training.resume import locate, read_point

        with exit_on_user_error():
            resume_point = locate(cfg.train, record, job_output_dir()) if world.is_main else None
        if world.active:  # rank 0 found (and verified) it; the others read the same one
            path = world.broadcast(str(resume_point.path) if resume_point else None)
            resume_point = read_point(Path(path)) if path and not world.is_main else resume_point
        task = functools.partial(task, resume_point=resume_point, world=world)
    # deferred: a bad config fails in one line before torch, transformers and mlflow load
    from firstsight.tracking.tracker import job_tracker

    run_id = resume_point.run_id if resume_point else None
    try:
        with (
            STOP.installed(),
            exit_on_user_error(),
            job_tracker(tracking_spec(cfg, record), run_id=run_id, enabled=world.is_main) as tracker,
        ):
            return task(cfg, tracker)
    except Preempted as stop:  # the run is marked KILLED; a checkpoint was written if training had begun
        print(f"{stop}; run the same command again (or let SLURM requeue it) to resume", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """A FirstSightError becomes `error: <message>` on stderr and exit status 2 (the traceback
    only with HYDRA_FULL_ERROR=1); anything else propagates as a bug. A run-time failure
    (firstsight.core.errors.RunFailed: out of memory, a non-finite loss) of one point of a sweep that
    Hydra's basic launcher runs in this process is raised as SweepPointFailed instead: Hydra marks
    that point failed, runs the others, then ends the sweep with the first failure (exit status 1);
    an exit here would end the sweep at once."""
    failed = None
    try:
        yield
    except FirstSightError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        if not (isinstance(err, RunFailed) and _in_process_sweep()):
            raise SystemExit(2) from None
        failed = str(err)
    if failed is not None:  # raised outside the except block: the failed job's frames (and memory) are let go
        raise SweepPointFailed(f"error: {failed}")


class SweepPointFailed(CompactHydraException):
    """A point of an in-process sweep failed at run time; Hydra prints this message, no traceback."""


def _in_process_sweep() -> bool:
    """This job is one point of a multirun whose launcher runs its jobs in this process (Hydra's basic one)."""
    try:
        hydra_cfg = HydraConfig.get()
    except Exception:  # composed with the compose API or by hand: no Hydra context
        return False
    return hydra_cfg.mode == RunMode.MULTIRUN and "BasicLauncher" in str(hydra_cfg.launcher.get("_target_", ""))
