"""report.md: the runs, the comparison table and what its columns mean, the runs over seeds, the
target checks with their rules and tables, the edge view, the plots; every value escaped for
Markdown. And report.md as a standalone HTML page (markdown-it and jinja2 imported when rendered)."""

from __future__ import annotations

import re
from typing import Any, Callable, List, Optional, Sequence, Tuple

from jinja2 import Environment
from markdown_it import MarkdownIt
from markupsafe import Markup

from firstsight.evaluation.stats import FAIL, NOT_MEASURABLE, PASS, UNRESOLVED
from firstsight.tasks.report.accuracy import ACCURACY_RULE, teacher_quantization
from firstsight.tasks.report.baselines import BASELINE_RULE
from firstsight.tasks.report.cells import fmt, run_label, with_interval
from firstsight.tasks.report.checks import Check, CheckRow, verdict_counts
from firstsight.tasks.report.edge import EDGE_RULE, EdgeRow, EdgeView
from firstsight.tasks.report.plots import Plot
from firstsight.tasks.report.records import (
    ACCURACY_DROP,
    FULL_PRECISION_DROP,
    FULL_PRECISION_TEACHER,
    METRIC_COLUMNS,
    TEACHER_ACCURACY,
    RunRecord,
    swept_keys,
)
from firstsight.tasks.report.selection import Selection
from firstsight.tasks.report.speed import target_sign
from firstsight.tasks.report.table import Table, display_rows, over_seeds

# A column of a table built from items (check rows, edge rows): its header, and its cell for one item.
Column = Tuple[str, Callable[[Any], Any]]


def render_markdown(
    selection: Selection,
    table: Table,
    checks: List[Check],
    plots: List[Plot],
    generated: str,
    edge: Optional[EdgeView] = None,
) -> str:
    lines = _heading(selection, table, generated)
    lines += _comparison(table)
    lines += _over_seeds(table)
    lines += _memory_scope(table)
    lines += _target_checks(checks, swept_keys(table.runs))
    if edge is not None:
        lines += _edge_section(edge)
    lines += _plots_section(plots)
    return "\n".join(lines)


def _heading(selection: Selection, table: Table, generated: str) -> List[str]:
    lines = [f"# FirstSight report: experiment {md_escape(selection.experiment)}", ""]
    lines += [
        f"- MLflow store: {md_escape(selection.store)}",
        f"- Runs: {md_escape(selection.scope)}; {len(table.rows)} rows",
    ]
    if selection.left_out:
        lines.append("- Left out: " + md_escape("; ".join(f"{n} {why}" for why, n in selection.left_out.items())))
    lines += [f"- Generated: {md_escape(generated)}", ""]
    return lines


def _comparison(table: Table) -> List[str]:
    """The table, the swept values, and what each metric column means."""
    lines = ["## Comparison", ""]
    lines += md_table([c.header for c in table.columns], display_rows(table))
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
    return lines


def _over_seeds(table: Table) -> List[str]:
    seeds = over_seeds(table)
    if not seeds:
        return []
    lines = [
        "",
        "## Over seeds (mean ± std)",
        "",
        "The runs above grouped by every swept value but `seed`: mean ± sample standard deviation "
        "over the group's seeds.",
        "",
    ]
    return lines + md_table(*seeds)


def _memory_scope(table: Table) -> List[str]:
    process_scoped = [r.short_id for r in table.runs if r.tags.get("firstsight.peak_memory_scope") == "process"]
    if not process_scoped:
        return []
    return [
        "",
        "Peak memory of runs " + ", ".join(process_scoped) + " covers their whole process "
        "(earlier jobs of the same process included), not that job alone.",
    ]


def _target_checks(checks: Sequence[Check], swept: Sequence[str]) -> List[str]:
    """The rules, one section per check, and the count of each verdict."""
    lines = ["", "## Target checks", "", ACCURACY_RULE, "", BASELINE_RULE, ""]
    for check in checks:
        lines += _check_section(check, swept)
    counts = verdict_counts(checks)
    lines += [
        f"In all: {counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[UNRESOLVED]} unresolved, "
        f"{counts[NOT_MEASURABLE]} not measurable (one per run and check); "
        f"{sum(1 for c in checks if not c.rows)} of {len(checks)} checks not measurable at all.",
        "",
    ]
    return lines


def _check_section(check: Check, swept: Sequence[str]) -> List[str]:
    """A check's table, its flags one per line, and why it was not measurable at all."""
    lines = [f"### {check.title}: {md_escape(check.target_text)}", ""]
    if check.rows:
        columns = _accuracy_columns(check, swept) if check.metric == ACCURACY_DROP else _ratio_columns(check, swept)
        lines += md_table(*_columns_table(columns, check.rows)) + [""]
    flagged = [f"- Run {r.run.short_id}: {md_escape(flag)}" for r in check.rows for flag in r.flags]
    if flagged:
        lines += flagged + [""]
    for why in check.not_measurable:
        lines += [f"- Not measurable: {md_escape(why)}"]
    if check.not_measurable:
        lines.append("")
    return lines


def _accuracy_columns(check: Check, swept: Sequence[str]) -> List[Column]:
    """The accuracy check's columns. Where some run's teacher is quantized: that teacher, the
    full-precision teacher and the drops against each (the verdict is on the full-precision one)."""
    quantized = {r.run.run_id: teacher_quantization(r.run) for r in check.rows}
    both = any(quantized.values())

    def full_precision(metric: str, own: str) -> Callable[[CheckRow], str]:
        return lambda r: _full_precision_cell(r.run, metric, own, quantized[r.run.run_id])

    columns: List[Column] = [
        ("run", lambda r: r.run.short_id),
        ("task", lambda r: r.run.task),
        ("label", lambda r: run_label(r.run, swept)),
    ]
    if both:
        columns.append(("teacher", lambda r: quantized[r.run.run_id] or "unquantized"))
    columns.append(("teacher acc", lambda r: with_interval(r.run, TEACHER_ACCURACY)))
    if both:
        columns.append(("full-precision teacher acc", full_precision(FULL_PRECISION_TEACHER, TEACHER_ACCURACY)))
    columns.append(("student acc", lambda r: with_interval(r.run, "eval/student_accuracy")))
    columns.append(("drop vs its teacher" if both else "drop", lambda r: with_interval(r.run, ACCURACY_DROP)))
    if both:
        columns.append(("drop vs full-precision teacher", full_precision(FULL_PRECISION_DROP, ACCURACY_DROP)))
    return columns + _verdict_columns(lambda r: f"≤ {r.target:g}")


def _full_precision_cell(run: RunRecord, metric: str, own: str, quantized: Optional[str]) -> str:
    """A full-precision figure as logged; a run without it whose teacher is not quantized: its own
    teacher's figure (that teacher is the full-precision one); else empty."""
    if metric in run.metrics:
        return with_interval(run, metric)
    return "" if quantized else with_interval(run, own)


def _ratio_columns(check: Check, swept: Sequence[str]) -> List[Column]:
    """A ratio check's columns: the baselines' count, median and spread, and the ratios' spread."""
    sign = target_sign(check.metric)

    def baseline_spread(r: CheckRow) -> str:
        values = r.baseline_values
        return f"{fmt(min(values))}–{fmt(max(values))}" if values else ""

    def ratio_spread(r: CheckRow) -> str:
        ratios = [r.value / v for v in r.baseline_values if v > 0]
        return f"{min(ratios):.3f}–{max(ratios):.3f}×" if ratios else ""

    columns: List[Column] = [
        ("run", lambda r: r.run.short_id),
        ("label", lambda r: run_label(r.run, swept)),
        ("value", lambda r: fmt(r.value)),
        ("baseline runs", lambda r: ", ".join(b.short_id for b in r.baselines)),
        ("baselines", lambda r: str(len(r.baseline_values)) if r.baseline_values else ""),
        ("baseline median", lambda r: fmt(r.baseline_value)),
        ("baseline min–max", baseline_spread),
        ("ratio", lambda r: f"{r.ratio:.3f}×" if r.ratio is not None else ""),
        ("ratio min–max", ratio_spread),
    ]
    return columns + _verdict_columns(lambda r: f"{sign} {r.target:g}×")


def _verdict_columns(target: Callable[[CheckRow], str]) -> List[Column]:
    """The columns every check's table ends with (flags are set on accuracy rows only)."""
    return [
        ("target", target),
        ("result", lambda r: r.verdict.status),
        ("why", lambda r: r.verdict.reason),
        ("note", lambda r: "; ".join(r.notes + r.flags)),
    ]


EDGE_COLUMNS: Tuple[Column, ...] = (
    ("budget GB", lambda r: fmt(r.budget)),
    ("configuration", lambda r: r.config),
    ("fits", lambda r: "yes" if r.fits else "no"),
    ("peak GB", lambda r: fmt(r.peak)),
    ("basis", lambda r: r.basis),
    ("headroom GB", lambda r: fmt(r.headroom)),
    ("latency p50 s", lambda r: fmt(r.latency)),
    ("accuracy", lambda r: fmt(r.accuracy)),
    ("accuracy from", lambda r: r.accuracy_from),
    ("Pareto front", lambda r: "front" if r.on_front else ""),
    ("note", lambda r: r.note),
    ("run", lambda r: r.run.short_id),
)


def _edge_section(view: EdgeView) -> List[str]:
    """The rule, one line per budget (what fits, the Pareto front), and the table of every configuration."""
    lines = ["## Edge deployment: fits the budget?", "", EDGE_RULE, ""]
    for budget, used in view.objectives.items():
        lines.append("- " + md_escape(_budget_line([r for r in view.rows if r.budget == budget], budget, used)))
    lines += [""] + md_table(*_columns_table(EDGE_COLUMNS, view.rows)) + [""]
    return lines


def _budget_line(group: Sequence[EdgeRow], budget: Optional[float], used: Sequence[str]) -> str:
    fitting = [r for r in group if r.fits]
    name = f"{budget:g} GB" if budget is not None else "no budget"
    line = f"{name}: {len(fitting)} of {len(group)} fit"
    if fitting:
        line += " (" + ", ".join(r.config for r in fitting) + ")"
        front = [r.config for r in fitting if r.on_front]
        if used:
            line += f"; Pareto front on {', '.join(used)}: {', '.join(front)}"
        else:
            line += "; no Pareto front: no objective is measured for every fitting configuration"
    return line


def _plots_section(plots: Sequence[Plot]) -> List[str]:
    lines = ["## Plots", ""]
    for plot in plots:
        lines += [f"### {md_escape(plot.title)}", ""]
        if plot.skipped:
            lines += [f"Not drawn: {md_escape(plot.skipped)}.", ""]
        else:
            lines += [f"![{md_escape(plot.title)}]({plot.file})", ""]
    return lines


def _columns_table(columns: Sequence[Column], items: Sequence[Any]) -> Tuple[List[str], List[List[Any]]]:
    """(headers, rows): one row per item, one cell per column."""
    return [header for header, _ in columns], [[cell(item) for _, cell in columns] for item in items]


# Inline Markdown syntax (a table cell is parsed inline only): escaped with a backslash. An
# underscore inside a word (forward_kl) is no emphasis and stays as it is, for readable Markdown.
_MD_SPECIAL = re.compile(r"[\\`*\[\]<>|&~]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
    lines = ["| " + " | ".join(md_escape(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(md_escape(v) for v in row) + " |" for row in rows]
    return lines


def md_escape(value: Any) -> str:
    """Text safe in a Markdown table cell or line: inline syntax backslash-escaped, newlines flattened."""
    text = fmt(value).replace("\r", " ").replace("\n", " ")
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), text)


def md_unescape(text: str) -> str:
    """The inverse of md_escape (for reading a report's table back)."""
    return re.sub(r"\\(.)", r"\1", text)


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
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    template = Environment(autoescape=True).from_string(_HTML_TEMPLATE)
    return template.render(title=title, body=Markup(body))
