"""Turn one raw record into a canonical preference pair (TL;DR, HH-RLHF or generic).

Each converter either returns a :class:`Pair` or raises :class:`RowIssue` with a
stable reason, so the loader can keep or report every row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefprune.data.report import RowIssue
from prefprune.errors import DataError

#: Columns that every loaded dataset has, in this order.
CANONICAL_COLUMNS = (
    "id",
    "prompt",
    "chosen",
    "rejected",
    "source_format",
    "source_file",
    "source_row",
    "source_split",
)
#: Canonical names a user may map onto their own column names.
MAPPABLE = ("id", "prompt", "chosen", "rejected")
#: The turn marker that ends an HH-RLHF prompt.
HH_MARKER = "\n\nAssistant:"
_TLDR_KEYS = frozenset({"info", "summaries", "choice", "worker", "batch", "split", "extra"})


@dataclass
class Pair:
    """A converted row: the canonical text fields plus verbatim source metadata."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    split: str | None
    meta: dict[str, Any] = field(default_factory=dict)


Converter = Callable[[dict, Mapping[str, str], "str | None"], Pair]


def row_hash(record: Any) -> str:
    """sha256 hex of the record's canonical JSON: a stable id for rows without one."""
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def detect_format(record: dict, mapping: Mapping[str, str]) -> str:
    """Guess the format from one record's keys (after the user's column mapping)."""
    keys = set(record)
    present = {name for name in MAPPABLE if mapping.get(name, name) in keys}
    if {"info", "summaries", "choice"} <= keys:
        return "tldr"
    if {"prompt", "chosen", "rejected"} <= present:
        return "generic"
    if {"chosen", "rejected"} <= present:
        return "hh"
    raise DataError(
        f"cannot detect the format from the keys {sorted(keys)}: expected TL;DR "
        "(info, summaries, choice), HH-RLHF (chosen, rejected) or generic "
        "(prompt, chosen, rejected); pass format= or columns="
    )


def _value(record: dict, key: str, label: str) -> Any:
    """The value at ``key``; absent or null is a missing field."""
    value = record.get(key)
    if value is None:
        raise RowIssue("missing_field", label, f"'{label}' is missing or null")
    return value


def _text(record: dict, key: str, label: str) -> str:
    """A non-blank string field."""
    value = _value(record, key, label)
    if not isinstance(value, str):
        raise RowIssue("wrong_type", label, f"'{label}' is {type(value).__name__}, not str")
    if not value.strip():
        raise RowIssue("empty_field", label, f"'{label}' is empty")
    return value


def _object(record: dict, key: str, label: str) -> dict:
    """A JSON-object field."""
    value = _value(record, key, label)
    if not isinstance(value, dict):
        raise RowIssue("wrong_type", label, f"'{label}' is {type(value).__name__}, not an object")
    return value


def _check_distinct(chosen: str, rejected: str, label: str) -> None:
    """Two responses that differ only in surrounding whitespace express no preference."""
    if chosen.strip() == rejected.strip():
        raise RowIssue("identical_responses", label, "the two responses are identical")


def _user_id(record: dict, mapping: Mapping[str, str]) -> str | None:
    """The user's own id (mapped column, or a column named ``id``), as a string."""
    key = mapping.get("id", "id")
    if key not in record:
        return None
    value = _value(record, key, key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RowIssue("wrong_type", key, f"id '{key}' is {type(value).__name__}, not str/int")
    if not str(value).strip():
        raise RowIssue("empty_field", key, f"id '{key}' is empty")
    return str(value)


def _split_of(record: dict, container_split: str | None) -> str | None:
    """A record's own ``split`` field wins over the split it was stored under."""
    value = record.get("split")
    return value if isinstance(value, str) else container_split


def tldr_prompt(info: dict) -> str:
    """The TL;DR prompt: the Reddit template, or ``ARTICLE: ...`` for CNN/DM rows.

    CNN/DM rows have no subreddit/title/post, so the Reddit template would be
    mostly empty; the article followed by the same ``TL;DR:`` cue is our choice.
    """
    if info.get("post") is not None:
        post = _text(info, "post", "info.post")
        title = _text(info, "title", "info.title")
        subreddit = _text(info, "subreddit", "info.subreddit")
        return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
    if info.get("article") is None:
        detail = "neither 'info.post' nor 'info.article' is set"
        raise RowIssue("missing_field", "info.post", detail)
    return f"ARTICLE: {_text(info, 'article', 'info.article')}\n\nTL;DR:"


def _summaries(record: dict) -> list[dict]:
    """Exactly two summary objects."""
    summaries = _value(record, "summaries", "summaries")
    if not isinstance(summaries, list):
        raise RowIssue("wrong_type", "summaries", "'summaries' is not a list")
    if len(summaries) != 2:
        raise RowIssue("bad_choice", "summaries", f"{len(summaries)} summaries, expected 2")
    for i, summary in enumerate(summaries):
        if not isinstance(summary, dict):
            raise RowIssue("wrong_type", f"summaries[{i}]", f"summaries[{i}] is not an object")
    return summaries


def _choice(record: dict) -> int:
    """The index of the preferred summary: 0 or 1."""
    choice = _value(record, "choice", "choice")
    if isinstance(choice, bool) or not isinstance(choice, int):
        raise RowIssue("wrong_type", "choice", f"'choice' is {type(choice).__name__}, not int")
    if choice not in (0, 1):
        raise RowIssue("bad_choice", "choice", f"'choice' is {choice}, expected 0 or 1")
    return choice


def convert_tldr(record: dict, mapping: Mapping[str, str], split: str | None) -> Pair:
    """A TL;DR comparison: chosen is ``summaries[choice]``, rejected the other one."""
    info = _object(record, "info", "info")
    summaries = _summaries(record)
    choice = _choice(record)
    prompt = tldr_prompt(info)
    texts = [_text(s, "text", f"summaries[{i}].text") for i, s in enumerate(summaries)]
    _check_distinct(texts[0], texts[1], "summaries")
    post_id = _text(info, "id", "info.id")
    extra = record.get("extra")
    if extra is not None and not isinstance(extra, dict):
        raise RowIssue("wrong_type", "extra", "'extra' is not an object or null")
    extra = dict(extra or {})
    good, bad = summaries[choice], summaries[1 - choice]
    meta = {
        "worker": record.get("worker"),
        "batch": record.get("batch"),
        "policy_chosen": good.get("policy"),
        "policy_rejected": bad.get("policy"),
        "note_chosen": good.get("note"),
        "note_rejected": bad.get("note"),
        "confidence": extra.pop("confidence", None),
        "subreddit": info.get("subreddit"),
        "site": info.get("site"),
        "post_id": post_id,
        **extra,
        **{k: v for k, v in record.items() if k not in _TLDR_KEYS},
    }
    row_id = _user_id(record, mapping) or f"{post_id}/{row_hash(record)[:12]}"
    return Pair(row_id, prompt, texts[choice], texts[1 - choice], _split_of(record, split), meta)


def split_transcript(transcript: str, label: str) -> tuple[str, str]:
    """Cut after the last ``\\n\\nAssistant:``; the prompt keeps the marker.

    The response is kept verbatim (usually with its leading space) so that
    ``prompt + response`` is exactly the original transcript.
    """
    cut = transcript.rfind(HH_MARKER)
    if cut < 0:
        raise RowIssue("hh_prompt_mismatch", label, f"no '\\n\\nAssistant:' turn in '{label}'")
    end = cut + len(HH_MARKER)
    return transcript[:end], transcript[end:]


def _other_columns(record: dict, used: set[str]) -> dict[str, Any]:
    """Unmapped user columns, kept verbatim as metadata."""
    return {k: v for k, v in record.items() if k not in used}


def convert_hh(record: dict, mapping: Mapping[str, str], split: str | None) -> Pair:
    """An HH-RLHF pair of full transcripts that must share the prompt."""
    keys = {name: mapping.get(name, name) for name in ("chosen", "rejected")}
    prompt, chosen = split_transcript(_text(record, keys["chosen"], keys["chosen"]),
                                      keys["chosen"])
    other, rejected = split_transcript(_text(record, keys["rejected"], keys["rejected"]),
                                       keys["rejected"])
    if prompt != other:
        at = next(i for i, (a, b) in enumerate(zip(prompt + "\0", other + "\0")) if a != b)
        raise RowIssue("hh_prompt_mismatch", keys["rejected"],
                       f"chosen and rejected transcripts differ before the last turn "
                       f"(first difference at character {at})")
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if not response.strip():
            raise RowIssue("empty_field", keys[name], f"the '{keys[name]}' response is empty")
    _check_distinct(chosen, rejected, keys["rejected"])
    row_id = _user_id(record, mapping) or row_hash(record)[:16]
    used = {*keys.values(), mapping.get("id", "id"), "split"}
    return Pair(row_id, prompt, chosen, rejected, _split_of(record, split),
                _other_columns(record, used))


def convert_generic(record: dict, mapping: Mapping[str, str], split: str | None) -> Pair:
    """A row with prompt/chosen/rejected columns (possibly under the user's names)."""
    keys = {name: mapping.get(name, name) for name in MAPPABLE}
    prompt, chosen, rejected = (_text(record, keys[n], keys[n])
                                for n in ("prompt", "chosen", "rejected"))
    _check_distinct(chosen, rejected, keys["rejected"])
    row_id = _user_id(record, mapping) or row_hash(record)[:16]
    return Pair(row_id, prompt, chosen, rejected, _split_of(record, split),
                _other_columns(record, {*keys.values(), "split"}))


CONVERTERS: dict[str, Converter] = {
    "tldr": convert_tldr,
    "hh": convert_hh,
    "generic": convert_generic,
}
