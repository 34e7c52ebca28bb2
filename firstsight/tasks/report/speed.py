"""The speed and memory checks: a compressed run's training throughput and peak VRAM over the median
of its like-for-like baselines' (see baselines.BASELINE_RULE), against the target ratio."""

from __future__ import annotations

import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from firstsight.evaluation.stats import FAIL, NOT_MEASURABLE, PASS, Verdict
from firstsight.tasks.report.baselines import find_baselines, is_baseline, unlike
from firstsight.tasks.report.checks import Check, CheckRow
from firstsight.tasks.report.records import PEAK_RSS, PEAK_VRAM, TRAIN_THROUGHPUT, RunRecord
from firstsight.tracking.tracker import CODE_VERSION_TAG


def throughput_check(runs: Sequence[RunRecord], swept: Sequence[str], target: float) -> Check:
    return ratio_check(
        runs,
        swept,
        "Training throughput gain",
        TRAIN_THROUGHPUT,
        ("distill",),
        f"≥ {target:g}× the baseline's {TRAIN_THROUGHPUT}",
        target,
        lambda ratio: ratio >= target,
    )


def memory_check(runs: Sequence[RunRecord], swept: Sequence[str], target: float) -> Check:
    text = f"≤ {target:g}× the baseline's {PEAK_VRAM}"
    if any(PEAK_VRAM in r.metrics for r in runs):
        return ratio_check(
            runs, swept, "VRAM saving", PEAK_VRAM, ("distill", "profile"), text, target, lambda ratio: ratio <= target
        )
    check = Check("VRAM saving", PEAK_VRAM, text)
    check.not_measurable.append(
        f"no run here has {PEAK_VRAM}: they ran on the CPU, where peak resident memory ({PEAK_RSS}) is "
        "measured instead; RSS is not VRAM, so the VRAM target is not judged (RSS is in the table)"
    )
    return check


def target_sign(metric: str) -> str:
    """How a ratio of `metric` meets its target: throughput at least, memory at most."""
    return "≥" if metric == TRAIN_THROUGHPUT else "≤"


def ratio_check(
    runs: Sequence[RunRecord],
    swept: Sequence[str],
    title: str,
    metric: str,
    tasks: Tuple[str, ...],
    target_text: str,
    target: float,
    ok: Callable[[float], bool],
) -> Check:
    """Every compressed run of `tasks` with `metric`, over its baselines, judged by `ok`; the whole
    check not measurable without such runs, or without a baseline among them."""
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
    check.rows = [_ratio_row(run, relevant, swept, metric, target, ok) for run in compressed]
    return check


def _ratio_row(
    run: RunRecord,
    relevant: Sequence[RunRecord],
    swept: Sequence[str],
    metric: str,
    target: float,
    ok: Callable[[float], bool],
) -> CheckRow:
    """One compressed run over the median of its like-for-like baselines among `relevant`."""
    value = run.metrics[metric]
    row = CheckRow(run, value, target, Verdict(NOT_MEASURABLE, ""))
    candidates = find_baselines(run, relevant, swept)
    if not candidates:
        row.verdict = Verdict(NOT_MEASURABLE, "no full-precision run with the same other swept values")
        return row
    reasons = {b.run_id: unlike(run, b) for b in candidates}
    row.baselines = sorted((b for b in candidates if reasons[b.run_id] is None), key=lambda b: (b.start_time, b.run_id))
    if not row.baselines:
        row.verdict = Verdict(NOT_MEASURABLE, "no like-for-like baseline: " + "; ".join(reasons.values()))
        return row
    broken = [b for b in row.baselines if not b.metrics[metric] > 0]
    if broken:
        row.verdict = Verdict(
            NOT_MEASURABLE, "; ".join(f"baseline {b.short_id} has {metric}={b.metrics[metric]}" for b in broken)
        )
        return row
    values = row.baseline_values = [b.metrics[metric] for b in row.baselines]
    row.baseline_value = statistics.median(values)
    row.ratio = value / row.baseline_value
    row.verdict = Verdict(
        PASS if ok(row.ratio) else FAIL,
        f"{row.ratio:.3f}× the median of {len(values)} baseline value{'s' * (len(values) > 1)}"
        f"{'' if ok(row.ratio) else ', not'} {target_sign(metric)} {target:g}×",
    )
    row.notes = _ratio_notes(run, [value / v for v in values], reasons, ok)
    return row


def _ratio_notes(
    run: RunRecord, ratios: Sequence[float], reasons: Dict[str, Optional[str]], ok: Callable[[float], bool]
) -> List[str]:
    """One baseline only, ratios to single baselines on both sides of the target, baselines left out
    as not like for like, a run without a code version."""
    notes = []
    if len(ratios) == 1:
        notes.append("1 baseline run: repeat it for a spread")
    elif ok(min(ratios)) != ok(max(ratios)):
        notes.append(f"the ratios to single baselines ({min(ratios):.3f}–{max(ratios):.3f}×) straddle the target")
    left_out = [why for why in reasons.values() if why is not None]
    if left_out:
        notes.append("not like for like, left out: " + "; ".join(left_out))
    if CODE_VERSION_TAG not in run.tags:
        notes.append(
            "code version not recorded (a run from before firstsight.code_version): "
            "like for like on device and packages only"
        )
    return notes
