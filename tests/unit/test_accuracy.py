"""Accuracy as a sample estimate: intervals, paired drops, verdicts and the "is it looking?" check."""

import pytest

from firstsight.config.specs import full_precision
from firstsight.evaluation import stats
from firstsight.evaluation.accuracy import Outcomes, looks_at_frames, outcome_record, summarize


def test_wilson_intervals_match_the_published_values():
    # Wilson score interval, 95 %: 5 of 10 -> [0.2366, 0.7634]; 0 of 10 -> [0, 0.2775]
    half = stats.proportion([True] * 5 + [False] * 5)
    assert (half.value, round(half.low, 4), round(half.high, 4), half.n) == (0.5, 0.2366, 0.7634, 10)
    none = stats.proportion([False] * 10)
    assert (none.low, round(none.high, 4)) == (0.0, 0.2775)
    assert stats.proportion([]).n == 0


def test_mcnemar_is_the_exact_binomial_test_on_discordant_questions():
    # 10 questions only the first got right, 2 only the second: p = 2 * (1 + 12 + 66) / 2**12
    first = [True] * 10 + [False] * 2 + [True] * 5
    second = [False] * 10 + [True] * 2 + [True] * 5
    assert stats.mcnemar_p(first, second) == pytest.approx(158 / 4096)
    assert stats.mcnemar_p(first, first) == 1.0


def test_the_paired_interval_is_reproducible_and_narrower_than_the_unpaired_one():
    import random

    rng = random.Random(1)
    teacher = [rng.random() < 0.7 for _ in range(400)]
    student = [t if rng.random() < 0.95 else not t for t in teacher]  # the same questions, mostly agreeing
    drop = stats.paired_difference(teacher, student)
    assert drop == stats.paired_difference(teacher, student)  # fixed bootstrap seed
    assert drop.value == pytest.approx((sum(teacher) - sum(student)) / 400)
    assert drop.low < drop.value < drop.high
    # two independent intervals would be far wider than the paired one: even one Wilson interval is
    wilson = stats.proportion(teacher)
    assert drop.high - drop.low < 0.6 * (wilson.high - wilson.low)
    with pytest.raises(ValueError, match="same questions"):
        stats.paired_difference(teacher, student[:-1])


@pytest.mark.parametrize(
    "value, low, high, verdict",
    [
        (0.002, -0.004, 0.008, stats.PASS),
        (0.005, 0.0, 0.01, stats.PASS),  # upper bound on the target: PASS
        (0.03, 0.02, 0.04, stats.FAIL),
        (0.02, 0.01, 0.03, stats.UNRESOLVED),  # lower bound on the target: not beyond it
        (0.005, -0.05, 0.06, stats.UNRESOLVED),
        (-0.03, -0.05, -0.01, stats.PASS),  # a student above its teacher is within the target
    ],
)
def test_a_verdict_reads_the_interval(value, low, high, verdict):
    assert stats.at_most(stats.Estimate(value, low, high, 128), 0.01).status == verdict


def test_models_that_agree_on_every_question_are_not_certain_to_be_equal():
    same = [True] * 60 + [False] * 40
    drop = stats.paired_difference(same, same)
    assert (drop.value, drop.low, drop.high) == (0.0, -0.03, 0.03)  # ±3/n: the rule of three
    assert stats.at_most(drop, 0.01).status == stats.UNRESOLVED  # 100 questions cannot show ≤ 1 point


def test_an_unresolved_verdict_says_how_many_questions_would_decide():
    estimate = stats.Estimate(0.04, 0.0, 0.08, 128)  # half-width 0.04, 3 points from the target
    verdict = stats.at_most(estimate, 0.01)
    needed = stats.questions_needed(estimate, 0.01)
    assert needed == 228  # 128 * (0.04 / 0.03)**2, rounded up
    assert verdict.status == stats.UNRESOLVED and f"need ~{needed}" in verdict.reason
    assert stats.questions_needed(stats.Estimate(0.01, 0.0, 0.02, 128), 0.01) is None


def test_a_teacher_at_chance_makes_the_drop_not_measurable():
    zero = stats.Estimate(0.0, 0.0, 0.0, 128)
    verdict = stats.at_most(zero, 0.01, teacher=stats.proportion([False] * 128), chance=0.27)
    assert verdict.status == stats.NOT_MEASURABLE and "chance" in verdict.reason


def _outcomes(n_right: int, n: int = 200, offset: int = 0) -> list:
    return [(i + offset) % n < n_right for i in range(n)]


def test_summarize_names_every_figure_and_pairs_the_drop():
    teacher, student, before = _outcomes(150), _outcomes(120), _outcomes(70)
    metrics, lines, verdict = summarize(Outcomes(teacher=teacher, student=student, chance=0.25, student_before=before))
    assert metrics["eval/questions"] == 200
    assert metrics["eval/teacher_accuracy"] == 0.75 and metrics["eval/student_accuracy"] == 0.6
    assert metrics["eval/accuracy_drop"] == pytest.approx(0.15)
    assert metrics["eval/accuracy_drop_ci_low"] < 0.15 < metrics["eval/accuracy_drop_ci_high"]
    assert metrics["eval/full_precision_accuracy_drop"] == metrics["eval/accuracy_drop"]  # unquantized teacher
    assert metrics["eval/student_accuracy_before"] == 0.35 and metrics["eval/distill_gain"] == pytest.approx(0.25)
    assert metrics["eval/distill_gain_ci_low"] > 0 and metrics["eval/distill_gain_p_value"] < 1e-6
    assert verdict.status == stats.FAIL
    assert any("before" in line and "after distillation" in line for line in lines)


def test_a_quantized_teacher_is_judged_against_the_full_precision_one():
    # the run's int8 teacher is at 0.30, the student 0.295: within a point of *that* teacher, but
    # far below the teacher at full precision (0.46), on 5000 questions
    n = 5000
    quantized, student, full = _outcomes(1500, n), _outcomes(1475, n), _outcomes(2300, n)
    metrics, lines, verdict = summarize(
        Outcomes(teacher=quantized, student=student, chance=0.27, full_precision_teacher=full)
    )
    assert metrics["eval/accuracy_drop"] == pytest.approx(0.005)
    assert metrics["eval/full_precision_accuracy_drop"] == pytest.approx(0.165)
    assert metrics["eval/full_precision_teacher_accuracy"] == pytest.approx(0.46)
    assert verdict.status == stats.FAIL
    assert any("quantized" in line for line in lines)


def test_random_weights_give_not_measurable_not_pass():
    zeros = [False] * 128
    _, _, verdict = summarize(Outcomes(teacher=zeros, student=zeros, chance=0.27))
    assert verdict.status == stats.NOT_MEASURABLE


def test_a_model_that_answers_as_well_blind_is_flagged():
    real = _outcomes(150)
    assert not looks_at_frames(real, _outcomes(148, offset=3))
    assert looks_at_frames(real, _outcomes(60))
    metrics, lines, _ = summarize(
        Outcomes(
            teacher=real,
            student=_outcomes(140),
            chance=0.25,
            teacher_blind=_outcomes(60),
            student_blind=_outcomes(139, offset=7),
        )
    )
    assert metrics["eval/teacher_looks_at_frames"] == 1.0 and metrics["eval/student_looks_at_frames"] == 0.0
    assert any(line.startswith("WARNING: the student is not looking") for line in lines)
    # a model at chance is not flagged: its accuracy says nothing about what it uses
    metrics, _, _ = summarize(Outcomes(teacher=real, student=_outcomes(50), chance=0.25, student_blind=_outcomes(50)))
    assert "eval/student_looks_at_frames" not in metrics and "eval/student_blind_accuracy" in metrics


def test_outcome_rows_pair_every_model_on_each_question():
    rows = outcome_record(["count", "held"], Outcomes(teacher=[True, False], student=[False, False], chance=0.25))
    assert rows == [
        {"index": 0, "kind": "count", "teacher": True, "student": False},
        {"index": 1, "kind": "held", "teacher": False, "student": False},
    ]


def test_the_full_precision_teacher_is_the_run_teacher_unquantized():
    from conftest import compose

    from firstsight.models.parts import resolve_parts

    cfg = compose(["precision=int8", "precision.parts.vision.quantization=nf4"])
    reference = resolve_parts(full_precision(cfg.precision), "teacher")
    assert {p.quantization for p in resolve_parts(cfg.precision, "teacher").values()} == {"int8", "nf4"}
    assert {(p.dtype, p.quantization) for p in reference.values()} == {("float16", "none")}
    assert str(cfg.precision.quantization.value) == "int8"  # the run's own config is untouched
