"""Two answers and a label: expert pairwise judgements (question, answer_a, answer_b,
overall_preference), arena battles (conversation_a, conversation_b, winner), graded
preferences (a signed strength whose sign is the label).

Canonical columns ``response_a``, ``response_b`` and ``label`` (map yours with ``--column``),
plus an optional ``prompt``; without one, the two answers are whole conversations whose shared
beginning is the prompt. The label is read as TL;DR's ``choice`` is: ``0``, ``a``, ``A`` or
``model_a`` means A is preferred, ``1``, ``b``, ``B`` or ``model_b`` means B. ``label_values``
(``--label-values A_VALUE,B_VALUE``) sets another convention, e.g. ``-1,1``; the pair
``negative,positive`` reads a signed strength by its sign. A tie or an unknown value skips the
row, reported with the value.
"""

from __future__ import annotations

import re
from typing import Any

from prefprune.data.fields import (
    Pair,
    ReadContext,
    check_responses,
    make_pair,
    text_of,
    value_of,
)
from prefprune.data.messages import explicit_texts, implicit_texts, is_messages
from prefprune.data.report import RowIssue

PAIRWISE_COLUMNS = ("response_a", "response_b", "label")
#: ``label_values`` that read a signed strength by its sign: negative = A, positive = B.
SIGNED = ("negative", "positive")
#: The default names of A and B, position by position (``a`` is to ``b`` as ``0`` to ``1``).
_DEFAULT = (("0", "a", "model_a"), ("1", "b", "model_b"))
_TIES = {"tie", "tie (bothbad)", "both_bad", "bothbad", "both bad", "equal", "0.5"}
#: A whole number, maybe written with zero decimals as pandas writes a float column to CSV.
_WHOLE = re.compile(r"([+-]?\d+)(\.0*)?")


def label_text(value: Any) -> str:
    """A label as the text it is compared by: stripped, and a whole number as the integer it
    is, whether JSON gives it as ``1.0`` or a CSV cell as ``"1.0"``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    whole = _WHOLE.fullmatch(text)
    return str(int(whole.group(1))) if whole else text


def preferred(value: Any, label_values: tuple[str, str] | None, key: str) -> int:
    """0 when the label prefers A, 1 when it prefers B; a tie or an unknown value is a
    :class:`RowIssue` naming the value."""
    if isinstance(value, bool):
        raise _unknown(value, label_values, key)
    if label_values == SIGNED:
        return _by_sign(value, key)
    text = label_text(value)
    if label_values is not None:
        names = [label_text(v) for v in label_values]
        if text in names:
            return names.index(text)
    else:
        for which, names in enumerate(_DEFAULT):
            if text.lower() in names:
                return which
    if text.lower() in _TIES:
        raise RowIssue("tie_label", key, f"label {value!r} is a tie: no preference to learn")
    raise _unknown(value, label_values, key)


def _by_sign(value: Any, key: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RowIssue("unknown_label", key, f"label {value!r} is not a signed number "
                                             "(--label-values negative,positive)") from None
    if number == 0:
        raise RowIssue("tie_label", key, f"label {value!r} is a tie: no preference to learn")
    return 0 if number < 0 else 1


def _unknown(value: Any, label_values: tuple[str, str] | None, key: str) -> RowIssue:
    known = ", ".join(label_values) if label_values else "0/a/A/model_a or 1/b/B/model_b"
    return RowIssue("unknown_label", key, f"label {value!r} is not one of {known}; pass "
                                          "--label-values A_VALUE,B_VALUE for another "
                                          "convention")


def convert_pairwise(record: dict, context: ReadContext, split: str | None) -> Pair:
    """Chosen is the preferred answer, rejected the other; the label stays as metadata."""
    key_a, key_b, key_label = (context.key(n) for n in PAIRWISE_COLUMNS)
    which = preferred(value_of(record, key_label, key_label), context.label_values, key_label)
    first, second = value_of(record, key_a, key_a), value_of(record, key_b, key_b)
    key_prompt = context.key("prompt")
    if record.get(key_prompt) is None:
        prompt, text_a, text_b = implicit_texts(first, second, (key_a, key_b), context.rendering)
        used = {key_a, key_b}
    elif any(is_messages(v) for v in (record[key_prompt], first, second)):
        prompt, text_a, text_b = explicit_texts((record[key_prompt], first, second),
                                                (key_prompt, key_a, key_b), context.rendering)
        used = {key_prompt, key_a, key_b}
    else:
        prompt, text_a, text_b = (text_of(record, k, k) for k in (key_prompt, key_a, key_b))
        used = {key_prompt, key_a, key_b}
    chosen, rejected = (text_a, text_b) if which == 0 else (text_b, text_a)
    check_responses(chosen, rejected, (key_a, key_b))
    return make_pair(record, context, split, (prompt, chosen, rejected), used)


def flip_label(value: Any, label_values: tuple[str, str] | None) -> Any:
    """The label value meaning the other answer, in the value's own type and format."""
    which = preferred(value, label_values, "label")
    if label_values == SIGNED:
        return _negated(value)
    if label_values is not None:
        return _spelled_like(value, label_text(label_values[1 - which]))
    text = label_text(value)
    other = _DEFAULT[1 - which][_DEFAULT[which].index(text.lower())]
    return _spelled_like(value, other.upper() if text.isupper() else other)


def _negated(value: Any) -> Any:
    """The opposite strength, spelled like ``value``: 3 -> -3, 2.5 -> -2.5, "3" -> "-3",
    "-0.5" -> "0.5"."""
    if isinstance(value, int | float):
        return -value
    text = str(value).strip()
    return text[1:] if text.startswith("-") else "-" + text.removeprefix("+")


def _spelled_like(value: Any, other: str) -> Any:
    """The label ``other`` in the type and format of ``value``: an int stays an int, a float
    a float, and a whole number written with decimals keeps them ("1.0" -> "0.0")."""
    if _WHOLE.fullmatch(other) is None:
        return other
    if isinstance(value, int | float):
        return type(value)(int(other))
    decimals = _WHOLE.fullmatch(str(value).strip())
    return other + (decimals.group(2) or "") if decimals else other
