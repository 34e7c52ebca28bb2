"""The accuracy side of a run: per-question outcomes turned into estimates with 95 % intervals,
paired drops, the "is it looking?" check, and the lines the log prints.

Both the distill task (teacher-forced exact match at the end of training) and the evaluate task
(greedy generation) hand their per-question outcomes to `summarize`; the metric names are
DESIGN.md's (`<name>`, `<name>_ci_low`, `<name>_ci_high`):

| metric | what |
| --- | --- |
| `eval/questions`, `eval/chance_accuracy` | questions answered; accuracy of a uniform guess |
| `eval/teacher_accuracy`, `eval/student_accuracy` | each with its Wilson interval |
| `eval/accuracy_drop` (+ `_p_value`) | teacher − student on the same questions, paired bootstrap interval, McNemar p |
| `eval/full_precision_teacher_accuracy`, `eval/full_precision_accuracy_drop` | the study's drop: against the teacher unquantized (the run's own teacher when it is not quantized) |
| `eval/<role>_blind_accuracy`, `eval/<role>_looks_at_frames` | accuracy with grey frames; for a model above chance, 0 when the blind accuracy lies within the real accuracy's interval |
| `eval/student_accuracy_before`, `eval/distill_gain` (+ `_p_value`) | the student before training; after − before, paired |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from firstsight.evaluation import stats

STUDY_DROP_TARGET = 0.01  # the study's target: the student within 1 point of the full-precision teacher


@dataclass
class Outcomes:
    """Per-question outcomes (True = right) of one run's models on the same questions, in order."""

    teacher: Optional[List[bool]]
    student: List[bool]
    chance: float
    full_precision_teacher: Optional[List[bool]] = None  # None: the run's teacher is itself full precision
    teacher_blind: Optional[List[bool]] = None
    student_blind: Optional[List[bool]] = None
    student_before: Optional[List[bool]] = None


def looks_at_frames(real: Sequence[bool], blind: Sequence[bool]) -> bool:
    """False when the blind accuracy lies within the real accuracy's interval: the frames did not help."""
    estimate = stats.proportion(real)
    return not (estimate.low <= sum(blind) / max(len(blind), 1) <= estimate.high)


def _paired(name: str, first: Sequence[bool], second: Sequence[bool]) -> Tuple[stats.Estimate, Dict[str, float]]:
    estimate = stats.paired_difference(first, second)
    return estimate, {**estimate.metrics(name), f"{name}_p_value": stats.mcnemar_p(first, second)}


def summarize(outcomes: Outcomes) -> Tuple[Dict[str, float], List[str], Optional[stats.Verdict]]:
    """The metrics, the log lines and the verdict on the study's drop (None without a teacher)."""
    o = outcomes
    metrics: Dict[str, float] = {"eval/questions": float(len(o.student)), "eval/chance_accuracy": o.chance}
    student = stats.proportion(o.student)
    metrics.update(student.metrics("eval/student_accuracy"))
    lines = []
    if o.student_before is not None:
        before = stats.proportion(o.student_before)
        gain, gain_metrics = _paired("eval/distill_gain", o.student, o.student_before)
        metrics.update({**before.metrics("eval/student_accuracy_before"), **gain_metrics})
        lines.append(
            f"student accuracy {before} before → {student} after distillation: "
            f"{_points(gain)} (p = {gain_metrics['eval/distill_gain_p_value']:.2g}), "
            f"chance {o.chance:.3f}, {len(o.student)} questions"
        )
    else:
        lines.append(f"student accuracy {student} (chance {o.chance:.3f}, {len(o.student)} questions)")
    verdict = None
    if o.teacher is not None:
        teacher = stats.proportion(o.teacher)
        drop, drop_metrics = _paired("eval/accuracy_drop", o.teacher, o.student)
        metrics.update({**teacher.metrics("eval/teacher_accuracy"), **drop_metrics})
        reference, reference_drop = teacher, drop
        if o.full_precision_teacher is not None:
            reference = stats.proportion(o.full_precision_teacher)
            reference_drop, fp_metrics = _paired(
                "eval/full_precision_accuracy_drop", o.full_precision_teacher, o.student
            )
            metrics.update(fp_metrics)
            lines.append(f"teacher accuracy {teacher} as run (quantized), {reference} at full precision")
            lines.append(f"drop vs the run's teacher {_points(drop)}")
        else:
            metrics.update(
                {**{k.replace("accuracy_drop", "full_precision_accuracy_drop"): v for k, v in drop_metrics.items()}}
            )
            lines.append(f"teacher accuracy {teacher}")
        metrics.update(reference.metrics("eval/full_precision_teacher_accuracy"))
        verdict = stats.at_most(reference_drop, STUDY_DROP_TARGET, reference, o.chance)
        lines.append(
            f"accuracy drop vs the full-precision teacher, against the study's ≤ "
            f"{100 * STUDY_DROP_TARGET:g} point: {verdict}"
        )
    for role, real, blind in (("teacher", o.teacher, o.teacher_blind), ("student", o.student, o.student_blind)):
        if real is None or blind is None:
            continue
        blind_estimate = stats.proportion(blind)
        metrics.update(blind_estimate.metrics(f"eval/{role}_blind_accuracy"))
        if not stats.proportion(real).low > o.chance:  # a model at chance is not using anything: nothing to flag
            continue
        looks = looks_at_frames(real, blind)
        metrics[f"eval/{role}_looks_at_frames"] = float(looks)
        if not looks:
            lines.append(
                f"WARNING: the {role} is not looking at the frames: blind (grey frames) accuracy "
                f"{blind_estimate} lies within its accuracy's interval {stats.proportion(real)}"
            )
    return metrics, lines, verdict


def _points(estimate: stats.Estimate) -> str:
    return f"{100 * estimate.value:+.1f} [{100 * estimate.low:+.1f}, {100 * estimate.high:+.1f}] points"


def outcome_record(kinds: Sequence[str], outcomes: Outcomes) -> List[Dict[str, object]]:
    """One row per question (index, kind, each model's outcome): eval_outcomes.json, for analyses
    that pair runs on the same questions."""
    columns = {name: values for name, values in vars(outcomes).items() if isinstance(values, list)}
    return [
        {"index": i, "kind": kind, **{name: bool(values[i]) for name, values in columns.items()}}
        for i, kind in enumerate(kinds)
    ]


def teacher_is_quantized(parts: Dict[str, object]) -> bool:
    """Whether any part of a loaded model (LoadedModel.parts) holds quantized weights."""
    return any(getattr(p, "quantized", False) for p in parts.values())
