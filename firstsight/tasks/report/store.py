"""The only part of the report that talks to MLflow (imported when called): the runs of an
experiment as RunRecords, selected, and the train/loss histories of the runs that logged one."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mlflow
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from firstsight.core.errors import FirstSightError
from firstsight.tasks.report.records import RunRecord
from firstsight.tasks.report.selection import Selection, select_runs
from firstsight.tracking.tracker import resolve_tracking_uri

MAX_LOSS_CURVES = 40


def read_runs(cfg: DictConfig, own_run_id: Optional[str] = None) -> Tuple[Any, Selection]:
    """The client and the selected runs of `task.experiment` (default: tracking.experiment_name)."""
    uri = resolve_tracking_uri(cfg.tracking)
    client = MlflowClient(tracking_uri=uri)
    store = uri or mlflow.get_tracking_uri()
    name = cfg.task.experiment or cfg.tracking.experiment_name
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        names = sorted(e.name for e in _all_pages(lambda token: client.search_experiments(page_token=token)))
        raise FirstSightError(
            f"task.experiment={name!r}: no MLflow experiment of that name in {store}. "
            f"Experiments there: {', '.join(repr(n) for n in names) or 'none'}."
        )
    runs = _all_pages(
        lambda token: client.search_runs(
            [experiment.experiment_id], max_results=1000, order_by=["attributes.start_time DESC"], page_token=token
        )
    )
    selection = select_runs(
        [run_record(r) for r in runs],
        experiment=name,
        store=store,
        sweep=cfg.task.sweep,
        include_failed=cfg.task.include_failed,
        max_runs=cfg.task.max_runs,
        own_run_id=own_run_id,
    )
    return client, selection


def run_record(run: Any) -> RunRecord:
    """An MLflow run as the report reads it."""
    return RunRecord(
        run_id=run.info.run_id,
        name=run.info.run_name or "",
        status=run.info.status,
        start_time=run.info.start_time or 0,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        tags=dict(run.data.tags),
    )


def _all_pages(fetch: Callable[[Optional[str]], Any]) -> List[Any]:
    items: List[Any] = []
    token: Optional[str] = None
    while True:
        page = fetch(token)
        items.extend(page)
        token = page.token
        if not token:
            return items


def loss_histories(
    client: Any, runs: Sequence[RunRecord], metric: str = "train/loss"
) -> Dict[str, List[Tuple[int, float]]]:
    """`metric` (train/loss, train/kd_loss) per optimizer step of the first MAX_LOSS_CURVES runs that logged it."""
    histories = {}
    for run in [r for r in runs if metric in r.metrics][:MAX_LOSS_CURVES]:
        history = client.get_metric_history(run.run_id, metric)
        histories[run.run_id] = sorted((m.step, m.value) for m in history)
    return histories
