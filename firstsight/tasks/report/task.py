"""The report task: read the runs, judge them against the targets, draw the plots, write report.md,
report.html and runs.csv (each atomically) and log them as artifacts of the report job's own run."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from firstsight.core.files import write_atomically
from firstsight.core.job import job_output_dir
from firstsight.evaluation.stats import FAIL, NOT_MEASURABLE, PASS, UNRESOLVED
from firstsight.tasks.report.accuracy import accuracy_check
from firstsight.tasks.report.checks import Check, verdict_counts
from firstsight.tasks.report.edge import EdgeView, edge_view
from firstsight.tasks.report.markdown import render_html, render_markdown
from firstsight.tasks.report.plots import KD_LOSS_CURVES, LOSS_CURVES, Plot, edge_plot, make_plots
from firstsight.tasks.report.records import RunRecord, swept_keys
from firstsight.tasks.report.speed import memory_check, throughput_check
from firstsight.tasks.report.store import MAX_LOSS_CURVES, loss_histories, read_runs
from firstsight.tasks.report.table import build_table, table_csv

log = logging.getLogger(__package__)  # firstsight.tasks.report: one logger for the whole task


def report(cfg: DictConfig, tracker: Any, own_run: bool = True) -> Dict[str, float]:
    """The report of `cfg.task`'s runs, logged to `tracker`'s run: the report job's own (`own_run`:
    left out of the runs read), or a sweep's parent run (firstsight.suite.callbacks: `own_run=False`,
    task.sweep naming that parent)."""
    task = cfg.task
    client, selection = read_runs(cfg, own_run_id=getattr(tracker, "run_id", None) if own_run else None)
    out_dir = Path(task.output_dir) if task.output_dir else job_output_dir() / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = selection.runs
    table = build_table(runs)
    checks = target_checks(runs, task.accuracy_drop_target, task.throughput_gain_target, task.vram_saving_target)
    edge = edge_view(runs)
    plots = _plots(runs, out_dir, loss_histories(client, runs), loss_histories(client, runs, "train/kd_loss"), edge)
    generated = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    markdown_text = render_markdown(selection, table, checks, plots, generated, edge)
    write_atomically(out_dir / "report.md", markdown_text)
    write_atomically(out_dir / "report.html", render_html(markdown_text, f"FirstSight report: {selection.experiment}"))
    write_atomically(out_dir / "runs.csv", table_csv(table))
    tracker.set_tags(
        {
            "firstsight.report_experiment": selection.experiment,
            "firstsight.report_scope": selection.scope,
            "firstsight.report_dir": str(out_dir.resolve()),
        }
    )
    tracker.log_artifacts(str(out_dir), "report")
    counts = verdict_counts(checks)
    metrics = {
        "report/runs": float(len(runs)),
        "report/checks_passed": float(counts[PASS]),
        "report/checks_failed": float(counts[FAIL]),
        "report/checks_unresolved": float(counts[UNRESOLVED]),
        "report/checks_not_measurable": float(counts[NOT_MEASURABLE]),
        "report/plots": float(sum(1 for p in plots if not p.skipped)),
    }
    tracker.log_metrics(metrics)
    tracker.flush()
    log.info("report of %d runs (%s) written to %s", len(runs), selection.scope, out_dir)
    return metrics


def target_checks(
    runs: Sequence[RunRecord], accuracy_drop_target: float, throughput_gain_target: float, vram_saving_target: float
) -> List[Check]:
    """The study's targets: the accuracy drop, the training throughput gain, the VRAM saving."""
    swept = swept_keys(runs)
    return [
        accuracy_check(runs, accuracy_drop_target),
        throughput_check(runs, swept, throughput_gain_target),
        memory_check(runs, swept, vram_saving_target),
    ]


def _plots(
    runs: Sequence[RunRecord],
    out_dir: Path,
    histories: Dict[str, List[Tuple[int, float]]],
    kd_histories: Dict[str, List[Tuple[int, float]]],
    edge: Optional[EdgeView],
) -> List[Plot]:
    """The plots, the edge view's with them; the loss curves' titles say when runs were left out."""
    plots = make_plots(runs, out_dir, histories, kd_histories)
    if edge is not None:
        plots.append(edge_plot(edge, out_dir))
    for file, metric in ((LOSS_CURVES, "train/loss"), (KD_LOSS_CURVES, "train/kd_loss")):
        if sum(1 for r in runs if metric in r.metrics) > MAX_LOSS_CURVES:
            for plot in plots:
                if plot.file == file and not plot.skipped:
                    plot.title += f" — the first {MAX_LOSS_CURVES} runs only"
    return plots
