"""Stop signals (SIGUSR2, SIGTERM): a job stopped by one ends as Preempted, after its checkpoint when in training."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

log = logging.getLogger(__name__)


class Preempted(BaseException):
    """A stop signal ended the job (after the checkpoint, if it came during training). A
    BaseException, like KeyboardInterrupt: the job's run is marked KILLED, not FAILED."""

    def __init__(self, signum: int, step: Optional[int], checkpoint: Optional[Path], exit_code: Any = None):
        where = (
            f"after step {step}; checkpoint {checkpoint}"
            if step is not None
            else "before training; nothing to checkpoint"
        )
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum if exit_code is None else exit_code  # as the signal's default action reports


class StopSignals:
    """The job's handling of SIGUSR2 and SIGTERM (`installed()` for the whole job).

    Inside a training loop (`deferred()`) a signal only sets `requested`; the loop writes a
    checkpoint at the end of the step and calls `pass_on`. Outside one, it is passed on at once.
    Passing on = what would have happened without us: a Python handler that was there before is
    called (submitit's requeues the job and exits, which becomes Preempted; its SIGTERM `bypass`
    returns and training goes on), an ignored signal stays ignored, and the default action
    (termination) becomes Preempted, so the job's MLflow run is marked KILLED before it exits."""

    def __init__(self) -> None:
        self.requested: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        self._deferring = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        for name in STOP_SIGNALS:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)
        try:
            yield self
        finally:
            for number, handler in self._previous.items():
                signal.signal(number, handler)
            self._previous.clear()
            self.requested = None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[StopSignals]:
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self._deferring:
            if self.requested is None:
                log.warning("%s received: stopping after this step, with a checkpoint", signal.Signals(signum).name)
            self.requested = signum
            return
        self._pass_on(signum, None, None)

    def pass_on(self, step: int, checkpoint: Optional[Path], end_job: bool = False) -> None:
        """After the checkpoint that a requested stop asked for. `end_job`: stop even if the
        previous handler returns (a data-parallel job: its processes must stop together)."""
        signum, self.requested = self.requested, None
        if signum is not None:
            self._pass_on(signum, step, checkpoint)
            if end_job:
                raise Preempted(signum, step, checkpoint)

    def _pass_on(self, signum: int, step: Optional[int], checkpoint: Optional[Path]) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if previous == signal.SIG_IGN:
            return
        if callable(previous):
            try:
                previous(signum, None)
            except SystemExit as stop:
                raise Preempted(signum, step, checkpoint, exit_code=stop.code) from None
            return
        raise Preempted(signum, step, checkpoint)


STOP = StopSignals()  # one per process: signal handlers are process-wide


STOP_SIGNALS = ("SIGUSR2", "SIGTERM")
