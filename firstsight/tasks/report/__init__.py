"""The report task: read runs back from MLflow and write a comparison report.

`python run.py task=report [task.sweep=latest|<multirun dir>|<parent run id>]` reads the job runs
of an experiment (or of one sweep), and writes under `task.output_dir` (default: <the job's output
dir>/report), each file atomically:

- report.md and report.html: the comparison table (one row per run: the swept values and the
  metrics of DESIGN.md's contract, accuracies with their 95 % intervals), the study's target checks
  (PASS / FAIL / unresolved / not measurable: the accuracy drop against the full-precision teacher
  judged by its interval, ACCURACY_RULE; speed and memory against the median of like-for-like
  baseline runs, BASELINE_RULE), when runs carry edge/* metrics (profile under
  hardware.memory_budget_gb) the edge view (which configurations fit each budget, their accuracy
  and latency, the Pareto front), and the plots;
- runs.csv: the same table with values at full precision (a metric's logged interval beside it);
- throughput_vs_memory.png, accuracy_vs_memory.png, loss_curves.png, kd_loss_curves.png (a plot
  is left out, and the report says why, when no run has its data), and edge_memory_vs_latency.png
  with the edge view;

and logs them as artifacts (under `report/`) of the report job's own MLflow run. At the end of a
sweep the same report of that sweep is logged to the sweep's parent run (firstsight.suite.callbacks).

One module per job, each reading top to bottom:

- `task`: the entry point (`report`) and the list of target checks (`target_checks`);
- `store`: the only part that talks to MLflow (`read_runs`, `loss_histories`);
- `selection`: which runs (the experiment's, or one sweep's) and what was left out;
- `records`: a run as the report reads it (`RunRecord`), the metric and tag names, the swept values;
- `cells`: how a value is written (`fmt`, `with_interval`, `run_label`);
- `table`: the comparison table, its summary over seeds, runs.csv;
- `checks`: a check and its rows (one run, one verdict); `accuracy`: the accuracy drop's verdict;
  `baselines`: like-for-like baseline runs; `speed`: throughput and VRAM over those baselines;
- `edge`: the edge view and its Pareto front; `plots`: the PNGs;
- `markdown`: report.md and report.html.

The pure parts are tested on synthetic `RunRecord`s. mlflow, matplotlib and markdown-it are imported
inside functions. The names below are this package's public interface.
"""

from firstsight.tasks.report.accuracy import ACCURACY_RULE, accuracy_verdict, teacher_quantization
from firstsight.tasks.report.baselines import BASELINE_RULE, find_baselines, is_baseline, unlike
from firstsight.tasks.report.cells import fmt, run_label, with_interval
from firstsight.tasks.report.checks import Check, CheckRow
from firstsight.tasks.report.edge import EDGE_OBJECTIVES, EDGE_RULE, EdgeRow, EdgeView, edge_view, pareto_front
from firstsight.tasks.report.markdown import md_escape, md_unescape, render_html, render_markdown
from firstsight.tasks.report.plots import Plot, edge_plot, make_plots
from firstsight.tasks.report.records import METRIC_COLUMNS, RunRecord, estimate, swept_keys
from firstsight.tasks.report.selection import Selection, select_runs
from firstsight.tasks.report.store import read_runs
from firstsight.tasks.report.table import Column, Table, build_table, display_rows, over_seeds, table_csv
from firstsight.tasks.report.task import report, target_checks

__all__ = [
    "ACCURACY_RULE",
    "BASELINE_RULE",
    "EDGE_OBJECTIVES",
    "EDGE_RULE",
    "METRIC_COLUMNS",
    "Check",
    "CheckRow",
    "Column",
    "EdgeRow",
    "EdgeView",
    "Plot",
    "RunRecord",
    "Selection",
    "Table",
    "accuracy_verdict",
    "build_table",
    "display_rows",
    "edge_plot",
    "edge_view",
    "estimate",
    "find_baselines",
    "fmt",
    "is_baseline",
    "make_plots",
    "md_escape",
    "md_unescape",
    "over_seeds",
    "pareto_front",
    "read_runs",
    "render_html",
    "render_markdown",
    "report",
    "run_label",
    "select_runs",
    "swept_keys",
    "table_csv",
    "target_checks",
    "teacher_quantization",
    "unlike",
    "with_interval",
]
