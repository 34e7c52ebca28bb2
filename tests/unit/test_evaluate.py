"""The evaluate task: strict answer parsing, and accuracies measured by generation."""

from __future__ import annotations

import pytest
from conftest import compose

from firstsight.data.synthetic import QASample
from firstsight.evaluation.answers import option_texts
from firstsight.tasks.evaluate import is_correct, is_multiple_choice, option_letters, parse_choice


@pytest.mark.parametrize(
    "text, letter",
    [
        ("B", "B"),
        (" B.", "B"),
        ("(C)", "C"),
        ("D) away from you", "D"),
        ("A: left", "A"),
        ("A right", None),
        ("Both", None),
        ("", None),
        ("maybe C", None),
        ("E", "E"),
        ("b", None),
        ("AB", None),
        ("(B) left", None),
    ],
)
def test_choice_letters_are_parsed_strictly(text, letter):
    # without the question's options, any text after "L." / "L)" / "L:" is accepted
    assert parse_choice(text) == letter


HOLDING = "What are you holding?\nA. a red ball\nB. a red box\nC. a blue ball\nD. a green cone"
TEN = "Which object is it?\n" + "\n".join(
    f"{letter}. {text}"
    for letter, text in zip(
        "ABCDEFGHIJ",
        [
            "a red ball",
            "a red box",
            "a blue ball",
            "a blue box",
            "a green cone",
            "a green ball",
            "a yellow box",
            "a yellow cone",
            "a white ball",
            "a black box",
        ],
    )
)
QUESTIONS = {"A-D": HOLDING, "A-J": TEN}


@pytest.mark.parametrize(
    "options, answer, reply, reading, correct",
    [
        # the letter alone, in parentheses, or with a delimiter and optionally its own option's text
        ("A-D", "B", "B", "B", True),
        ("A-D", "B", "  B \n", "B", True),
        ("A-D", "B", "(B)", "B", True),
        ("A-D", "B", "B.", "B", True),
        ("A-D", "B", "B)", "B", True),
        ("A-D", "B", "B:", "B", True),
        ("A-D", "B", "B. a red box", "B", True),
        ("A-D", "B", "B) A Red Box.", "B", True),  # case and one trailing full stop ignored
        ("A-D", "B", "B:  a red box ", "B", True),
        ("A-D", "C", "B. a red box", "B", False),  # a clear letter, the wrong one
        # text after the delimiter that is not that option's text
        ("A-D", "B", "B. a blue ball", None, False),  # another option's text
        ("A-D", "B", "B. a red box, I think", None, False),
        ("A-D", "A", "A. or B", None, False),
        # a letter then a space and words: an article, or a hedge
        ("A-D", "A", "A red ball", None, False),
        ("A-D", "B", "(B) a red box", None, False),
        ("A-D", "B", "B\nC", None, False),
        # ambiguous: several letters
        ("A-D", "A", "A or B", None, False),
        ("A-D", "A", "A/B", None, False),
        ("A-D", "A", "A and C", None, False),
        ("A-D", "A", "AB", None, False),
        # prose, the option's text alone, lowercase, empty
        ("A-D", "C", "The answer is C", None, False),
        ("A-D", "B", "a red box", None, False),
        ("A-D", "B", "b", None, False),
        ("A-D", "B", "b.", None, False),
        ("A-D", "B", "", None, False),
        ("A-D", "B", "   ", None, False),
        # a letter the question does not offer
        ("A-D", "B", "E", None, False),
        ("A-D", "B", "E. a red box", None, False),
        # ten options: "I" is an option letter, and a pronoun
        ("A-J", "I", "I", "I", True),
        ("A-J", "I", "I. a white ball", "I", True),
        ("A-J", "J", "(J)", "J", True),
        ("A-J", "A", "A: a red ball.", "A", True),
        ("A-J", "A", "A. a red box", None, False),
        ("A-J", "I", "I think it is C", None, False),
        ("A-J", "C", "I think it is C", None, False),
        ("A-J", "I", "I am not sure", None, False),
        ("A-J", "C", "C is the one", None, False),
        ("A-J", "J", "K", None, False),
    ],
)
def test_a_reply_counts_as_a_letter_only_under_the_strict_rule(options, answer, reply, reading, correct):
    question = QUESTIONS[options]
    assert parse_choice(reply, option_letters(question), option_texts(question)) == reading
    assert is_correct(_sample(question, answer), reply) is correct


def test_option_texts_are_read_from_the_question_lines():
    assert option_texts(HOLDING) == {"A": "a red ball", "B": "a red box", "C": "a blue ball", "D": "a green cone"}
    assert option_letters(TEN) == "ABCDEFGHIJ" and option_texts(TEN)["I"] == "a white ball"
    assert option_texts("What colour is the object on your left?") == {}
    # without the options any text after the delimiter is accepted; with them, only the option's own
    assert parse_choice("A. or B", "ABCD") == "A" and parse_choice("A. or B", "ABCD", option_texts(HOLDING)) is None
    # the options restrict the letters too
    assert parse_choice("E", "ABCDE", option_texts(HOLDING)) is None


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


def test_a_one_character_short_answer_is_matched_as_text_not_read_as_a_letter():
    # a question without options whose answer is one character (a count) is a short answer
    count = _sample("How many cups are on the table?", "3")
    assert not is_multiple_choice(count)
    assert is_correct(count, " 3") and not is_correct(count, "4")


def test_the_trailing_full_stop_is_ignored_with_the_whitespace_before_it():
    # "B. a red box ." is option B's text: one trailing full stop, then surrounding whitespace, ignored
    assert parse_choice("B. a red box .", "ABCD", option_texts(HOLDING)) == "B"
    assert is_correct(_sample(HOLDING, "B"), "B) a red box .")


def test_an_unknown_split_is_refused(cache_dir):
    from firstsight.core.errors import ConfigError
    from firstsight.suite.validate import validate

    with pytest.raises(ConfigError, match="task.split='test'.*validation"):
        validate(compose(["task=evaluate", "task.split=test"]))
