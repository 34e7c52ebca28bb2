"""Where to look at runs in the MLflow UI: the command that serves a store, and the addresses of
an experiment's runs, of a run's artifacts and of the compare page (the routes of MLflow 3.17's UI).

A store that is an MLflow server (http://...) is its own UI; any other store (SQLite, the default)
is served by `mlflow ui --backend-store-uri <store>`, at http://127.0.0.1:5000 by default.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence
from urllib.parse import quote

DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def is_server(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https")


def ui_command(uri: str) -> Optional[str]:
    """The command that serves the store `uri` in a browser; None when it is a server already."""
    if is_server(uri):
        return None
    return f"mlflow ui --backend-store-uri {uri}"


def ui_base(uri: str) -> str:
    """The UI's address: the server itself, or where `mlflow ui` serves."""
    return uri.rstrip("/") if is_server(uri) else DEFAULT_UI


# The UI's own mode switch ("GenAI" | "Model training"), kept per browser and GenAI in a new one;
# this URL parameter sets it, so that an address opens in the training mode whatever the browser had.
TRAINING_MODE = "workflowType=machine_learning"


def _json_list(values: Sequence[str]) -> str:
    return quote(json.dumps(list(values), separators=(",", ":")), safe="")


def compare_runs_url(base: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The compare page of `run_ids`: their params and metrics side by side, and plots of them."""
    runs, experiments = _json_list(run_ids), _json_list([experiment_id])
    return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}&{TRAINING_MODE}"


# A view of the runs list (filter, sort, columns) saved as an experiment tag under this prefix, and
# opened by the URL parameter below: what the UI's own "Share" button does.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
SHARED_VIEW_PARAM = "viewStateShareKey"


def column(kind: str, key: str) -> str:
    """A column of the runs list as the UI names it: kind params | metrics | tags | attributes."""
    return f"{kind}.`{key}`"


def children_view(parent_run_id: str, params: Sequence[str], metrics: Sequence[str]) -> str:
    """The runs-list view (JSON) of one sweep's runs: only its job runs, listed flat (the UI folds
    children under their parent only when sorted by date), by run name, with the swept `params` and
    the `metrics` as columns."""
    return json.dumps(
        {
            "searchFilter": f"tags.mlflow.parentRunId = '{parent_run_id}'",
            "orderByKey": column("tags", "mlflow.runName"),
            "orderByAsc": True,
            "selectedColumns": [column("params", p) for p in params] + [column("metrics", m) for m in metrics],
        }
    )


def view_url(base: str, experiment_id: str, view_key: str) -> str:
    """The experiment's runs list opened on the shared view `view_key`, as a table."""
    key = quote(view_key, safe="")
    return f"{base}/#/experiments/{experiment_id}/runs?{SHARED_VIEW_PARAM}={key}&compareRunsMode=TABLE&{TRAINING_MODE}"


def children_url(base: str, experiment_id: str, parent_run_id: str) -> str:
    """The experiment's runs list filtered to one sweep's runs (the UI's default columns, the
    children folded under their parent): where no shared view was saved."""
    search = quote(f"tags.mlflow.parentRunId = '{parent_run_id}'", safe="")
    return f"{base}/#/experiments/{experiment_id}/runs?searchFilter={search}&compareRunsMode=TABLE&{TRAINING_MODE}"


def artifacts_url(base: str, experiment_id: str, run_id: str, path: str = "") -> str:
    """A run's artifacts page, opened on `path` (a file or a folder) when given."""
    where = f"/{path}" if path else ""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts{where}?{TRAINING_MODE}"
