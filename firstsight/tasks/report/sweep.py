"""A sweep's comparison on its parent run, when the sweep ends (firstsight.suite.callbacks): the
report of the sweep's job runs (report.md, report.html, runs.csv and the PNGs: throughput and
accuracy against peak memory by precision, the loss and KD-loss curves) as artifacts under `report/`
of the parent, and the swept params with the values the jobs took (`precision.name`: "fp16, int8"),
so that the parent row of the MLflow runs list shows what the sweep varied; and a saved view of the
experiment's runs list that shows the sweep's runs side by side with those values and metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

from mlflow.entities import Param
from omegaconf import OmegaConf

from firstsight.config.schema import ReportTaskConfig
from firstsight.tasks.report.records import swept_keys
from firstsight.tasks.report.store import run_record
from firstsight.tasks.report.task import report
from firstsight.tracking.tracker import JobTracker
from firstsight.tracking.ui import SHARED_VIEW_TAG, children_view

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param's value
MAX_VIEW_PARAMS = 6  # swept params shown as columns of the sweep's view (the first ones)
# The metric columns of the sweep's view, those its runs logged (a few: a wide table's columns past
# the window are not drawn): speed, memory, KD loss and accuracy of distill; latency of profile.
VIEW_METRICS = (
    "perf/throughput_tokens_per_s",
    "perf/peak_vram_gb",
    "perf/peak_rss_gb",
    "train/kd_loss",
    "eval/student_accuracy",
    "eval/full_precision_accuracy_drop",
    "infer/latency_p50_s",
    "infer/throughput_qps",
    "model/weights_gb",
)


def swept_params(children: Sequence[Any]) -> Dict[str, str]:
    """The params that differ among the sweep's job runs (MLflow runs, in job order), each with the
    distinct values they took, in that order."""
    records = [run_record(c) for c in children]
    records.sort(key=lambda r: int(r.tags.get("firstsight.job_num", 0) or 0))
    return {
        key: ", ".join(dict.fromkeys(r.params.get(key, "(not set)") for r in records))[:MAX_PARAM_LENGTH]
        for key in swept_keys(records)
    }


def sweep_comparison(
    tracking: Mapping[str, Any], client: Any, parent_run_id: str, children: Sequence[Any], out_dir: Path
) -> Dict[str, float]:
    """Log the comparison of the sweep whose parent run is `parent_run_id` to that run: its swept
    params (from `children`, the job runs to compare), and the report of its job runs, written
    under `out_dir` (the sweep's directory/report). `tracking`: the sweep's tracking section (its
    store and experiment); `client`: an MlflowClient on that store. Returns the report's metrics."""
    params = swept_params(children)
    existing = client.get_run(parent_run_id).data.params
    todo = [Param(k, v) for k, v in params.items() if k not in existing]
    if todo:
        client.log_batch(parent_run_id, params=todo)
    cfg = OmegaConf.create(
        {
            "tracking": dict(tracking),
            "task": OmegaConf.structured(ReportTaskConfig(name="report", sweep=parent_run_id, output_dir=str(out_dir))),
        }
    )
    tracker = JobTracker(client, parent_run_id, output_dir=out_dir)
    tracker.set_tags({"firstsight.swept_keys": ", ".join(params) or "none"})
    return report(cfg, tracker, own_run=False)


def save_sweep_view(client: Any, experiment_id: str, parent_run_id: str, children: Sequence[Any]) -> str:
    """Save the runs-list view of the sweep (its job runs, flat, with the swept params and the
    report's metric columns that they logged: throughput, peak memory, KD loss, accuracy, ...) as a
    shared view of the experiment; returns its key (firstsight.tracking.ui.view_url opens it)."""
    logged = {k for c in children for k in c.data.metrics}
    metrics = [name for name in VIEW_METRICS if name in logged]
    params = list(swept_params(children))[:MAX_VIEW_PARAMS]
    key = f"sweep-{parent_run_id}"
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, children_view(parent_run_id, params, metrics))
    return key
