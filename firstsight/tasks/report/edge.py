"""The edge view: which profiled configurations fit each memory budget, their accuracy (their own, or
an evaluate run's of the same precision) and latency, and the Pareto front of those that fit (EDGE_RULE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from firstsight.tasks.report.cells import run_label
from firstsight.tasks.report.records import RunRecord, swept_keys

EDGE_FITS = "edge/fits"
EDGE_PEAK = "edge/peak_gb"
EDGE_BUDGET = "edge/budget_gb"
EDGE_HEADROOM = "edge/headroom_gb"
LATENCY_P50 = "infer/latency_p50_s"
ACCURACY_METRICS = ("eval/student_accuracy", "eval/accuracy")  # the (student's) accuracy, first found
BUDGET_PARAMS = ("hardware.memory_budget_gb", "hardware.name")  # the budget, not the configuration
EDGE_OBJECTIVES = (("accuracy", True), ("peak memory", False), ("latency p50", False))  # (name, maximize)
EDGE_RULE = (
    "Each profile run under `hardware.memory_budget_gb` records whether it fits (`edge/fits`): its measured "
    "peak memory (`edge/peak_gb`: `torch.cuda.max_memory_allocated` under a CUDA cap at the budget, basis "
    "`cuda_allocator`; or the process's peak resident set on a CPU, basis `cpu_rss`, which includes the "
    "interpreter) is within the budget and it did not run out of memory. Accuracy is the run's own "
    "`eval/student_accuracy` if it has one, else that of the most recent evaluate run here with the same "
    "`precision.*` values (one of the same `model.name` first), named in *accuracy from*. Among the "
    "configurations that fit one budget, one is on the **Pareto front** when no other is at least as good "
    "on accuracy (higher), peak memory and latency p50 (lower) and better on one; objectives that some "
    "fitting configuration lacks are left out of that budget's front (said below)."
)


@dataclass
class EdgeRow:
    run: RunRecord
    config: str  # the configuration: the swept values but the budget
    budget: Optional[float]
    fits: bool
    basis: str  # cuda_allocator | cpu_rss
    peak: Optional[float]
    headroom: Optional[float]
    latency: Optional[float]
    accuracy: Optional[float]
    accuracy_from: str  # "this run", "evaluate run <id>", or ""
    note: str  # why it does not fit
    on_front: bool = False


@dataclass
class EdgeView:
    rows: List[EdgeRow]  # by budget; fitting first, by peak memory
    objectives: Dict[Optional[float], List[str]]  # budget -> the objectives its front was computed on


def edge_view(runs: Sequence[RunRecord]) -> Optional[EdgeView]:
    """Which configurations fit each budget, their accuracy and latency, and the Pareto front of
    those that fit; None when no run carries edge/* metrics."""
    edge_runs = [r for r in runs if EDGE_FITS in r.metrics]
    if not edge_runs:
        return None
    swept = [k for k in swept_keys(edge_runs) if k not in BUDGET_PARAMS]
    rows = [_edge_row(run, runs, swept) for run in edge_runs]
    rows.sort(
        key=lambda r: (
            r.budget is None,
            r.budget or 0.0,
            not r.fits,
            r.peak is None,
            r.peak or 0.0,
            r.config,
            r.run.start_time,
        )
    )
    return EdgeView(rows=rows, objectives=_mark_fronts(rows))


def _edge_row(run: RunRecord, runs: Sequence[RunRecord], swept: Sequence[str]) -> EdgeRow:
    accuracy, source = edge_accuracy(run, runs)
    fits = run.metrics[EDGE_FITS] >= 0.5
    stage = run.tags.get("firstsight.edge.oom_stage")
    note = "" if fits else (f"out of memory while {stage}" if stage else "peak over the budget")
    return EdgeRow(
        run=run,
        config=run_label(run, swept),
        budget=_budget(run),
        fits=fits,
        basis=run.tags.get("firstsight.edge.basis", ""),
        peak=run.metrics.get(EDGE_PEAK),
        headroom=run.metrics.get(EDGE_HEADROOM),
        latency=run.metrics.get(LATENCY_P50),
        accuracy=accuracy,
        accuracy_from=source,
        note=note,
    )


def edge_accuracy(run: RunRecord, runs: Sequence[RunRecord]) -> Tuple[Optional[float], str]:
    """The accuracy of a profiled configuration and where it comes from (see EDGE_RULE)."""
    for metric in ACCURACY_METRICS:
        if metric in run.metrics:
            return run.metrics[metric], "this run"
    precision = _precision_params(run)
    found = [
        r
        for r in runs
        if r is not run
        and r.task == "evaluate"
        and _precision_params(r) == precision
        and any(m in r.metrics for m in ACCURACY_METRICS)
    ]
    if not found:
        return None, ""
    model = run.params.get("model.name")
    best = max(found, key=lambda r: (r.params.get("model.name") == model, r.start_time, r.run_id))
    value = next(best.metrics[m] for m in ACCURACY_METRICS if m in best.metrics)
    return value, f"evaluate run {best.short_id} (model {best.params.get('model.name', '?')})"


def _precision_params(run: RunRecord) -> Dict[str, str]:
    return {k: v for k, v in run.params.items() if k.startswith("precision.")}


def _budget(run: RunRecord) -> Optional[float]:
    if EDGE_BUDGET in run.metrics:
        return run.metrics[EDGE_BUDGET]
    try:
        return float(run.params["hardware.memory_budget_gb"])
    except (KeyError, ValueError):
        return None


def _mark_fronts(rows: Sequence[EdgeRow]) -> Dict[Optional[float], List[str]]:
    """Set `on_front` on the fitting rows of each budget; budget -> the objectives its front used
    (those that every fitting configuration of the budget has)."""
    values = {"accuracy": lambda r: r.accuracy, "peak memory": lambda r: r.peak, "latency p50": lambda r: r.latency}
    objectives: Dict[Optional[float], List[str]] = {}
    for budget in dict.fromkeys(r.budget for r in rows):
        fitting = [r for r in rows if r.budget == budget and r.fits]
        used = [
            (name, up) for name, up in EDGE_OBJECTIVES if fitting and all(values[name](r) is not None for r in fitting)
        ]
        objectives[budget] = [name for name, _ in used]
        if not used:
            continue
        front = pareto_front([[values[name](r) for name, _ in used] for r in fitting], [up for _, up in used])
        for row, on in zip(fitting, front):
            row.on_front = on
    return objectives


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> List[bool]:
    """For each point, whether no other point is at least as good on every objective and better
    on one (`maximize[i]`: higher is better on objective i, else lower is)."""
    signed = [[v if up else -v for v, up in zip(point, maximize)] for point in points]

    def dominates(b: Sequence[float], a: Sequence[float]) -> bool:
        return all(x >= y for x, y in zip(b, a)) and any(x > y for x, y in zip(b, a))

    return [
        not any(dominates(other, point) for j, other in enumerate(signed) if j != i) for i, point in enumerate(signed)
    ]
