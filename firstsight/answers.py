"""Reading a generated answer: when a reply counts as right.

Short answers count when the generated text, stripped, equals the reference (case-insensitive).
Multiple-choice answers count when an option letter is read from the reply (see `parse_choice`)
and equals the reference; anything else is wrong, never a guess.
"""

from __future__ import annotations

import re
import string
from typing import Any, Optional

_CHOICE = re.compile(r"^\(?([A-Z])(?:[.):]|\s|$)")


def parse_choice(text: str, letters: str = string.ascii_uppercase) -> Optional[str]:
    """The option letter a generated answer starts with, or None when there is none or it is not
    one of the question's `letters`."""
    match = _CHOICE.match(text.strip())
    return match.group(1) if match and match.group(1) in letters else None


def option_letters(question: str) -> str:
    """The letters of the options a question lists ("\nA. ...", "\nB. ...")."""
    return "".join(letter for letter in string.ascii_uppercase if f"\n{letter}. " in question)


def is_multiple_choice(sample: Any) -> bool:
    return len(sample.answer) == 1 and sample.answer in option_letters(sample.question)


def is_correct(sample: Any, generated: str) -> bool:
    if is_multiple_choice(sample):
        return parse_choice(generated, option_letters(sample.question)) == sample.answer
    return generated.strip().lower() == sample.answer.lower()
