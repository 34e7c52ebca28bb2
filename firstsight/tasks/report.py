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
- throughput_vs_memory.png, accuracy_vs_memory.png, loss_curves.png (a plot is left out, and
  the report says why, when no run has its data), and edge_memory_vs_latency.png with the edge view;

and logs them as artifacts (under `report/`) of the report job's own MLflow run.

Reading (`read_runs`, the only part that talks to MLflow) is kept apart from the pure functions
that select runs, build the table, pick baselines and judge the targets, so those are tested on
synthetic `RunRecord`s. mlflow, matplotlib and markdown-it are imported inside functions.
"""

from __future__ import annotations

import csv
import datetime
import io
import logging
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from firstsight.core.errors import FirstSightError
from firstsight.core.files import write_atomically
from firstsight.evaluation.stats import FAIL, NOT_MEASURABLE, PASS, UNRESOLVED, Estimate, Verdict, at_most
from firstsight.models.parts import PARTS
from firstsight.tracking.tracker import CODE_VERSION_TAG

log = logging.getLogger(__name__)

# Metric columns of the table, in order: (MLflow metric, column header, meaning). A column appears
# when at least one selected run has the metric; a run without it gets an empty cell.
METRIC_COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    (
        "perf/throughput_tokens_per_s",
        "train tokens/s",
        "training throughput, tokens per second (steady state, warm-up excluded)",
    ),
    ("perf/throughput_samples_per_s", "train samples/s", "training throughput, samples per second (steady state)"),
    ("perf/peak_vram_gb", "peak VRAM GB", "peak GPU memory allocated (torch.cuda.max_memory_allocated), GB"),
    ("perf/peak_rss_gb", "peak RSS GB (CPU)", "peak resident memory of the process on a CPU run, GB (not VRAM)"),
    ("infer/latency_p50_s", "latency p50 s", "single-query generation latency, median, seconds (profile)"),
    ("infer/throughput_qps", "infer queries/s", "batched generation throughput, queries per second (profile)"),
    ("model/weights_gb", "weights GB", "size of the (student / profiled) model's weights as loaded, GB"),
    ("train/kd_loss", "KD loss (last)", "the KD term at the last optimizer step (before alpha and T²)"),
    ("eval/teacher_accuracy", "teacher acc", "teacher accuracy on the validation split"),
    (
        "eval/full_precision_teacher_accuracy",
        "full-precision teacher acc",
        "accuracy of the teacher unquantized (the run's own teacher when that is not quantized)",
    ),
    ("eval/student_accuracy", "student acc", "student accuracy on the validation split"),
    ("eval/accuracy_drop", "acc drop", "teacher accuracy − student accuracy (0.01 = 1 point)"),
    (
        "eval/full_precision_accuracy_drop",
        "acc drop vs full-precision teacher",
        "full-precision teacher accuracy − student accuracy on the same questions: the drop the study judges",
    ),
    ("eval/teacher_blind_accuracy", "teacher blind acc", "teacher accuracy with the frames blanked"),
    ("eval/student_blind_accuracy", "student blind acc", "student accuracy with the frames blanked"),
    ("eval/student_accuracy_before", "student acc before", "student accuracy before distillation"),
    ("eval/distill_gain", "distill gain", "student accuracy after − before distillation, on the same questions"),
)
TRAIN_THROUGHPUT = "perf/throughput_tokens_per_s"
PEAK_VRAM = "perf/peak_vram_gb"
PEAK_RSS = "perf/peak_rss_gb"
ACCURACY_DROP = "eval/accuracy_drop"
FULL_PRECISION_DROP = "eval/full_precision_accuracy_drop"
TEACHER_ACCURACY = "eval/teacher_accuracy"
FULL_PRECISION_TEACHER = "eval/full_precision_teacher_accuracy"
QUESTIONS = "eval/questions"
CHANCE = "eval/chance_accuracy"
# Tags that say where and with what a run ran: a run is compared only with baselines that agree on them.
DEVICE_TAG = "firstsight.device_name"
VERSION_TAG_PREFIX = "version."
TEACHER_PRECISION_TAG = "firstsight.teacher_precision."
NONE_VALUES = ("None", "none", "null", "")
# Params that say how a run was compressed: a run and its baseline may differ in these only.
COMPRESSION_PREFIXES = ("precision.", "lora.")
# Params that never make runs incomparable, nor a column (names and bookkeeping).
IGNORED_PREFIXES = ("tracking.",)
FINISHED = "FINISHED"
FAILED_STATUSES = ("FAILED", "KILLED")
MAX_LOSS_CURVES = 40
PLOT_FILES = ("throughput_vs_memory.png", "accuracy_vs_memory.png", "loss_curves.png")
BASELINE_RULE = (
    "The baselines of a run are the full-precision runs of the same task: `precision.dtype=float32`, "
    "no quantization (`precision.quantization=none`, no `precision.teacher_quantization`, no part of "
    "`precision.parts` set to another dtype or quantized), no LoRA (an fp32 LoRA run is no baseline) "
    "and, for distill, float32 trainable weights (`precision.trainable_dtype=float32`), "
    "that have the same value as the run for every other param that differs among the runs here "
    "(only `precision.*` and `lora.*`, the compression choices, may differ), and that ran like for like: "
    "on the same device (tag `firstsight.device_name`), with the same package versions (tags `version.*`) "
    "and the same code version (tag `firstsight.code_version`: the git commit, `+dirty` when the checkout "
    "had uncommitted changes, which the tag does not tell apart). The ratio is the run's value over the "
    "**median** of its baselines' values; the table shows how many baseline runs there are and the "
    "min–max of their values and of the run's ratios to each. With one baseline run the verdict stands "
    "but the row says to repeat it. A run with no like-for-like baseline is *not measurable*, with the "
    "reason; no figure is estimated for it. Baseline runs themselves are not checked."
)
ACCURACY_RULE = (
    "Accuracies are shown as value [95 % interval] (Wilson) where the run logged one, and a drop with "
    "its paired 95 % interval (bootstrap over the same questions). The accuracy target is judged on the "
    "drop against the **full-precision** teacher (`eval/full_precision_accuracy_drop`); where the run's "
    "teacher is quantized the drop against that teacher is shown beside it, not judged (a quantized "
    "teacher that lost accuracy would let a poor student pass). Runs that did not log it are judged on "
    "`eval/accuracy_drop` when their teacher is not quantized. The verdict reads the interval, never the "
    "point estimate: **PASS** when its upper bound is ≤ the target, **FAIL** when its lower bound is "
    "above the target, otherwise *unresolved*, with about how many questions would decide it (the "
    "interval narrows as 1/√questions). A run that logged no interval is *unresolved* (rerun with this "
    "version). An interval of no width (teacher and student differ the same way on every question) is "
    "taken as ± 3/questions. *Not measurable*: the teacher is not above chance (its interval's lower "
    "bound ≤ `eval/chance_accuracy`, e.g. random weights), so a drop of 0 says nothing. A model whose "
    "accuracy with the frames blanked (`eval/teacher_blind_accuracy`, `eval/student_blind_accuracy`) "
    "lies inside its real accuracy's interval, while that interval is above chance, is flagged as not "
    "looking at the frames."
)


# ----------------------------------------------------------------------------- records


@dataclass
class RunRecord:
    """What the report needs of one MLflow run (built from MLflow, or by hand in tests)."""

    run_id: str
    name: str = ""
    status: str = FINISHED
    start_time: int = 0  # ms since the epoch
    params: Dict[str, str] = field(default_factory=dict)
    metrics: Dict[str, float] = field(default_factory=dict)
    tags: Dict[str, str] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.tags.get("firstsight.task") or self.params.get("task.name", "")

    @property
    def short_id(self) -> str:
        return self.run_id[:8]

    @property
    def sweep_id(self) -> str:
        return self.tags.get("firstsight.sweep_id", "none")

    @property
    def parent_id(self) -> Optional[str]:
        return self.tags.get("mlflow.parentRunId")


@dataclass
class Selection:
    """The runs chosen for the report, and what was left out and why."""

    experiment: str
    store: str
    runs: List[RunRecord]
    scope: str  # "all job runs of the experiment" or "sweep <dir> (parent run <id>)"
    sweep_parent: Optional[RunRecord] = None
    left_out: Dict[str, int] = field(default_factory=dict)  # reason -> count


def is_sweep_parent(record: RunRecord, parent_ids: Iterable[str] = ()) -> bool:
    tags = record.tags
    return tags.get("firstsight.role") == "sweep" or "firstsight.jobs" in tags or record.run_id in set(parent_ids)


def is_report_run(record: RunRecord) -> bool:
    return record.task == "report" or record.params.get("task.name") == "report"


def select_runs(
    records: Sequence[RunRecord],
    experiment: str,
    store: str,
    sweep: Optional[str] = None,
    include_failed: bool = False,
    max_runs: int = 1000,
    cwd: Optional[str] = None,
    own_run_id: Optional[str] = None,
) -> Selection:
    """The job runs to report on: sweep parents, report runs and runs FirstSight did not create are
    never rows; FAILED/KILLED only with `include_failed`; runs still going never. Raises
    FirstSightError when nothing is left, naming the experiment (and sweep) and what exists.
    `own_run_id`: the report job's own run, which is neither a row nor counted."""
    cwd = cwd or os.getcwd()
    records = [r for r in records if r.run_id != own_run_id]
    parent_ids = {r.parent_id for r in records if r.parent_id}
    parents = [r for r in records if is_sweep_parent(r, parent_ids)]
    left_out: Dict[str, int] = {}

    def leave_out(reason: str, count: int = 1) -> None:
        if count:
            left_out[reason] = left_out.get(reason, 0) + count

    leave_out("sweep parent runs", len(parents))
    parent_set = {p.run_id for p in parents}
    candidates = []
    for record in records:
        if record.run_id in parent_set:
            continue
        if "firstsight.task" not in record.tags:
            leave_out("runs without a firstsight.task tag (not FirstSight jobs)")
        elif is_report_run(record):
            leave_out("report runs")
        else:
            candidates.append(record)

    scope = "all job runs of the experiment"
    parent: Optional[RunRecord] = None
    if sweep:
        parent, members = _resolve_sweep(sweep, parents, candidates, records, experiment, cwd)
        leave_out("job runs of other sweeps or of no sweep", len(candidates) - len(members))
        candidates = members
        sweep_dir = parent.sweep_id if parent is not None else members[0].sweep_id if members else sweep
        scope = f"sweep {sweep_dir}" + (f" (parent run {parent.run_id})" if parent is not None else "")

    selected = []
    for record in candidates:
        if record.status == FINISHED or (include_failed and record.status in FAILED_STATUSES):
            selected.append(record)
        elif record.status in FAILED_STATUSES:
            leave_out("FAILED/KILLED runs (task.include_failed=true shows them)")
        else:
            leave_out(f"{record.status} runs (not over yet)")
    selected.sort(key=lambda r: (r.start_time, int(r.tags.get("firstsight.job_num", 0) or 0), r.run_id))
    if len(selected) > max_runs:
        leave_out(f"older runs beyond task.max_runs={max_runs}", len(selected) - max_runs)
        selected = selected[-max_runs:]
    if not selected:
        what = f"sweep {sweep!r} of experiment {experiment!r}" if sweep else f"experiment {experiment!r}"
        why = "; ".join(f"{n} {reason}" for reason, n in left_out.items()) or "it holds no runs"
        raise FirstSightError(
            f"no job runs to report in {what} ({store}): {why}. Run some jobs first "
            f"(python run.py -m precision=fp32,bf16), choose another with task.experiment=<name>"
            + (", task.sweep=latest or leave task.sweep unset" if sweep else "")
            + "."
        )
    return Selection(
        experiment=experiment, store=store, runs=selected, scope=scope, sweep_parent=parent, left_out=left_out
    )


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _read_as_number(sweep: str, parents: List[RunRecord]) -> List[RunRecord]:
    """The parents one of whose id prefixes (6+ characters, digits with at most one 'e') has the
    value `sweep` has as a number: Hydra turns an unquoted task.sweep=17966e17 into the float
    1.7966e+21 (and 012345 into 12345) before the task sees it."""
    value = _number(sweep)
    if value is None:
        return []
    numeric_prefix = re.compile(r"[0-9]+(e[0-9]+)?")
    found = []
    for parent in parents:
        prefixes = (parent.run_id[:n] for n in range(6, len(parent.run_id) + 1))
        if any(numeric_prefix.fullmatch(p) and float(p) == value for p in prefixes):
            found.append(parent)
    if len(found) == 1:
        log.info(
            "task.sweep=%s: read as parent run %s (Hydra had read the id's prefix as a number)", sweep, found[0].run_id
        )
    return found


def _resolve_sweep(
    sweep: str, parents: List[RunRecord], jobs: List[RunRecord], records: Sequence[RunRecord], experiment: str, cwd: str
) -> Tuple[Optional[RunRecord], List[RunRecord]]:
    """`sweep` as "latest", a parent run id (or a unique prefix of one), or a multirun directory."""
    parent: Optional[RunRecord] = None
    if sweep == "latest":
        own = [p for p in parents if p.task != "report"]
        if not own:
            raise FirstSightError(
                f"task.sweep=latest: experiment {experiment!r} holds no sweep (no parent run of a "
                f"`python run.py -m ...`); leave task.sweep unset to report on all its runs."
            )
        parent = max(own, key=lambda p: (p.start_time, p.run_id))
    else:
        by_id = [p for p in parents if p.run_id == sweep or (len(sweep) >= 6 and p.run_id.startswith(sweep))]
        if not by_id:
            by_id = _read_as_number(sweep, parents)
        if len(by_id) == 1:
            parent = by_id[0]
        else:
            wanted = _path_forms(sweep, cwd)
            in_dir = {r.run_id for r in records if _sweep_dirs(r, cwd) & wanted}
            if not in_dir:
                raise FirstSightError(
                    f"task.sweep={sweep!r}: no sweep of experiment {experiment!r} has that parent run id or "
                    f"multirun directory. Its sweeps: {_describe_sweeps(parents, jobs, cwd)}. Give one of "
                    f"those directories or parent run ids, or task.sweep=latest."
                    + (
                        " (Hydra reads an unquoted id made of digits, maybe with one 'e', as a number: "
                        "quote it, e.g. task.sweep=\"'<id>'\".)"
                        if _number(sweep) is not None
                        else ""
                    )
                )
            parent_ids = {p.run_id for p in parents if p.run_id in in_dir}
            parent_ids |= {r.parent_id for r in records if r.run_id in in_dir and r.parent_id}
            found = [p for p in parents if p.run_id in parent_ids]
            parent = found[0] if len(found) == 1 else None
            members = [r for r in jobs if r.run_id in in_dir or (r.parent_id and r.parent_id in parent_ids)]
            return parent, members
    dirs = _sweep_dirs(parent, cwd)
    members = [r for r in jobs if r.parent_id == parent.run_id or (r.sweep_id != "none" and _sweep_dirs(r, cwd) & dirs)]
    return parent, members


def _path_forms(path: str, cwd: str) -> set:
    expanded = os.path.expanduser(path)
    absolute = os.path.normpath(os.path.join(cwd, expanded))
    return {os.path.normpath(expanded), absolute, os.path.realpath(absolute)}


def _sweep_dirs(record: RunRecord, cwd: str) -> set:
    """Ways to name the sweep directory of a run: its firstsight.sweep_id tag as written, resolved
    against the current directory, and resolved through the job's own (absolute) output directory,
    which is <launch dir>/<sweep dir>/<job subdir>."""
    sweep_id = record.sweep_id
    if not sweep_id or sweep_id == "none":
        return set()
    forms = _path_forms(sweep_id, cwd)
    output_dir = record.tags.get("firstsight.output_dir", "")
    if output_dir and os.path.isabs(output_dir) and not os.path.isabs(sweep_id):
        marker = os.sep + os.path.normpath(sweep_id) + os.sep
        found = os.path.normpath(output_dir).rfind(marker)
        if found >= 0:
            launched = os.path.normpath(output_dir)[: found + len(marker) - 1]
            forms |= {launched, os.path.realpath(launched)}
    return forms


def _describe_sweeps(parents: List[RunRecord], jobs: List[RunRecord], cwd: str) -> str:
    if not parents:
        return "none"
    lines = []
    for p in sorted(parents, key=lambda p: -p.start_time)[:10]:
        count = sum(1 for j in jobs if j.parent_id == p.run_id)
        lines.append(f"{p.sweep_id} (parent run {p.run_id}, {count} job runs, task {p.task or '?'})")
    more = f", and {len(parents) - 10} more" if len(parents) > 10 else ""
    return "; ".join(lines) + more


# ----------------------------------------------------------------------------- table


@dataclass
class Column:
    key: str  # a param name, a metric name, or "run" / "status" / "task"
    header: str
    kind: str  # "run" | "status" | "param" | "metric"


@dataclass
class Table:
    columns: List[Column]
    rows: List[List[Any]]  # raw values: str for params, float (or None) for metrics
    runs: List[RunRecord]

    def column(self, key: str) -> List[Any]:
        index = [c.key for c in self.columns].index(key)
        return [row[index] for row in self.rows]


def _ignored(key: str) -> bool:
    return key.startswith(IGNORED_PREFIXES)


def swept_keys(runs: Sequence[RunRecord]) -> List[str]:
    """Params whose value differs among `runs` (a param a run lacks counts as a value of its own),
    task.name excepted (the task has its own column)."""
    keys = sorted({k for r in runs for k in r.params})
    return [k for k in keys if k != "task.name" and not _ignored(k) and len({r.params.get(k) for r in runs}) > 1]


def build_table(runs: Sequence[RunRecord]) -> Table:
    """One row per run: run id, (status when any run did not finish), task, the swept values, then
    each metric of METRIC_COLUMNS that some run has."""
    columns = [Column("run", "run", "run")]
    if any(r.status != FINISHED for r in runs):
        columns.append(Column("status", "status", "status"))
    columns.append(Column("task", "task", "param"))
    columns += [Column(k, k, "param") for k in swept_keys(runs)]
    columns += [Column(m, header, "metric") for m, header, _ in METRIC_COLUMNS if any(m in r.metrics for r in runs)]
    rows = []
    for run in runs:
        row: List[Any] = []
        for column in columns:
            if column.kind == "run":
                row.append(run.short_id)
            elif column.kind == "status":
                row.append(run.status)
            elif column.key == "task":
                row.append(run.task)
            elif column.kind == "param":
                row.append(run.params.get(column.key))
            else:
                row.append(run.metrics.get(column.key))
        rows.append(row)
    return Table(columns=columns, rows=rows, runs=list(runs))


SEED_KEY = "seed"


def over_seeds(table: Table) -> Optional[Tuple[List[str], List[List[str]]]]:
    """When `seed` is among the swept values: one row per setting (task + the other swept values)
    with each metric's mean ± sample standard deviation over that setting's seeds, and n.
    None when the runs do not differ by seed."""
    keys = [c.key for c in table.columns]
    if SEED_KEY not in keys:
        return None
    setting_columns = [c for c in table.columns if c.kind == "param" and c.key != SEED_KEY]
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
            values = [row[keys.index(column.key)] for row in members if row[keys.index(column.key)] is not None]
            if not values:
                cells.append("")
                continue
            mean = sum(values) / len(values)
            if len(values) > 1:
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                cells.append(f"{fmt(mean)} ± {fmt(std)}")
            else:
                cells.append(f"{fmt(mean)} (n=1)")
        rows.append(cells)
    return headers, rows


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


def run_label(run: RunRecord, swept: Sequence[str]) -> str:
    """A short name for plots: the run's swept values (precision first), else its id."""
    keys = sorted(swept, key=lambda k: (not k.startswith("precision.name"), k))
    parts = [
        f"{k.rsplit('.', 1)[-1]}={run.params.get(k, '')}" if k != "precision.name" else run.params.get(k, "")
        for k in keys
        if not (k.startswith("precision.") and k != "precision.name")
    ]
    return " ".join(p for p in parts if p) or run.short_id


# ----------------------------------------------------------------------------- targets


@dataclass
class CheckRow:
    """One run judged against one target. Accuracy rows: `value` is the judged drop. Ratio rows:
    `value` the run's metric, `baselines` its like-for-like baseline runs, `baseline_value` their
    median and `ratio` = value / that median."""

    run: RunRecord
    value: Optional[float]
    target: float
    verdict: Verdict
    baselines: List[RunRecord] = field(default_factory=list)
    baseline_value: Optional[float] = None
    ratio: Optional[float] = None
    baseline_values: List[float] = field(default_factory=list)  # each baseline's, in `baselines`' order
    notes: List[str] = field(default_factory=list)
    flags: List[str] = field(default_factory=list)  # accuracy rows: "<role> not looking at the frames: ..."

    @property
    def passed(self) -> bool:
        return self.verdict.status == PASS


@dataclass
class Check:
    title: str
    metric: str
    target_text: str
    rows: List[CheckRow] = field(default_factory=list)
    not_measurable: List[str] = field(default_factory=list)  # why the whole check could not be made
    note: str = ""

    def count(self, status: str) -> int:
        return sum(r.verdict.status == status for r in self.rows)

    @property
    def passed(self) -> int:
        return self.count(PASS)

    @property
    def failed(self) -> int:
        return self.count(FAIL)


def _none(value: Optional[str]) -> bool:
    return value is None or value in NONE_VALUES


def is_baseline(run: RunRecord) -> bool:
    """Full precision, nothing quantized, no LoRA (the uncompressed reference); a distill run also
    trains float32 weights (not pure bf16 training, precision.trainable_dtype=bfloat16)."""
    p = run.params
    parts_full = all(
        value in ("None", "none", "float32") for key, value in p.items() if key.startswith("precision.parts.")
    )  # no part set to another dtype or quantized
    return (
        p.get("precision.dtype") == "float32"
        and p.get("precision.quantization", "none") == "none"
        and _none(p.get("precision.teacher_quantization"))
        and p.get("lora.enabled", "False").lower() not in ("true", "1")
        and (run.task != "distill" or p.get("precision.trainable_dtype", "float32") == "float32")
        and parts_full
    )


def find_baselines(run: RunRecord, runs: Sequence[RunRecord], swept: Sequence[str]) -> List[RunRecord]:
    """The full-precision runs of the same task with the same other swept values (see BASELINE_RULE),
    like for like or not (`unlike` tells); none for a baseline run itself."""
    if is_baseline(run):
        return []
    keys = [k for k in swept if not k.startswith(COMPRESSION_PREFIXES)]
    return [
        b
        for b in runs
        if b is not run
        and b.task == run.task
        and is_baseline(b)
        and all(b.params.get(k) == run.params.get(k) for k in keys)
    ]


def unlike(run: RunRecord, base: RunRecord) -> Optional[str]:
    """Why `base` is not a like-for-like baseline of `run`: another device, other package versions or
    another code version (by their tags); None when it is. A tag neither run has does not differ."""
    reasons = []
    here, there = run.tags.get(DEVICE_TAG), base.tags.get(DEVICE_TAG)
    if here != there:
        reasons.append(
            f"baseline {base.short_id} on {there or 'an unrecorded device'}, "
            f"this run on {here or 'an unrecorded device'}"
        )
    keys = sorted({k for k in (*run.tags, *base.tags) if k.startswith(VERSION_TAG_PREFIX)})
    versions = [
        f"{k[len(VERSION_TAG_PREFIX) :]} {base.tags.get(k, 'unrecorded')} vs {run.tags.get(k, 'unrecorded')}"
        for k in keys
        if run.tags.get(k) != base.tags.get(k)
    ]
    if versions:
        reasons.append(
            f"baseline {base.short_id} ran other package versions ({', '.join(versions)}: baseline vs this run)"
        )
    here, there = run.tags.get(CODE_VERSION_TAG), base.tags.get(CODE_VERSION_TAG)
    if here != there:
        reasons.append(
            f"baseline {base.short_id} ran code version {there or 'unrecorded'}, this run {here or 'unrecorded'}"
        )
    return "; ".join(reasons) or None


def target_checks(
    runs: Sequence[RunRecord], accuracy_drop_target: float, throughput_gain_target: float, vram_saving_target: float
) -> List[Check]:
    swept = swept_keys(runs)
    return [
        _accuracy_check(runs, accuracy_drop_target),
        _ratio_check(
            runs,
            swept,
            "Training throughput gain",
            TRAIN_THROUGHPUT,
            ("distill",),
            f"≥ {throughput_gain_target:g}× the baseline's {TRAIN_THROUGHPUT}",
            throughput_gain_target,
            lambda ratio: ratio >= throughput_gain_target,
        ),
        _memory_check(runs, swept, vram_saving_target),
    ]


def estimate(run: RunRecord, metric: str) -> Optional[Estimate]:
    """`metric` with its logged 95 % interval (`<metric>_ci_low`, `<metric>_ci_high`) over the run's
    `eval/questions` (0 when not logged); None when the run lacks the metric or its interval."""
    m = run.metrics
    names = (metric, f"{metric}_ci_low", f"{metric}_ci_high")
    if not all(name in m and math.isfinite(m[name]) for name in names):
        return None
    questions = m.get(QUESTIONS)
    n = int(questions) if questions is not None and math.isfinite(questions) else 0
    return Estimate(m[metric], m[names[1]], m[names[2]], n)


def with_interval(run: RunRecord, metric: str) -> str:
    """A metric as the tables show it: `0.461 [0.378, 0.546]` with its interval, else the value alone."""
    if metric not in run.metrics:
        return ""
    found = estimate(run, metric)
    return str(found) if found is not None else fmt(run.metrics[metric])


def teacher_quantization(run: RunRecord) -> Optional[str]:
    """How the run's teacher was quantized (e.g. "nf4"; "int8, nf4" if its parts differ), None when
    it was not: from the `firstsight.teacher_precision.<part>.quantization` tags where the run has
    them, else from its params (`precision.teacher_quantization`, else `precision.quantization`,
    and `precision.parts.<part>.quantization` where set)."""
    tagged = [v for k, v in run.tags.items() if k.startswith(TEACHER_PRECISION_TAG) and k.endswith(".quantization")]
    if tagged:
        kinds = {v for v in tagged if not _none(v)}
    else:
        p = run.params
        own = p.get("precision.teacher_quantization", "None")  # None: the teacher follows precision.quantization
        model_wide = p.get("precision.quantization", "none") if own in ("None", "null", "") else own
        kinds = set()
        for part in PARTS:
            setting = p.get(f"precision.parts.{part}.quantization", "None")
            kind = model_wide if setting == "None" else setting  # None: follows the model-wide setting
            if not _none(kind):
                kinds.add(kind)
    return ", ".join(sorted(kinds)) or None


def _rule_of_three(drop: Estimate) -> Estimate:
    """A drop whose interval has no width (every question's teacher − student difference the same,
    e.g. no question answered differently, where a bootstrap has nothing to resample) widened to
    ± 3/n: the 95 % bound on the share of questions the two answer differently when none did in n."""
    if drop.n <= 0 or drop.high > drop.low:
        return drop
    bound = 3.0 / drop.n
    return Estimate(drop.value, drop.value - bound, drop.value + bound, drop.n)


def accuracy_verdict(run: RunRecord, target: float) -> CheckRow:
    """The run's accuracy drop against `target` (see ACCURACY_RULE), with its notes and flags."""
    m = run.metrics
    quantized = teacher_quantization(run)
    teacher_metric = FULL_PRECISION_TEACHER if FULL_PRECISION_TEACHER in m else TEACHER_ACCURACY
    teacher = estimate(run, teacher_metric)
    chance = m.get(CHANCE)
    judged = FULL_PRECISION_DROP if FULL_PRECISION_DROP in m else ACCURACY_DROP
    drop = estimate(run, judged)
    row = CheckRow(run, m.get(judged), target, Verdict(UNRESOLVED, ""))
    teacher_value = m.get(teacher_metric)
    if chance is not None and teacher_value is not None and not (teacher.low if teacher else teacher_value) > chance:
        shown = str(teacher) if teacher is not None else f"{teacher_value:.3f}"
        row.verdict = Verdict(
            NOT_MEASURABLE,
            f"the teacher ({shown}) is not above chance ({chance:.3f}): "
            "its accuracy says nothing (random or untrained weights?)",
        )
    elif judged == ACCURACY_DROP and quantized:
        row.verdict = Verdict(
            UNRESOLVED,
            f"the teacher is quantized ({quantized}) and the run logged no drop "
            f"against the full-precision teacher ({FULL_PRECISION_DROP}): "
            "rerun with this version",
        )
    elif drop is None:
        row.verdict = Verdict(UNRESOLVED, "no interval: rerun with this version")
    elif drop.n == 0:
        row.verdict = Verdict(UNRESOLVED, f"no question count ({QUESTIONS}): rerun with this version")
    else:
        row.verdict = at_most(_rule_of_three(drop), target, teacher=teacher, chance=chance)
    own = m.get(ACCURACY_DROP)
    if own is not None and own < 0:
        row.notes.append(
            f"student above its {'quantized ' if quantized else ''}teacher (drop {with_interval(run, ACCURACY_DROP)})"
        )
    if quantized and m.get(FULL_PRECISION_DROP, 0.0) < 0:
        row.notes.append(f"student above the full-precision teacher (drop {with_interval(run, FULL_PRECISION_DROP)})")
    for role in ("teacher", "student"):
        real, blind = estimate(run, f"eval/{role}_accuracy"), m.get(f"eval/{role}_blind_accuracy")
        above_chance = chance is None or (real is not None and real.low > chance)  # at chance it uses nothing
        if real is not None and blind is not None and above_chance and real.low <= blind <= real.high:
            row.flags.append(
                f"{role} not looking at the frames: blind {blind:.3f} within its interval "
                f"[{real.low:.3f}, {real.high:.3f}]"
            )
    return row


def _accuracy_check(runs: Sequence[RunRecord], target: float) -> Check:
    check = Check(
        "Accuracy drop",
        ACCURACY_DROP,
        f"teacher − student accuracy ≤ {target:g} (= {100 * target:g} percentage "
        f"point{'' if 100 * target == 1 else 's'}), the full-precision teacher's, by the 95 % interval",
    )
    for run in runs:
        if run.task in ("distill", "evaluate") and (ACCURACY_DROP in run.metrics or FULL_PRECISION_DROP in run.metrics):
            check.rows.append(accuracy_verdict(run, target))
    if not check.rows:
        check.not_measurable.append(
            f"no distill or evaluate run here has {ACCURACY_DROP} "
            "(distill with train.eval_at_end=true, or task=evaluate, logs it)"
        )
    return check


def _memory_check(runs: Sequence[RunRecord], swept: Sequence[str], target: float) -> Check:
    text = f"≤ {target:g}× the baseline's {PEAK_VRAM}"
    if any(PEAK_VRAM in r.metrics for r in runs):
        return _ratio_check(
            runs, swept, "VRAM saving", PEAK_VRAM, ("distill", "profile"), text, target, lambda ratio: ratio <= target
        )
    check = Check("VRAM saving", PEAK_VRAM, text)
    check.not_measurable.append(
        f"no run here has {PEAK_VRAM}: they ran on the CPU, where peak resident memory ({PEAK_RSS}) is "
        "measured instead; RSS is not VRAM, so the VRAM target is not judged (RSS is in the table)"
    )
    return check


def _ratio_check(
    runs: Sequence[RunRecord],
    swept: Sequence[str],
    title: str,
    metric: str,
    tasks: Tuple[str, ...],
    target_text: str,
    target: float,
    ok: Callable[[float], bool],
) -> Check:
    check = Check(title, metric, target_text)
    relevant = [r for r in runs if r.task in tasks and metric in r.metrics]
    if not relevant:
        check.not_measurable.append(f"no {' or '.join(tasks)} run here has {metric}")
        return check
    compressed = [r for r in relevant if not is_baseline(r)]
    if not compressed:
        check.not_measurable.append(
            "every run with this metric is a baseline (full-precision) run: nothing compressed to compare"
        )
        return check
    if not any(is_baseline(r) for r in relevant):
        check.not_measurable.append(
            f"no full-precision baseline run with {metric} here (add precision=fp32 to the sweep)"
        )
        return check
    sign = "≥" if metric == TRAIN_THROUGHPUT else "≤"
    for run in compressed:
        value = run.metrics[metric]
        row = CheckRow(run, value, target, Verdict(NOT_MEASURABLE, ""))
        check.rows.append(row)
        candidates = find_baselines(run, relevant, swept)
        if not candidates:
            row.verdict = Verdict(NOT_MEASURABLE, "no full-precision run with the same other swept values")
            continue
        reasons = {b.run_id: unlike(run, b) for b in candidates}
        row.baselines = sorted(
            (b for b in candidates if reasons[b.run_id] is None), key=lambda b: (b.start_time, b.run_id)
        )
        if not row.baselines:
            row.verdict = Verdict(NOT_MEASURABLE, "no like-for-like baseline: " + "; ".join(reasons.values()))
            continue
        broken = [b for b in row.baselines if not b.metrics[metric] > 0]
        if broken:
            row.verdict = Verdict(
                NOT_MEASURABLE, "; ".join(f"baseline {b.short_id} has {metric}={b.metrics[metric]}" for b in broken)
            )
            continue
        values = row.baseline_values = [b.metrics[metric] for b in row.baselines]
        row.baseline_value = statistics.median(values)
        row.ratio = value / row.baseline_value
        row.verdict = Verdict(
            PASS if ok(row.ratio) else FAIL,
            f"{row.ratio:.3f}× the median of {len(values)} baseline value{'s' * (len(values) > 1)}"
            f"{'' if ok(row.ratio) else ', not'} {sign} {target:g}×",
        )
        ratios = [value / v for v in values]
        if len(values) == 1:
            row.notes.append("1 baseline run: repeat it for a spread")
        elif ok(min(ratios)) != ok(max(ratios)):
            row.notes.append(
                f"the ratios to single baselines ({min(ratios):.3f}–{max(ratios):.3f}×) straddle the target"
            )
        left_out = [why for why in reasons.values() if why is not None]
        if left_out:
            row.notes.append("not like for like, left out: " + "; ".join(left_out))
        if CODE_VERSION_TAG not in run.tags:
            row.notes.append(
                "code version not recorded (a run from before firstsight.code_version): "
                "like for like on device and packages only"
            )
    return check


# ----------------------------------------------------------------------------- plots


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


def _axis_label(metric: str) -> str:
    for name, header, _ in METRIC_COLUMNS:
        if name == metric:
            return f"{header}  ({metric})"
    return metric


def make_plots(runs: Sequence[RunRecord], out_dir: Path, histories: Dict[str, List[Tuple[int, float]]]) -> List[Plot]:
    """Write the PNGs that have data; `histories`: run id -> train/loss (step, value) history."""
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
        plots.append(Plot("loss_curves.png", "Training loss curves", skipped="no run here has a train/loss history"))
    else:
        _loss_curves(out_dir / "loss_curves.png", [r for r in runs if r.run_id in curves], curves, swept)
        plots.append(Plot("loss_curves.png", "Training loss curves (train/loss per optimizer step)"))
    for plot in plots:
        if plot.skipped:  # no stale picture from an earlier report in the same directory
            (out_dir / plot.file).unlink(missing_ok=True)
    return plots


def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

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


def _loss_curves(
    path: Path, runs: Sequence[RunRecord], curves: Dict[str, List[Tuple[int, float]]], swept: Sequence[str]
) -> None:
    figure, ax = _figure()
    for run in runs:
        steps, values = zip(*curves[run.run_id])
        ax.plot(steps, values, label=f"{run_label(run, swept)} ({run.short_id})", linewidth=1.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train/loss")
    ax.set_title("Training loss", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(figure, path)


def _save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_atomically(path, buffer.getvalue())


# ----------------------------------------------------------------------------- edge view


EDGE_FITS = "edge/fits"
EDGE_PEAK = "edge/peak_gb"
EDGE_BUDGET = "edge/budget_gb"
EDGE_HEADROOM = "edge/headroom_gb"
LATENCY_P50 = "infer/latency_p50_s"
ACCURACY_METRICS = ("eval/student_accuracy", "eval/accuracy")  # the (student's) accuracy, first found
BUDGET_PARAMS = ("hardware.memory_budget_gb", "hardware.name")  # the budget, not the configuration
EDGE_PLOT = "edge_memory_vs_latency.png"
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


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> List[bool]:
    """For each point, whether no other point is at least as good on every objective and better
    on one (`maximize[i]`: higher is better on objective i, else lower is)."""
    signed = [[v if up else -v for v, up in zip(point, maximize)] for point in points]

    def dominates(b: Sequence[float], a: Sequence[float]) -> bool:
        return all(x >= y for x, y in zip(b, a)) and any(x > y for x, y in zip(b, a))

    return [
        not any(dominates(other, point) for j, other in enumerate(signed) if j != i) for i, point in enumerate(signed)
    ]


def _precision_params(run: RunRecord) -> Dict[str, str]:
    return {k: v for k, v in run.params.items() if k.startswith("precision.")}


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


def _budget(run: RunRecord) -> Optional[float]:
    if EDGE_BUDGET in run.metrics:
        return run.metrics[EDGE_BUDGET]
    try:
        return float(run.params["hardware.memory_budget_gb"])
    except (KeyError, ValueError):
        return None


def edge_view(runs: Sequence[RunRecord]) -> Optional[EdgeView]:
    """Which configurations fit each budget, their accuracy and latency, and the Pareto front of
    those that fit; None when no run carries edge/* metrics."""
    edge_runs = [r for r in runs if EDGE_FITS in r.metrics]
    if not edge_runs:
        return None
    swept = [k for k in swept_keys(edge_runs) if k not in BUDGET_PARAMS]
    rows = []
    for run in edge_runs:
        accuracy, source = edge_accuracy(run, runs)
        fits = run.metrics[EDGE_FITS] >= 0.5
        stage = run.tags.get("firstsight.edge.oom_stage")
        note = "" if fits else (f"out of memory while {stage}" if stage else "peak over the budget")
        rows.append(
            EdgeRow(
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
        )
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
    objectives: Dict[Optional[float], List[str]] = {}
    for budget in dict.fromkeys(r.budget for r in rows):
        fitting = [r for r in rows if r.budget == budget and r.fits]
        values = {"accuracy": lambda r: r.accuracy, "peak memory": lambda r: r.peak, "latency p50": lambda r: r.latency}
        used = [
            (name, up) for name, up in EDGE_OBJECTIVES if fitting and all(values[name](r) is not None for r in fitting)
        ]
        objectives[budget] = [name for name, _ in used]
        if not used:
            continue
        front = pareto_front([[values[name](r) for name, _ in used] for r in fitting], [up for _, up in used])
        for row, on in zip(fitting, front):
            row.on_front = on
    return EdgeView(rows=rows, objectives=objectives)


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
    colours = {b: f"C{i % 10}" for i, b in enumerate(budgets)}
    for budget in budgets:
        colour = colours[budget]
        label = f"budget {budget:g} GB" if budget is not None else "no budget"
        group = [r for r in points if r.budget == budget]
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
    ax.set_xlabel(f"peak memory GB  ({EDGE_PEAK})")
    ax.set_ylabel(_axis_label(LATENCY_P50))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(figure, out_dir / EDGE_PLOT)
    return Plot(EDGE_PLOT, title)


def _edge_markdown(view: EdgeView) -> List[str]:
    lines = ["## Edge deployment: fits the budget?", "", EDGE_RULE, ""]
    for budget, used in view.objectives.items():
        group = [r for r in view.rows if r.budget == budget]
        fitting = [r for r in group if r.fits]
        name = f"{budget:g} GB" if budget is not None else "no budget"
        line = f"- {name}: {len(fitting)} of {len(group)} fit"
        if fitting:
            line += " (" + ", ".join(r.config for r in fitting) + ")"
            front = [r.config for r in fitting if r.on_front]
            if used:
                line += f"; Pareto front on {', '.join(used)}: {', '.join(front)}"
            else:
                line += "; no Pareto front: no objective is measured for every fitting configuration"
        lines.append("- " + md_escape(line[2:]))
    headers = [
        "budget GB",
        "configuration",
        "fits",
        "peak GB",
        "basis",
        "headroom GB",
        "latency p50 s",
        "accuracy",
        "accuracy from",
        "Pareto front",
        "note",
        "run",
    ]
    rows = [
        [
            fmt(r.budget),
            r.config,
            "yes" if r.fits else "no",
            fmt(r.peak),
            r.basis,
            fmt(r.headroom),
            fmt(r.latency),
            fmt(r.accuracy),
            r.accuracy_from,
            "front" if r.on_front else "",
            r.note,
            r.run.short_id,
        ]
        for r in view.rows
    ]
    lines += [""] + _md_table(headers, rows) + [""]
    return lines


# ----------------------------------------------------------------------------- rendering


# Inline Markdown syntax (a table cell is parsed inline only): escaped with a backslash. An
# underscore inside a word (forward_kl) is no emphasis and stays as it is, for readable Markdown.
_MD_SPECIAL = re.compile(r"[\\`*\[\]<>|&~]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def md_escape(value: Any) -> str:
    """Text safe in a Markdown table cell or line: inline syntax backslash-escaped, newlines flattened."""
    text = fmt(value).replace("\r", " ").replace("\n", " ")
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), text)


def md_unescape(text: str) -> str:
    """The inverse of md_escape (for reading a report's table back)."""
    return re.sub(r"\\(.)", r"\1", text)


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    lines = ["| " + " | ".join(md_escape(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(md_escape(v) for v in row) + " |" for row in rows]
    return lines


def render_markdown(
    selection: Selection,
    table: Table,
    checks: List[Check],
    plots: List[Plot],
    generated: str,
    edge: Optional[EdgeView] = None,
) -> str:
    lines = [f"# FirstSight report: experiment {md_escape(selection.experiment)}", ""]
    lines += [
        f"- MLflow store: {md_escape(selection.store)}",
        f"- Runs: {md_escape(selection.scope)}; {len(table.rows)} rows",
    ]
    if selection.left_out:
        lines.append("- Left out: " + md_escape("; ".join(f"{n} {why}" for why, n in selection.left_out.items())))
    lines += [f"- Generated: {md_escape(generated)}", ""]

    lines += ["## Comparison", ""]
    lines += _md_table([c.header for c in table.columns], display_rows(table))
    swept = [c.key for c in table.columns if c.kind == "param" and c.key != "task"]
    lines += [
        "",
        "Swept values: "
        + (", ".join(f"`{k}`" for k in swept) if swept else "none (the runs share every param)")
        + " (the params that differ among these runs). An empty cell: the run did not log that metric.",
    ]
    metric_columns = [c for c in table.columns if c.kind == "metric"]
    if metric_columns:
        meaning = {m: text for m, _, text in METRIC_COLUMNS}
        lines += ["", "| column | MLflow metric | meaning |", "|---|---|---|"]
        lines += [f"| {md_escape(c.header)} | `{c.key}` | {md_escape(meaning[c.key])} |" for c in metric_columns]
        if any(f"{c.key}_ci_low" in r.metrics for c in metric_columns for r in table.runs):
            lines += [
                "",
                "In brackets: the 95 % interval the run logged beside the value (`<metric>_ci_low`, "
                "`<metric>_ci_high`).",
            ]
    seeds = over_seeds(table)
    if seeds:
        headers, rows = seeds
        lines += [
            "",
            "## Over seeds (mean ± std)",
            "",
            "The runs above grouped by every swept value but `seed`: mean ± sample standard deviation "
            "over the group's seeds.",
            "",
        ]
        lines += _md_table(headers, rows)
    process_scoped = [r.short_id for r in table.runs if r.tags.get("firstsight.peak_memory_scope") == "process"]
    if process_scoped:
        lines += [
            "",
            "Peak memory of runs " + ", ".join(process_scoped) + " covers their whole process "
            "(earlier jobs of the same process included), not that job alone.",
        ]

    lines += ["", "## Target checks", "", ACCURACY_RULE, "", BASELINE_RULE, ""]
    swept_all = swept_keys(table.runs)
    for check in checks:
        lines += [f"### {check.title}: {md_escape(check.target_text)}", ""]
        if check.rows:
            tabled = (
                _accuracy_rows(check, swept_all) if check.metric == ACCURACY_DROP else _ratio_rows(check, swept_all)
            )
            lines += _md_table(*tabled) + [""]
        flagged = [f"- Run {r.run.short_id}: {md_escape(flag)}" for r in check.rows for flag in r.flags]
        if flagged:
            lines += flagged + [""]
        for why in check.not_measurable:
            lines += [f"- Not measurable: {md_escape(why)}"]
        if check.not_measurable:
            lines.append("")
    counts = {status: sum(c.count(status) for c in checks) for status in (PASS, FAIL, UNRESOLVED, NOT_MEASURABLE)}
    lines += [
        f"In all: {counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[UNRESOLVED]} unresolved, "
        f"{counts[NOT_MEASURABLE]} not measurable (one per run and check); "
        f"{sum(1 for c in checks if not c.rows)} of {len(checks)} checks not measurable at all.",
        "",
    ]
    if edge is not None:
        lines += _edge_markdown(edge)

    lines += ["## Plots", ""]
    for plot in plots:
        lines += [f"### {md_escape(plot.title)}", ""]
        if plot.skipped:
            lines += [f"Not drawn: {md_escape(plot.skipped)}.", ""]
        else:
            lines += [f"![{md_escape(plot.title)}]({plot.file})", ""]
    return "\n".join(lines)


def _accuracy_rows(check: Check, swept: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    """The accuracy check's table. Where some run's teacher is quantized: that teacher, the
    full-precision teacher and the drops against each (the verdict is on the full-precision one)."""
    quantized = {r.run.run_id: teacher_quantization(r.run) for r in check.rows}
    if not any(quantized.values()):
        headers = ["run", "task", "label", "teacher acc", "student acc", "drop", "target", "result", "why", "note"]
        rows = [
            [
                r.run.short_id,
                r.run.task,
                run_label(r.run, swept),
                with_interval(r.run, TEACHER_ACCURACY),
                with_interval(r.run, "eval/student_accuracy"),
                with_interval(r.run, ACCURACY_DROP),
                f"≤ {r.target:g}",
                r.verdict.status,
                r.verdict.reason,
                "; ".join(r.notes + r.flags),
            ]
            for r in check.rows
        ]
        return headers, rows
    headers = [
        "run",
        "task",
        "label",
        "teacher",
        "teacher acc",
        "full-precision teacher acc",
        "student acc",
        "drop vs its teacher",
        "drop vs full-precision teacher",
        "target",
        "result",
        "why",
        "note",
    ]
    rows = []
    for r in check.rows:
        kind = quantized[r.run.run_id]
        rows.append(
            [
                r.run.short_id,
                r.run.task,
                run_label(r.run, swept),
                kind or "unquantized",
                with_interval(r.run, TEACHER_ACCURACY),
                _full_precision_cell(r.run, FULL_PRECISION_TEACHER, TEACHER_ACCURACY, kind),
                with_interval(r.run, "eval/student_accuracy"),
                with_interval(r.run, ACCURACY_DROP),
                _full_precision_cell(r.run, FULL_PRECISION_DROP, ACCURACY_DROP, kind),
                f"≤ {r.target:g}",
                r.verdict.status,
                r.verdict.reason,
                "; ".join(r.notes + r.flags),
            ]
        )
    return headers, rows


def _full_precision_cell(run: RunRecord, metric: str, own: str, quantized: Optional[str]) -> str:
    """A full-precision figure as logged; a run without it whose teacher is not quantized: its own
    teacher's figure (that teacher is the full-precision one); else empty."""
    if metric in run.metrics:
        return with_interval(run, metric)
    return "" if quantized else with_interval(run, own)


def _ratio_rows(check: Check, swept: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    """A ratio check's table: the baselines' count, median and spread, and the ratios' spread."""
    sign = "≥" if check.metric == TRAIN_THROUGHPUT else "≤"
    headers = [
        "run",
        "label",
        "value",
        "baseline runs",
        "baselines",
        "baseline median",
        "baseline min–max",
        "ratio",
        "ratio min–max",
        "target",
        "result",
        "why",
        "note",
    ]
    rows = []
    for r in check.rows:
        values = r.baseline_values
        ratios = [r.value / v for v in values if v > 0]
        rows.append(
            [
                r.run.short_id,
                run_label(r.run, swept),
                fmt(r.value),
                ", ".join(b.short_id for b in r.baselines),
                str(len(values)) if values else "",
                fmt(r.baseline_value),
                f"{fmt(min(values))}–{fmt(max(values))}" if values else "",
                f"{r.ratio:.3f}×" if r.ratio is not None else "",
                f"{min(ratios):.3f}–{max(ratios):.3f}×" if ratios else "",
                f"{sign} {r.target:g}×",
                r.verdict.status,
                r.verdict.reason,
                "; ".join(r.notes),
            ]
        )
    return headers, rows


_HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2em; }
</style>
</head>
<body>
{{ body }}
</body>
</html>
"""


def render_html(markdown_text: str, title: str) -> str:
    """report.md as a standalone page: CommonMark + tables, raw HTML in the text escaped."""
    from jinja2 import Environment
    from markdown_it import MarkdownIt
    from markupsafe import Markup

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    template = Environment(autoescape=True).from_string(_HTML_TEMPLATE)
    return template.render(title=title, body=Markup(body))


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


# ----------------------------------------------------------------------------- MLflow


def read_runs(cfg: DictConfig, own_run_id: Optional[str] = None) -> Tuple[Any, Selection]:
    """The client and the selected runs of `task.experiment` (default: tracking.experiment_name)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from firstsight.tracking.tracker import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
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
    records = [
        RunRecord(
            run_id=r.info.run_id,
            name=r.info.run_name or "",
            status=r.info.status,
            start_time=r.info.start_time or 0,
            params=dict(r.data.params),
            metrics=dict(r.data.metrics),
            tags=dict(r.data.tags),
        )
        for r in runs
    ]
    selection = select_runs(
        records,
        experiment=name,
        store=store,
        sweep=cfg.task.sweep,
        include_failed=cfg.task.include_failed,
        max_runs=cfg.task.max_runs,
        own_run_id=own_run_id,
    )
    return client, selection


def _all_pages(fetch: Callable[[Optional[str]], Any]) -> List[Any]:
    items: List[Any] = []
    token: Optional[str] = None
    while True:
        page = fetch(token)
        items.extend(page)
        token = page.token
        if not token:
            return items


def loss_histories(client: Any, runs: Sequence[RunRecord]) -> Dict[str, List[Tuple[int, float]]]:
    """train/loss per optimizer step of the first MAX_LOSS_CURVES runs that logged it."""
    histories = {}
    for run in [r for r in runs if "train/loss" in r.metrics][:MAX_LOSS_CURVES]:
        history = client.get_metric_history(run.run_id, "train/loss")
        histories[run.run_id] = sorted((m.step, m.value) for m in history)
    return histories


def report(cfg: DictConfig, tracker: Any) -> Dict[str, float]:
    from firstsight.core.job import job_output_dir

    task = cfg.task
    client, selection = read_runs(cfg, own_run_id=getattr(tracker, "run_id", None))
    out_dir = Path(task.output_dir) if task.output_dir else job_output_dir() / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = selection.runs
    table = build_table(runs)
    checks = target_checks(runs, task.accuracy_drop_target, task.throughput_gain_target, task.vram_saving_target)
    histories = loss_histories(client, runs)
    plots = make_plots(runs, out_dir, histories)
    edge = edge_view(runs)
    if edge is not None:
        plots.append(edge_plot(edge, out_dir))
    if sum(1 for r in runs if "train/loss" in r.metrics) > MAX_LOSS_CURVES:
        for plot in plots:
            if plot.file == "loss_curves.png" and not plot.skipped:
                plot.title += f" — the first {MAX_LOSS_CURVES} runs only"
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
    metrics = {
        "report/runs": float(len(runs)),
        "report/checks_passed": float(sum(c.passed for c in checks)),
        "report/checks_failed": float(sum(c.failed for c in checks)),
        "report/checks_unresolved": float(sum(c.count(UNRESOLVED) for c in checks)),
        "report/checks_not_measurable": float(sum(c.count(NOT_MEASURABLE) for c in checks)),
        "report/plots": float(sum(1 for p in plots if not p.skipped)),
    }
    tracker.log_metrics(metrics)
    tracker.flush()
    log.info("report of %d runs (%s) written to %s", len(runs), selection.scope, out_dir)
    return metrics
