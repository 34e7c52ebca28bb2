"""Reading a generated answer: when a reply counts as right.

Short answers count when the generated text, stripped, equals the reference (case-insensitive).

Multiple-choice answers count when an option letter is read from the reply and equals the
reference; anything else is wrong, never a guess. The rule (`parse_choice`): after stripping
surrounding whitespace, the reply is one of

* the letter alone: ``B``;
* the letter in parentheses: ``(B)``;
* the letter followed by ``)``, ``.`` or ``:``, then optionally the text of that same option as
  the question lists it: ``B.``, ``B)``, ``B: a red box``, ``B) A red box.``. The text is compared
  case-insensitively, ignoring surrounding whitespace and one trailing full stop; any other text
  after the delimiter (``B. a blue ball`` when B is "a red box", ``A. or B``) is not a letter.

and the letter is one of the question's options. Everything else reads as no letter, so it is
wrong: a lowercase letter (``b``, ``b.``), a letter then a space and words (``A red ball``: there
"A" is an article), several letters (``A or B``, ``A/B``, ``AB``), prose (``The answer is C``,
``I think it is C``), ``(B) a red box`` (parentheses only around the letter alone), an empty reply,
a letter the question does not offer. A question's options are its lines ``A. text`` (after the
stem: each follows a newline), read by `option_letters` and `option_texts`.
"""

from __future__ import annotations

import re
import string
from typing import Any, Dict, Mapping, Optional

# the whole reply: the letter alone, "(L)", or the letter, a delimiter and (optionally) more text
_CHOICE = re.compile(r"\(([A-Z])\)|([A-Z])(?:([.):])(.*))?", re.DOTALL)
_OPTION = re.compile(r"\n([A-Z])\. ([^\n]*)")


def _normalised(option_text: str) -> str:
    """An option's text as compared: case-folded, without surrounding whitespace or one trailing
    full stop."""
    text = option_text.strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text.casefold()


def parse_choice(
    text: str, letters: str = string.ascii_uppercase, options: Optional[Mapping[str, str]] = None
) -> Optional[str]:
    """The option letter a generated reply gives, or None when it gives none (see the module
    docstring for the rule).

    The reply, stripped of surrounding whitespace, must be exactly ``L``, ``(L)``, ``L.``, ``L)``,
    ``L:``, or ``L.``/``L)``/``L:`` followed by the text of option L, where L is an uppercase
    letter in `letters`. Lowercase letters never count.

    `options` maps each of the question's letters to its option's text (`option_texts`). With it,
    the letter must also be one of its keys, and text after the delimiter must equal that option's
    text (case-insensitive, ignoring surrounding whitespace and one trailing full stop). Without it
    (None), the options' texts are unknown and any text after the delimiter is accepted:
    ``D) away from you`` reads as D. `is_correct` always passes the question's options.
    """
    match = _CHOICE.fullmatch(text.strip())
    if match is None:
        return None
    letter = match.group(1) or match.group(2)
    if letter not in letters or (options is not None and letter not in options):
        return None
    rest = match.group(4)
    if rest and rest.strip() and options is not None and _normalised(rest) != _normalised(options[letter]):
        return None
    return letter


def option_texts(question: str) -> Dict[str, str]:
    """The options a question lists, letter -> text, from its lines "\nA. text", "\nB. text", ...
    (the first line with a given letter, should one repeat)."""
    texts: Dict[str, str] = {}
    for letter, option in _OPTION.findall(question):
        texts.setdefault(letter, option)
    return texts


def option_letters(question: str) -> str:
    """The letters of the options a question lists ("\nA. ...", "\nB. ..."), in alphabetical order."""
    return "".join(sorted(option_texts(question)))


def is_multiple_choice(sample: Any) -> bool:
    return len(sample.answer) == 1 and sample.answer in option_letters(sample.question)


def is_correct(sample: Any, generated: str) -> bool:
    if is_multiple_choice(sample):
        options = option_texts(sample.question)
        return parse_choice(generated, "".join(options), options) == sample.answer
    return generated.strip().lower() == sample.answer.lower()
