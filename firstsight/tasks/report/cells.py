"""How the report writes a value: a number to 4 significant digits, a metric with its interval,
a run by its swept values."""

from __future__ import annotations

import math
from typing import Any, Sequence

from firstsight.tasks.report.records import RunRecord, estimate


def fmt(value: Any) -> str:
    """A cell as the report shows it: empty when absent, 4 significant digits, whole numbers from 1000."""
    if value is None:
        return ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1000:
            return f"{value:.0f}"
        return f"{value:.4g}"
    return str(value)


def with_interval(run: RunRecord, metric: str) -> str:
    """A metric as the tables show it: `0.461 [0.378, 0.546]` with its interval, else the value alone."""
    if metric not in run.metrics:
        return ""
    found = estimate(run, metric)
    return str(found) if found is not None else fmt(run.metrics[metric])


def run_label(run: RunRecord, swept: Sequence[str]) -> str:
    """A short name for plots and tables: the run's swept values (precision first), else its id."""
    keys = sorted(swept, key=lambda k: (not k.startswith("precision.name"), k))
    parts = [
        f"{k.rsplit('.', 1)[-1]}={run.params.get(k, '')}" if k != "precision.name" else run.params.get(k, "")
        for k in keys
        if not (k.startswith("precision.") and k != "precision.name")
    ]
    return " ".join(p for p in parts if p) or run.short_id
