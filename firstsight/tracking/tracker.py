"""One MLflow run per job: config as params, tags, buffered metrics, status on exit.

The store is `tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else MLflow's default
(sqlite:///mlflow.db in the working directory, which `mlflow ui` opens with no flags).
Jobs of a sweep hang under the sweep's parent run (created by firstsight.suite.callbacks).
Metrics are buffered and written with `log_batch`: one call per flush, not one per value.

A store that does not answer (SQLite "database is locked", a server that is down or times out) is
retried with exponential back-off (STORE_RETRY_DELAYS_S; an HTTP store only by MLflow itself, which
already retries connection errors and 429/5xx answers: MLFLOW_HTTP_REQUEST_MAX_RETRIES), then the job
fails with TrackingStoreError naming the store. Metrics that could not be logged are never dropped:
they go to `unflushed_metrics.jsonl` in the job's output directory, and the error says so.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import mlflow
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.entities import Metric, Param, RunTag
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

import firstsight
from firstsight.config.schema import TrackingConfig
from firstsight.config.specs import TrackingSpec
from firstsight.core.errors import FirstSightError
from firstsight.core.job import job_output_dir
from firstsight.core.records import flatten_container
from firstsight.core.signals import Preempted

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "FIRSTSIGHT_MLFLOW_PARENT_RUN_ID"
PARENT_RUN_FILE = "mlflow_parent_run_id"
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "torchao", "accelerate", "mlflow", "hydra-core")
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
# Waits (s) between attempts of a store call that failed transiently: 5 attempts over ~15 s of
# back-off (each SQLite attempt may itself wait up to 20 s for a lock: MLflow's busy_timeout).
STORE_RETRY_DELAYS_S: Sequence[float] = (1.0, 2.0, 4.0, 8.0)
UNFLUSHED_METRICS_FILE = "unflushed_metrics.jsonl"
# What a store that is busy or unreachable says (SQLite, SQLAlchemy, requests/urllib3 via MLflow)
_TRANSIENT_TEXT = (
    "database is locked",
    "database table is locked",
    "temporarily unavailable",
    "connection refused",
    "connection reset",
    "connection aborted",
    "max retries exceeded",
    "timed out",
    "timeout",
    "failed to establish a new connection",
    "name or service not known",
    "unable to open database",
    "server closed the connection",
    "too many requests",
    "bad gateway",
    "service unavailable",
)


def flatten_config(record: Dict[str, Any]) -> Dict[str, str]:
    """`{"precision.dtype": "bfloat16", ...}` for the config record (hydra's own node excluded)."""
    return flatten_container({k: v for k, v in record.items() if k != "hydra"})


def package_versions() -> Dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["firstsight"] = firstsight.__version__
    return versions


CODE_VERSION_TAG = "firstsight.code_version"
_GIT_TIMEOUT_S = 5.0


@functools.cache
def code_version(checkout: Optional[str] = None) -> str:
    """The git commit of the checkout the firstsight package is imported from (`checkout`: another
    directory), with `+dirty` when its tracked files have changes; "none" when that directory is
    not the root of a git checkout (an installed package) or git does not answer within a few
    seconds. Never raises: a run does not fail over it. Computed once per process (the jobs of one
    sweep process share it)."""
    if checkout is None:
        checkout = str(Path(__file__).resolve().parents[2])  # the checkout holding firstsight/
    if not (Path(checkout) / ".git").exists():  # site-packages inside some other repository is not a checkout
        return "none"

    def git(*args: str) -> Optional[str]:
        try:
            result = subprocess.run(
                ["git", "-C", checkout, *args], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "--verify", "HEAD")
    if not commit:
        return "none"
    changes = git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if changes else "" if changes is not None else "+unknown")


def resolve_tracking_uri(tracking: TrackingConfig) -> Optional[str]:
    return tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def absolute_tracking_uri(uri: Optional[str]) -> str:
    """The store a run went to, valid from any working directory (MLflow's default and relative
    sqlite paths are resolved against the current one)."""
    uri = uri or mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    return uri


# The MLflow UI opens an experiment on the view its kind names (the tag below): without it, MLflow 3
# guesses and opens on the GenAI view (traces, sessions). `custom_model_development` is the kind its
# experiment-type selector calls "Machine learning": the runs list, charts and compare pages.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def get_or_create_experiment(client: Any, name: str) -> str:
    """The id of experiment `name`, created with the training kind (EXPERIMENT_KIND) if missing; an
    existing experiment without a kind gets it (one a user set in the UI is left as it is)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if not experiment.tags.get(EXPERIMENT_KIND_TAG):
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # a concurrent job created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class TrackingStoreError(FirstSightError):
    """The MLflow tracking store did not answer, after the retries."""


def is_transient_store_error(err: BaseException) -> bool:
    """A store that is busy or unreachable (worth retrying), not a request it refused."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    if getattr(err, "error_code", None) == "TEMPORARILY_UNAVAILABLE":  # MLflow's SQL store: OperationalError
        return True
    if type(err).__name__ == "OperationalError":  # SQLAlchemy / sqlite3, raised before MLflow wraps it
        return True
    text = str(err).lower()
    return any(fragment in text for fragment in _TRANSIENT_TEXT)


def _is_http(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https", "databricks")


class StoreClient:
    """An MlflowClient (or any client) whose calls are retried with exponential back-off
    (STORE_RETRY_DELAYS_S) while the store fails transiently, then raise TrackingStoreError naming
    the store. HTTP stores are tried once here: MLflow already retries their requests. Once a call
    has failed for good the store counts as down, and later calls (closing the run) try once."""

    def __init__(self, client: Any, uri: str):
        self.client = client
        self.uri = uri
        self.down = False

    def __getattr__(self, name: str) -> Any:
        if (
            name.startswith("__") or name == "client"
        ):  # unpickling (submitit ships the sweep's callbacks): no client yet
            raise AttributeError(name)
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, attr, *args, **kwargs)

        return call

    def call(self, name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        delays = () if self.down or _is_http(self.uri) else tuple(STORE_RETRY_DELAYS_S)
        start = time.monotonic()
        for attempt in range(len(delays) + 1):
            try:
                return function(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - classified right below
                if not is_transient_store_error(err):
                    raise
                if attempt == len(delays):
                    self.down = True
                    raise TrackingStoreError(
                        self._unavailable(name, attempt + 1, time.monotonic() - start, err)
                    ) from err
                log.warning(
                    "MLflow store %s: %s failed (%s); attempt %d of %d in %.0f s",
                    self.uri,
                    name,
                    _first_line(err),
                    attempt + 2,
                    len(delays) + 1,
                    delays[attempt],
                )
                time.sleep(delays[attempt])
        raise AssertionError("unreachable")

    def _unavailable(self, name: str, attempts: int, seconds: float, err: BaseException) -> str:
        if _is_http(self.uri):
            hint = (
                "is the server running and reachable from here (python -m firstsight.tracking.server)? MLflow already "
                "retried the request (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)"
            )
        elif self.uri.startswith("sqlite:"):
            hint = (
                "another process holds the SQLite file locked, or it cannot be opened: jobs that run at once "
                "should log through a server (python -m firstsight.tracking.server; docs/sweeps-and-slurm.md)"
            )
        else:
            hint = "check that the store is reachable"
        tried = f"{attempts} attempts over {seconds:.0f} s" if attempts > 1 else "1 attempt"
        return (
            f"the MLflow tracking store {self.uri} is unavailable: {name} failed ({tried}): {_first_line(err)}; "
            f"{hint}. Or set tracking.tracking_uri to another store, or tracking.enabled=false"
        )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


class JobTracker:
    """The MLflow run of one job. `output_dir`: where metrics the store would not take are
    written (unflushed_metrics.jsonl; default: the job's output directory)."""

    def __init__(self, client: Any, run_id: str, output_dir: Optional[Path] = None):
        self.client = client
        self.run_id = run_id
        self.output_dir = output_dir
        self._metrics: List[Any] = []

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        timestamp = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), timestamp, step) for k, v in metrics.items())

    def set_tags(self, tags: Dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, local_dir: str, artifact_path: Optional[str] = None) -> None:
        """Every file under `local_dir`, as artifacts of this run (under `artifact_path`)."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_model(self, model_dir: str, name: str = "student") -> str:
        """The transformers model saved in `model_dir` (weights and processor: a distilled or exported
        student) as an MLflow model of this run: transformers flavour, an image-text-to-text pipeline,
        shown in the experiment's Models tab and registrable from there. Returns its models:/ URI."""
        from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline  # deferred: log_model only

        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto", local_files_only=True)
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        versions = package_versions()
        requirements = [f"{p}=={versions[p]}" for p in ("transformers", "torch") if versions[p] != "not installed"]
        was_set = mlflow.is_tracking_uri_set()
        previous = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(self.client.uri)  # MLflow logs a model to the globally set store
        try:
            log_model = functools.partial(
                mlflow.transformers.log_model,
                pipeline("image-text-to-text", model=model, processor=processor),
                name=name,
                run_id=self.run_id,
                pip_requirements=requirements,  # not inferred: MLflow would load the model again to find them
            )
            info = self.client.call("log_model", log_model)
        finally:
            mlflow.set_tracking_uri(previous if was_set else None)
        self.set_tags({"firstsight.logged_model": info.model_uri})
        return info.model_uri

    def flush(self) -> None:
        """Log the buffered metrics. If the store does not take them, they are written to
        unflushed_metrics.jsonl (never dropped) and the error says where."""
        while self._metrics:
            chunk = self._metrics[:_MAX_METRICS_PER_BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as err:
                saved = self._save_unflushed()
                if isinstance(err, TrackingStoreError):
                    raise TrackingStoreError(f"{err}. {saved}") from err
                log.error("logging metrics failed: %s", saved)
                raise
            del self._metrics[: len(chunk)]

    def _save_unflushed(self) -> str:
        """Append the buffered metrics to unflushed_metrics.jsonl, empty the buffer, say where they are."""
        path = Path(self.output_dir if self.output_dir is not None else job_output_dir()) / UNFLUSHED_METRICS_FILE
        lines = [
            json.dumps(
                {"run_id": self.run_id, "key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
            )
            for m in self._metrics
        ]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            return f"Writing the {len(lines)} metric value(s) not logged to {path} failed too ({err}): they are lost"
        self._metrics = []
        return (
            f"The {len(lines)} metric value(s) not logged are in {path} (one JSON object per line: "
            "run_id, key, value, timestamp, step)"
        )


class NullTracker:
    """`tracking.enabled=false`: the same calls, nothing recorded."""

    run_id = None

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None: ...
    def set_tags(self, tags: Dict[str, Any]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: Optional[str] = None) -> None: ...
    def log_model(self, model_dir: str, name: str = "student") -> Optional[str]: ...
    def flush(self) -> None: ...


def _hydra_job_info() -> Dict[str, Any]:
    """Output dir, sweep dir and overrides of the running Hydra job ({} outside Hydra)."""
    try:
        hc = HydraConfig.get()
    except Exception:
        return {}
    info = {
        "output_dir": hc.runtime.output_dir,
        "overrides": list(hc.overrides.task),
        "job_num": hc.job.get("num"),
    }
    if hc.mode == RunMode.MULTIRUN:
        info["sweep_dir"] = hc.sweep.dir
    return info


def parent_run_id(sweep_dir: Optional[str]) -> Optional[str]:
    if os.environ.get(PARENT_RUN_ENV):
        return os.environ[PARENT_RUN_ENV]
    if sweep_dir and (Path(sweep_dir) / PARENT_RUN_FILE).is_file():
        return (Path(sweep_dir) / PARENT_RUN_FILE).read_text().strip()
    return None


def _run_name(job: TrackingSpec, overrides: List[str]) -> str:
    if job.tracking.run_name:
        return job.tracking.run_name
    return ",".join(overrides) if overrides else f"{job.task}-default"


def _reopened_run(client: Any, run_id: Optional[str]) -> Optional[Any]:
    """The run a resumed job continues, set RUNNING again; None if it is not in this store."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except TrackingStoreError:  # the store did not answer: not a missing run
        raise
    except Exception:  # another store, or the run was deleted: the job gets a new run
        logging.getLogger(__name__).warning(
            "MLflow run %s of the checkpoint is not in this store: starting a new run", run_id
        )
        return None
    client.update_run(run_id, status="RUNNING")
    return run


@contextlib.contextmanager
def job_tracker(job: TrackingSpec, run_id: Optional[str] = None, enabled: bool = True) -> Iterator[Any]:
    """Open the job's run (or reopen `run_id`, the run a resumed checkpoint belongs to); FINISHED
    on success, FAILED (with the reason as a tag) on an exception, KILLED on Ctrl-C or a stop
    signal (firstsight.training.resume.Preempted). Buffered metrics are flushed either way.
    `enabled=False`: a NullTracker (the processes of a data-parallel job other than rank 0)."""
    if not (job.tracking.enabled and enabled):
        yield NullTracker()
        return
    uri = resolve_tracking_uri(job.tracking)
    client = StoreClient(MlflowClient(tracking_uri=uri), absolute_tracking_uri(uri))  # retried; names the store
    reopened = _reopened_run(client, run_id)
    if reopened is not None:
        tracker = JobTracker(client, reopened.info.run_id)
        yield from _tracked(client, tracker, job, Preempted, existing_params=reopened.data.params, resumed=True)
        return
    experiment_id = get_or_create_experiment(client, job.tracking.experiment_name)
    hydra_job = _hydra_job_info()
    tags = {
        "firstsight.task": job.task,
        "firstsight.output_dir": hydra_job.get("output_dir", ""),
        "firstsight.overrides": " ".join(hydra_job.get("overrides", [])),
        "firstsight.sweep_id": hydra_job.get("sweep_dir", "none"),
        **{f"version.{k}": v for k, v in package_versions().items()},
        CODE_VERSION_TAG: code_version(),
    }
    if hydra_job.get("job_num") is not None and "sweep_dir" in hydra_job:
        tags["firstsight.job_num"] = str(hydra_job["job_num"])
    parent = parent_run_id(hydra_job.get("sweep_dir"))
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=_run_name(job, hydra_job.get("overrides", [])), tags=tags)
    yield from _tracked(client, JobTracker(client, run.info.run_id), job, Preempted)


def _tracked(
    client: Any,
    tracker: JobTracker,
    job: TrackingSpec,
    preempted: type,
    existing_params: Optional[Dict[str, str]] = None,
    resumed: bool = False,
) -> Iterator[JobTracker]:
    status = "FAILED"
    tracking = job.tracking
    monitor = start_system_metrics(tracking, tracker.run_id, client.uri, resumed) if tracking.system_metrics else None
    try:
        _log_config(client, tracker, job.record, existing_params)
        yield tracker
        status = "FINISHED"
    except (KeyboardInterrupt, preempted):
        status = "KILLED"
        raise
    except BaseException as err:
        with contextlib.suppress(Exception):
            tracker.set_tags({"firstsight.error": f"{type(err).__name__}: {err}"[:4000]})
        raise
    finally:
        if monitor is not None:  # its last samples go in before the run is closed
            stop_system_metrics(monitor)
        _close(client, tracker, status)


def start_system_metrics(tracking: TrackingConfig, run_id: str, uri: str, resumed: bool = False) -> Optional[Any]:
    """MLflow's system-metrics monitor on `run_id` (a thread sampling CPU, memory, disk, network and,
    with nvidia-ml-py and an NVIDIA GPU, each GPU every tracking.system_metrics_interval_s seconds,
    logged as system/*); a resumed run continues its steps. None, with a warning, if it cannot start:
    the job runs without it."""
    try:
        monitor = SystemMetricsMonitor(
            run_id,
            sampling_interval=float(tracking.system_metrics_interval_s),
            resume_logging=resumed,
            tracking_uri=uri,
        )
        monitor.start()
    except Exception as err:  # noqa: BLE001 - psutil missing, a store that refuses: no system metrics
        log.warning("system metrics are not logged (tracking.system_metrics): %s", _first_line(err))
        return None
    return monitor


def stop_system_metrics(monitor: Any) -> None:
    """Stop the monitor's thread and log what it has sampled; an error is logged, never raised."""
    try:
        monitor.finish()
    except Exception as err:  # noqa: BLE001 - the job's own outcome matters more
        log.warning("stopping MLflow's system metrics failed: %s", _first_line(err))


def _close(client: Any, tracker: JobTracker, status: str) -> None:
    """Flush and set the run's status. If the store fails here, the job's own error (status not
    FINISHED: an exception is on its way) is the one reported, and the store's is logged; after a
    successful job the store's error is raised (its metrics are in unflushed_metrics.jsonl)."""
    failure: Optional[BaseException] = None
    try:
        tracker.flush()
    except Exception as err:  # noqa: BLE001 - re-raised or logged below
        failure = err
    try:
        client.set_terminated(tracker.run_id, status if failure is None else "FAILED")
    except Exception as err:  # noqa: BLE001
        failure = failure or err
    if failure is None:
        return
    if status == "FINISHED":
        raise failure
    log.error("MLflow run %s could not be closed: %s", tracker.run_id, failure)


def _log_config(
    client: Any, tracker: JobTracker, record: Dict[str, Any], existing: Optional[Dict[str, str]] = None
) -> None:
    """Params = the flattened config, and config.yaml. A reopened run (`existing`: its params)
    gets only the params it lacks: MLflow refuses to change a logged value, and the settings a
    resumed run may change (train.resume, hardware.dataloader_workers, ...) keep their first value."""
    params = [Param(k, v[:6000]) for k, v in sorted(flatten_config(record).items()) if k not in (existing or {})]
    for start in range(0, len(params), _MAX_PARAMS_PER_BATCH):
        client.log_batch(tracker.run_id, params=params[start : start + _MAX_PARAMS_PER_BATCH])
    tracker.log_text(OmegaConf.to_yaml(record), "config.yaml")
