"""The evaluate task: strict answer parsing, and accuracies measured by generation."""

from __future__ import annotations

import pytest

from conftest import compose
from firstsight.data.synthetic import QASample
from firstsight.evaluate import is_correct, is_multiple_choice, option_letters, parse_choice
from firstsight.tasks import run_task


@pytest.mark.parametrize(
    "text, letter",
    [("B", "B"), (" B.", "B"), ("(C)", "C"), ("D) away from you", "D"), ("A: left", "A"), ("A right", "A"),
     ("Both", None), ("", None), ("maybe C", None), ("E", "E"), ("b", None), ("AB", None)],
)
def test_choice_letters_are_parsed_strictly(text, letter):
    assert parse_choice(text) == letter


def test_only_the_letters_a_question_offers_count():
    question = "Which way did it move?\nA. left\nB. right\nC. up\nD. down"
    assert option_letters(question) == "ABCD"
    assert parse_choice("E", option_letters(question)) is None  # no option E: unparseable, not a guess
    assert is_correct(_sample(question, "D"), "D.") and not is_correct(_sample(question, "D"), "E")
    five = question + "\nE. stayed"
    assert is_multiple_choice(_sample(five, "E")) and is_correct(_sample(five, "E"), "(E)")


def _sample(question: str, answer: str) -> QASample:
    return QASample(images=(), question=question, answer=answer, kind="test", num_choices=4, index=0)


def test_short_answers_need_an_exact_match_and_choices_a_parsed_letter():
    short = _sample("What colour is the object on your left?", "red")
    assert is_correct(short, " red") and is_correct(short, "Red")
    assert not is_correct(short, "red ball") and not is_correct(short, "")
    choice = _sample("What are you holding?\nA. nothing\nB. a red box\nC. a blue ball\nD. a green cone", "B")
    assert is_correct(choice, "B") and is_correct(choice, "B. a red box")
    assert not is_correct(choice, "a red box") and not is_correct(choice, "C")  # no letter, or the wrong one


def test_evaluate_measures_teacher_and_student(cache_dir, tmp_path):
    cfg = compose(["task=evaluate", "train.progress_bar=false", f"tracking.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    result = run_task(cfg)
    # the shipped teacher answers by generation at least as well as under teacher forcing (0.461)
    assert result["eval/teacher_accuracy"] >= 0.46
    assert result["eval/teacher_accuracy"] > result["eval/chance_accuracy"] + 0.15
    assert result["eval/accuracy_drop"] == pytest.approx(result["eval/teacher_accuracy"] - result["eval/student_accuracy"])
    kinds = [k for k in result if k.startswith("eval/teacher_accuracy/")]
    assert len(kinds) == 5


def test_an_unknown_split_is_refused(cache_dir):
    from firstsight.errors import ConfigError
    from firstsight.validate import validate

    with pytest.raises(ConfigError, match="task.split='test'.*validation"):
        validate(compose(["task=evaluate", "task.split=test"]))
