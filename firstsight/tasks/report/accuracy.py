"""The accuracy check: a run's accuracy drop against the full-precision teacher, judged by its 95 %
interval against the target (ACCURACY_RULE), with notes (a student above its teacher) and flags (a
model not looking at the frames)."""

from __future__ import annotations

from typing import List, Optional, Sequence

from firstsight.evaluation.stats import NOT_MEASURABLE, UNRESOLVED, Estimate, Verdict, at_most
from firstsight.models.parts import PARTS
from firstsight.tasks.report.cells import with_interval
from firstsight.tasks.report.checks import Check, CheckRow
from firstsight.tasks.report.records import (
    ACCURACY_DROP,
    CHANCE,
    FULL_PRECISION_DROP,
    FULL_PRECISION_TEACHER,
    QUESTIONS,
    TEACHER_ACCURACY,
    TEACHER_PRECISION_TAG,
    RunRecord,
    estimate,
    is_none,
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


def accuracy_check(runs: Sequence[RunRecord], target: float) -> Check:
    """Every distill or evaluate run that logged a drop, judged against `target`."""
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


def accuracy_verdict(run: RunRecord, target: float) -> CheckRow:
    """The run's accuracy drop against `target` (see ACCURACY_RULE), with its notes and flags."""
    m = run.metrics
    quantized = teacher_quantization(run)
    judged = FULL_PRECISION_DROP if FULL_PRECISION_DROP in m else ACCURACY_DROP
    row = CheckRow(run, m.get(judged), target, _verdict(run, target, judged, quantized))
    row.notes = _notes(run, quantized)
    row.flags = _blind_flags(run)
    return row


def teacher_quantization(run: RunRecord) -> Optional[str]:
    """How the run's teacher was quantized (e.g. "nf4"; "int8, nf4" if its parts differ), None when
    it was not: from the `firstsight.teacher_precision.<part>.quantization` tags where the run has
    them, else from its params (`precision.teacher_quantization`, else `precision.quantization`,
    and `precision.parts.<part>.quantization` where set)."""
    tagged = [v for k, v in run.tags.items() if k.startswith(TEACHER_PRECISION_TAG) and k.endswith(".quantization")]
    if tagged:
        kinds = {v for v in tagged if not is_none(v)}
    else:
        p = run.params
        own = p.get("precision.teacher_quantization", "None")  # None: the teacher follows precision.quantization
        model_wide = p.get("precision.quantization", "none") if own in ("None", "null", "") else own
        kinds = set()
        for part in PARTS:
            setting = p.get(f"precision.parts.{part}.quantization", "None")
            kind = model_wide if setting == "None" else setting  # None: follows the model-wide setting
            if not is_none(kind):
                kinds.add(kind)
    return ", ".join(sorted(kinds)) or None


def _verdict(run: RunRecord, target: float, judged: str, quantized: Optional[str]) -> Verdict:
    """The verdict on the `judged` drop: not measurable with a teacher at chance, unresolved without
    the full-precision drop of a quantized teacher's run, an interval or a question count."""
    m = run.metrics
    teacher_metric = FULL_PRECISION_TEACHER if FULL_PRECISION_TEACHER in m else TEACHER_ACCURACY
    teacher = estimate(run, teacher_metric)
    teacher_value = m.get(teacher_metric)
    chance = m.get(CHANCE)
    drop = estimate(run, judged)
    if chance is not None and teacher_value is not None and not (teacher.low if teacher else teacher_value) > chance:
        shown = str(teacher) if teacher is not None else f"{teacher_value:.3f}"
        return Verdict(
            NOT_MEASURABLE,
            f"the teacher ({shown}) is not above chance ({chance:.3f}): "
            "its accuracy says nothing (random or untrained weights?)",
        )
    if judged == ACCURACY_DROP and quantized:
        return Verdict(
            UNRESOLVED,
            f"the teacher is quantized ({quantized}) and the run logged no drop "
            f"against the full-precision teacher ({FULL_PRECISION_DROP}): "
            "rerun with this version",
        )
    if drop is None:
        return Verdict(UNRESOLVED, "no interval: rerun with this version")
    if drop.n == 0:
        return Verdict(UNRESOLVED, f"no question count ({QUESTIONS}): rerun with this version")
    return at_most(_rule_of_three(drop), target, teacher=teacher, chance=chance)


def _rule_of_three(drop: Estimate) -> Estimate:
    """A drop whose interval has no width (every question's teacher − student difference the same,
    e.g. no question answered differently, where a bootstrap has nothing to resample) widened to
    ± 3/n: the 95 % bound on the share of questions the two answer differently when none did in n."""
    if drop.n <= 0 or drop.high > drop.low:
        return drop
    bound = 3.0 / drop.n
    return Estimate(drop.value, drop.value - bound, drop.value + bound, drop.n)


def _notes(run: RunRecord, quantized: Optional[str]) -> List[str]:
    """A student above its own teacher, and above the full-precision one where its teacher is quantized."""
    m = run.metrics
    notes = []
    own = m.get(ACCURACY_DROP)
    if own is not None and own < 0:
        notes.append(
            f"student above its {'quantized ' if quantized else ''}teacher (drop {with_interval(run, ACCURACY_DROP)})"
        )
    if quantized and m.get(FULL_PRECISION_DROP, 0.0) < 0:
        notes.append(f"student above the full-precision teacher (drop {with_interval(run, FULL_PRECISION_DROP)})")
    return notes


def _blind_flags(run: RunRecord) -> List[str]:
    """A model whose accuracy with the frames blanked lies inside its real accuracy's interval,
    while that interval is above chance."""
    chance = run.metrics.get(CHANCE)
    flags = []
    for role in ("teacher", "student"):
        real, blind = estimate(run, f"eval/{role}_accuracy"), run.metrics.get(f"eval/{role}_blind_accuracy")
        above_chance = chance is None or (real is not None and real.low > chance)  # at chance it uses nothing
        if real is not None and blind is not None and above_chance and real.low <= blind <= real.high:
            flags.append(
                f"{role} not looking at the frames: blind {blind:.3f} within its interval "
                f"[{real.low:.3f}, {real.high:.3f}]"
            )
    return flags
