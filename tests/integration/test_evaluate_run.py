"""The evaluate task: strict answer parsing, and accuracies measured by generation."""

from __future__ import annotations

import pytest
from conftest import compose

from firstsight.suite.dispatch import run_task


def test_evaluate_measures_teacher_and_student(cache_dir, tmp_path):
    cfg = compose(["task=evaluate", "train.progress_bar=false", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    result = run_task(cfg)
    # the shipped teacher answers by generation at least as well as under teacher forcing (0.461)
    assert result["eval/teacher_accuracy"] >= 0.46
    assert result["eval/teacher_accuracy"] > result["eval/chance_accuracy"] + 0.15
    assert result["eval/accuracy_drop"] == pytest.approx(
        result["eval/teacher_accuracy"] - result["eval/student_accuracy"]
    )
    kinds = [k for k in result if k.startswith("eval/teacher_accuracy/")]
    assert len(kinds) == 5
    assert result["eval/questions"] == 128
    for name in (
        "eval/teacher_accuracy",
        "eval/student_accuracy",
        "eval/accuracy",
        "eval/accuracy_drop",
        "eval/teacher_blind_accuracy",
    ):
        assert result[f"{name}_ci_low"] <= result[name] <= result[f"{name}_ci_high"], name
        assert result[f"{name}_ci_high"] - result[f"{name}_ci_low"] > 0.02, name  # 128 questions: a real width
    # the teacher is unquantized: the study's drop is the run's own
    assert result["eval/full_precision_accuracy_drop"] == result["eval/accuracy_drop"]
    # the shipped teacher uses the frames: with grey frames it falls well below its accuracy
    assert result["eval/teacher_blind_accuracy"] < result["eval/teacher_accuracy_ci_low"]
    assert result["eval/teacher_looks_at_frames"] == 1.0
