"""One MLflow run per job: config as params, tags, buffered metrics, status on exit.

The store is `tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else MLflow's default
(sqlite:///mlflow.db in the working directory, which `mlflow ui` opens with no flags).
Jobs of a sweep hang under the sweep's parent run (created by firstsight.callbacks).
Metrics are buffered and written with `log_batch`: one call per flush, not one per value.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from omegaconf import DictConfig, OmegaConf

PARENT_RUN_ENV = "FIRSTSIGHT_MLFLOW_PARENT_RUN_ID"
PARENT_RUN_FILE = "mlflow_parent_run_id"
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "mlflow", "hydra-core")
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


def flatten_config(cfg: DictConfig) -> Dict[str, str]:
    """`{"precision.dtype": "bfloat16", ...}` for the composed config (hydra's own node excluded)."""
    container = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return flatten_container({k: v for k, v in container.items() if k != "hydra"})


def flatten_container(container: Dict[str, Any]) -> Dict[str, str]:
    """Nested dicts → `{"a.b": "value"}` with every leaf as a string (empty dicts are leaves)."""
    flat: Dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)

    walk(container, "")
    return flat


def package_versions() -> Dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    import firstsight

    versions["firstsight"] = firstsight.__version__
    return versions


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def resolve_tracking_uri(cfg: DictConfig) -> Optional[str]:
    return cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def absolute_tracking_uri(uri: Optional[str]) -> str:
    """The store a run went to, valid from any working directory (MLflow's default and relative
    sqlite paths are resolved against the current one)."""
    import mlflow

    uri = uri or mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def get_or_create_experiment(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # a concurrent job created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class JobTracker:
    """The MLflow run of one job."""

    def __init__(self, client: Any, run_id: str):
        self.client = client
        self.run_id = run_id
        self._metrics: List[Any] = []

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._metrics.extend(Metric(k, float(v), timestamp, step) for k, v in metrics.items())

    def set_tags(self, tags: Dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifacts(self, local_dir: str, artifact_path: Optional[str] = None) -> None:
        """Every file under `local_dir`, as artifacts of this run (under `artifact_path`)."""
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def flush(self) -> None:
        while self._metrics:
            chunk, self._metrics = self._metrics[:_MAX_METRICS_PER_BATCH], self._metrics[_MAX_METRICS_PER_BATCH:]
            self.client.log_batch(self.run_id, metrics=chunk)


class NullTracker:
    """`tracking.enabled=false`: the same calls, nothing recorded."""

    run_id = None

    def log_metrics(self, metrics: Dict[str, float], step: int = 0) -> None: ...
    def set_tags(self, tags: Dict[str, Any]) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_artifacts(self, local_dir: str, artifact_path: Optional[str] = None) -> None: ...
    def flush(self) -> None: ...


def _hydra_job_info() -> Dict[str, Any]:
    """Output dir, sweep dir and overrides of the running Hydra job ({} outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

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


def _run_name(cfg: DictConfig, overrides: List[str]) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    return ",".join(overrides) if overrides else f"{cfg.task.name}-default"


def _reopened_run(client: Any, run_id: Optional[str]) -> Optional[Any]:
    """The run a resumed job continues, set RUNNING again; None if it is not in this store."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # another store, or the run was deleted: the job gets a new run
        import logging

        logging.getLogger(__name__).warning("MLflow run %s of the checkpoint is not in this store: starting a new run", run_id)
        return None
    client.update_run(run_id, status="RUNNING")
    return run


@contextlib.contextmanager
def job_tracker(cfg: DictConfig, run_id: Optional[str] = None, enabled: bool = True) -> Iterator[Any]:
    """Open the job's run (or reopen `run_id`, the run a resumed checkpoint belongs to); FINISHED
    on success, FAILED (with the reason as a tag) on an exception, KILLED on Ctrl-C or a stop
    signal (firstsight.resume.Preempted). Buffered metrics are flushed either way.
    `enabled=False`: a NullTracker (the processes of a data-parallel job other than rank 0)."""
    if not (cfg.tracking.enabled and enabled):
        yield NullTracker()
        return
    from mlflow.tracking import MlflowClient

    from firstsight.resume import Preempted

    client = MlflowClient(tracking_uri=resolve_tracking_uri(cfg))
    reopened = _reopened_run(client, run_id)
    if reopened is not None:
        tracker = JobTracker(client, reopened.info.run_id)
        yield from _tracked(client, tracker, cfg, Preempted, existing_params=reopened.data.params)
        return
    experiment_id = get_or_create_experiment(client, cfg.tracking.experiment_name)
    job = _hydra_job_info()
    tags = {
        "firstsight.task": cfg.task.name,
        "firstsight.output_dir": job.get("output_dir", ""),
        "firstsight.overrides": " ".join(job.get("overrides", [])),
        "firstsight.sweep_id": job.get("sweep_dir", "none"),
        **{f"version.{k}": v for k, v in package_versions().items()},
    }
    if job.get("job_num") is not None and "sweep_dir" in job:
        tags["firstsight.job_num"] = str(job["job_num"])
    parent = parent_run_id(job.get("sweep_dir"))
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=_run_name(cfg, job.get("overrides", [])), tags=tags)
    yield from _tracked(client, JobTracker(client, run.info.run_id), cfg, Preempted)


def _tracked(client: Any, tracker: JobTracker, cfg: DictConfig, preempted: type,
             existing_params: Optional[Dict[str, str]] = None) -> Iterator[JobTracker]:
    status = "FAILED"
    try:
        _log_config(client, tracker, cfg, existing_params)
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
        try:
            tracker.flush()
        finally:
            client.set_terminated(tracker.run_id, status)


def _log_config(client: Any, tracker: JobTracker, cfg: DictConfig, existing: Optional[Dict[str, str]] = None) -> None:
    """Params = the flattened config, and config.yaml. A reopened run (`existing`: its params)
    gets only the params it lacks: MLflow refuses to change a logged value, and the settings a
    resumed run may change (train.resume, hardware.dataloader_workers, ...) keep their first value."""
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in sorted(flatten_config(cfg).items()) if k not in (existing or {})]
    for start in range(0, len(params), _MAX_PARAMS_PER_BATCH):
        client.log_batch(tracker.run_id, params=params[start:start + _MAX_PARAMS_PER_BATCH])
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
