"""The comparison table: one row per run (its swept values and metrics), the same grouped over
seeds, the rows as the report shows them, and runs.csv at full precision."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from firstsight.tasks.report.cells import fmt, with_interval
from firstsight.tasks.report.records import FINISHED, METRIC_COLUMNS, RunRecord, estimate, swept_keys

SEED_KEY = "seed"
TEACHER_ARCHITECTURE = "firstsight.teacher_architecture"  # the tag distill, evaluate and profile set


@dataclass
class Column:
    key: str  # a param name, a metric name, or "run" / "status" / "task"
    header: str
    kind: str  # "run" | "status" | "param" | "tag" | "metric"


@dataclass
class Table:
    columns: List[Column]
    rows: List[List[Any]]  # raw values: str for params, float (or None) for metrics
    runs: List[RunRecord]

    def column(self, key: str) -> List[Any]:
        index = [c.key for c in self.columns].index(key)
        return [row[index] for row in self.rows]


def build_table(runs: Sequence[RunRecord]) -> Table:
    """One row per run: run id, (status when any run did not finish), task, the swept values, then
    each metric of METRIC_COLUMNS that some run has."""
    columns = [Column("run", "run", "run")]
    if any(r.status != FINISHED for r in runs):
        columns.append(Column("status", "status", "status"))
    columns.append(Column("task", "task", "param"))
    teachers = {r.tags.get(TEACHER_ARCHITECTURE) for r in runs} - {None}
    if teachers - {"qwen2_vl"}:  # a teacher of another architecture among the runs: say which teaches which row
        columns.append(Column(TEACHER_ARCHITECTURE, "teacher architecture", "tag"))
    columns += [Column(k, k, "param") for k in swept_keys(runs)]
    columns += [Column(m, header, "metric") for m, header, _ in METRIC_COLUMNS if any(m in r.metrics for r in runs)]
    rows = [[_cell(run, column) for column in columns] for run in runs]
    return Table(columns=columns, rows=rows, runs=list(runs))


def _cell(run: RunRecord, column: Column) -> Any:
    if column.kind == "run":
        return run.short_id
    if column.kind == "status":
        return run.status
    if column.key == "task":
        return run.task
    if column.kind == "tag":
        return run.tags.get(column.key)
    if column.kind == "param":
        return run.params.get(column.key)
    return run.metrics.get(column.key)


def over_seeds(table: Table) -> Optional[Tuple[List[str], List[List[str]]]]:
    """When `seed` is among the swept values: one row per setting (task + the other swept values)
    with each metric's mean ± sample standard deviation over that setting's seeds, and n.
    None when the runs do not differ by seed."""
    keys = [c.key for c in table.columns]
    if SEED_KEY not in keys:
        return None
    setting_columns = [c for c in table.columns if c.kind in ("param", "tag") and c.key != SEED_KEY]
    metric_columns = [c for c in table.columns if c.kind == "metric"]
    groups: Dict[Tuple[Any, ...], List[List[Any]]] = {}
    for row in table.rows:
        setting = tuple(row[keys.index(c.key)] for c in setting_columns)
        groups.setdefault(setting, []).append(row)
    headers = [c.header for c in setting_columns] + ["seeds"] + [c.header for c in metric_columns]
    rows = []
    for setting, members in groups.items():
        cells = [fmt(v) for v in setting] + [str(len(members))]
        for column in metric_columns:
            index = keys.index(column.key)
            cells.append(_mean_and_std([row[index] for row in members if row[index] is not None]))
        rows.append(cells)
    return headers, rows


def _mean_and_std(values: List[float]) -> str:
    """`mean ± sample std` of one setting's values, `mean (n=1)` for one, empty for none."""
    if not values:
        return ""
    mean = sum(values) / len(values)
    if len(values) > 1:
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return f"{fmt(mean)} ± {fmt(std)}"
    return f"{fmt(mean)} (n=1)"


def display_rows(table: Table) -> List[List[Any]]:
    """The table's rows as the report shows them: a metric the run logged an interval for as
    `value [low, high]`, everything else as it is (fmt'ed when escaped)."""
    rows = []
    for run, row in zip(table.runs, table.rows):
        rows.append(
            [
                with_interval(run, c.key) if c.kind == "metric" and estimate(run, c.key) is not None else v
                for c, v in zip(table.columns, row)
            ]
        )
    return rows


def _interval_keys(table: Table) -> Dict[str, List[str]]:
    """metric -> its interval bounds' names, for the metric columns some run logged an interval for."""
    found = {}
    for column in table.columns:
        bounds = [f"{column.key}_ci_low", f"{column.key}_ci_high"]
        if column.kind == "metric" and any(bounds[0] in r.metrics for r in table.runs):
            found[column.key] = bounds
    return found


def table_csv(table: Table) -> str:
    """runs.csv: the table at full precision; a metric with logged intervals is followed by them."""
    out = io.StringIO()
    writer = csv.writer(out)
    intervals = _interval_keys(table)

    def cell(value: Any) -> Any:
        return "" if value is None else repr(value) if isinstance(value, float) else value

    writer.writerow(["run_id"] + [k for c in table.columns[1:] for k in [c.key] + intervals.get(c.key, [])])
    for run, row in zip(table.runs, table.rows):
        writer.writerow(
            [run.run_id]
            + [
                cell(x)
                for c, v in zip(table.columns[1:], row[1:])
                for x in [v] + [run.metrics.get(b) for b in intervals.get(c.key, [])]
            ]
        )
    return out.getvalue()
