"""The report's PNGs: throughput and accuracy against peak memory by precision, the training loss
and KD loss curves, and the edge view's peak memory against latency per budget. A plot without data is left out
(and its stale file removed), with the reason. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from firstsight.core.files import write_atomically
from firstsight.tasks.report.cells import run_label
from firstsight.tasks.report.edge import EDGE_FITS, EDGE_PEAK, LATENCY_P50, EdgeRow, EdgeView
from firstsight.tasks.report.records import METRIC_COLUMNS, PEAK_RSS, PEAK_VRAM, TRAIN_THROUGHPUT, RunRecord, swept_keys

LOSS_CURVES = "loss_curves.png"
KD_LOSS_CURVES = "kd_loss_curves.png"
EDGE_PLOT = "edge_memory_vs_latency.png"


@dataclass
class Plot:
    file: str
    title: str
    skipped: Optional[str] = None  # why it was left out


def memory_metric(runs: Sequence[RunRecord]) -> Optional[str]:
    """The peak-memory metric the plots use: VRAM when any run has it, else RSS (labelled so)."""
    if any(PEAK_VRAM in r.metrics for r in runs):
        return PEAK_VRAM
    if any(PEAK_RSS in r.metrics for r in runs):
        return PEAK_RSS
    return None


def make_plots(
    runs: Sequence[RunRecord],
    out_dir: Path,
    histories: Dict[str, List[Tuple[int, float]]],
    kd_histories: Optional[Dict[str, List[Tuple[int, float]]]] = None,
) -> List[Plot]:
    """Write the PNGs that have data; `histories`: run id -> train/loss (step, value) history;
    `kd_histories`: the same for train/kd_loss (None: no KD-loss plot)."""
    swept = swept_keys(runs)
    memory = memory_metric(runs)
    plots = []
    scatter_specs = [
        ("throughput_vs_memory.png", "Training throughput vs peak memory, by precision", TRAIN_THROUGHPUT),
        ("accuracy_vs_memory.png", "Student accuracy vs peak memory, by precision", "eval/student_accuracy"),
    ]
    for file, title, y_metric in scatter_specs:
        points = [r for r in runs if memory and memory in r.metrics and y_metric in r.metrics]
        if not points:
            needs = f"{memory or f'{PEAK_VRAM} or {PEAK_RSS}'} and {y_metric}"
            plots.append(Plot(file, title, skipped=f"no run here has both {needs}"))
            continue
        _scatter(out_dir / file, title, points, memory, y_metric, swept)
        plots.append(Plot(file, title))
    curves = {r.run_id: histories[r.run_id] for r in runs if histories.get(r.run_id)}
    if not curves:
        plots.append(Plot(LOSS_CURVES, "Training loss curves", skipped="no run here has a train/loss history"))
    else:
        _loss_curves(out_dir / LOSS_CURVES, [r for r in runs if r.run_id in curves], curves, swept)
        plots.append(Plot(LOSS_CURVES, "Training loss curves (train/loss per optimizer step)"))
    if kd_histories is not None:
        kd_curves = {r.run_id: kd_histories[r.run_id] for r in runs if kd_histories.get(r.run_id)}
        if not kd_curves:
            plots.append(Plot(KD_LOSS_CURVES, "KD loss curves", skipped="no run here has a train/kd_loss history"))
        else:
            kd_runs = [r for r in runs if r.run_id in kd_curves]
            _loss_curves(out_dir / KD_LOSS_CURVES, kd_runs, kd_curves, swept, "train/kd_loss", KD_TITLE)
            plots.append(Plot(KD_LOSS_CURVES, "KD loss curves (train/kd_loss per optimizer step, before alpha and T²)"))
    for plot in plots:
        if plot.skipped:  # no stale picture from an earlier report in the same directory
            (out_dir / plot.file).unlink(missing_ok=True)
    return plots


def edge_plot(view: EdgeView, out_dir: Path) -> Plot:
    """Peak memory vs latency p50 of every profiled configuration, by budget (dashed line: the
    budget): filled markers fit, crosses do not, a ring marks the Pareto front."""
    title = "Edge: peak memory vs latency p50 per budget (filled: fits, x: does not fit, ring: Pareto front)"
    points = [r for r in view.rows if r.peak is not None and r.latency is not None]
    if not points:
        (out_dir / EDGE_PLOT).unlink(missing_ok=True)
        return Plot(EDGE_PLOT, title, skipped=f"no profile run with {EDGE_FITS} has both {EDGE_PEAK} and {LATENCY_P50}")
    figure, ax = _figure()
    budgets = list(dict.fromkeys(r.budget for r in view.rows))
    for i, budget in enumerate(budgets):
        _edge_budget(ax, budget, f"C{i % 10}", [r for r in points if r.budget == budget])
    ax.set_xlabel(f"peak memory GB  ({EDGE_PEAK})")
    ax.set_ylabel(_axis_label(LATENCY_P50))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(figure, out_dir / EDGE_PLOT)
    return Plot(EDGE_PLOT, title)


def _edge_budget(ax: Any, budget: Optional[float], colour: str, group: Sequence[EdgeRow]) -> None:
    """One budget's configurations on the edge plot: fits, misses, its front, its line."""
    label = f"budget {budget:g} GB" if budget is not None else "no budget"
    fit = [r for r in group if r.fits]
    miss = [r for r in group if not r.fits]
    if fit:
        ax.scatter([r.peak for r in fit], [r.latency for r in fit], color=colour, s=45, label=f"{label}: fits")
    if miss:
        ax.scatter(
            [r.peak for r in miss],
            [r.latency for r in miss],
            color=colour,
            marker="x",
            s=45,
            label=f"{label}: does not fit",
        )
    front = [r for r in fit if r.on_front]
    if front:
        ax.scatter(
            [r.peak for r in front],
            [r.latency for r in front],
            s=160,
            facecolors="none",
            edgecolors="black",
            linewidths=1.4,
        )
    if budget is not None:
        ax.axvline(budget, color=colour, linestyle="--", linewidth=1, alpha=0.7)
    for r in group:
        ax.annotate(r.config, (r.peak, r.latency), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _axis_label(metric: str) -> str:
    for name, header, _ in METRIC_COLUMNS:
        if name == metric:
            return f"{header}  ({metric})"
    return metric


def _figure():
    from matplotlib.figure import Figure  # deferred: matplotlib only when a plot is drawn; no pyplot, no GUI backend

    figure = Figure(figsize=(7, 4.5), dpi=100)
    return figure, figure.add_subplot()


def _scatter(
    path: Path, title: str, points: Sequence[RunRecord], x_metric: str, y_metric: str, swept: Sequence[str]
) -> None:
    figure, ax = _figure()
    precisions = sorted({r.params.get("precision.name", "?") for r in points})
    colours = {p: f"C{i % 10}" for i, p in enumerate(precisions)}
    for precision in precisions:
        group = [r for r in points if r.params.get("precision.name", "?") == precision]
        ax.scatter(
            [r.metrics[x_metric] for r in group],
            [r.metrics[y_metric] for r in group],
            color=colours[precision],
            label=precision,
            s=50,
        )
        for r in group:
            ax.annotate(
                run_label(r, swept),
                (r.metrics[x_metric], r.metrics[y_metric]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
    ax.set_xlabel(_axis_label(x_metric))
    ax.set_ylabel(_axis_label(y_metric))
    ax.set_title(title, fontsize=10)
    ax.legend(title="precision.name", fontsize=8)
    ax.grid(alpha=0.3)
    _save(figure, path)


KD_TITLE = "KD loss (the divergence term, before alpha and T²)"


def _loss_curves(
    path: Path,
    runs: Sequence[RunRecord],
    curves: Dict[str, List[Tuple[int, float]]],
    swept: Sequence[str],
    metric: str = "train/loss",
    title: str = "Training loss",
) -> None:
    figure, ax = _figure()
    for run in runs:
        steps, values = zip(*curves[run.run_id])
        ax.plot(steps, values, label=f"{run_label(run, swept)} ({run.short_id})", linewidth=1.2)
    from matplotlib.ticker import MaxNLocator  # deferred: matplotlib only when a plot is drawn

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(figure, path)


def _save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomically(path, buffer.getvalue())
