"""Turn one raw record into a canonical preference pair, in the layout it comes in.

Layouts (``format``), detected from the first record's keys after the column mapping:

* ``tldr``: the TL;DR comparisons layout (``info``, ``summaries``, ``choice``).
* ``hh``: HH-RLHF transcripts; the prompt is everything up to the last ``\n\nAssistant:``.
* ``generic``: explicit ``prompt``/``chosen``/``rejected`` (TRL's standard preference format),
  as strings, or as message lists (TRL's conversational format: ``prompt`` a list of
  ``{role, content}`` turns, ``chosen``/``rejected`` lists of assistant messages).
* ``implicit``: ``chosen``/``rejected`` are whole conversations (strings or message lists)
  sharing their prompt, TRL's implicit-prompt format; the shared beginning is the prompt.
* ``pairwise``: two answers and a label (``response_a``, ``response_b``, ``label``), see
  :mod:`prefprune.data.pairwise`.

Message lists are rendered to text by the :class:`~prefprune.data.fields.ReadContext`'s
rendering (:mod:`prefprune.data.messages`). Each converter either returns a :class:`Pair` or
raises :class:`RowIssue` with a stable reason, so the loader can keep or report every row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from prefprune.data.fields import (
    Pair,
    ReadContext,
    check_distinct,
    check_responses,
    make_pair,
    object_of,
    row_hash,
    split_of,
    text_of,
    user_id,
    value_of,
)
from prefprune.data.messages import (
    PLAIN,
    common_prefix,
    explicit_texts,
    implicit_texts,
    is_messages,
)
from prefprune.data.pairwise import PAIRWISE_COLUMNS, convert_pairwise
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
MAPPABLE = ("id", "prompt", "chosen", "rejected", *PAIRWISE_COLUMNS)
#: The turn marker that ends an HH-RLHF prompt.
HH_MARKER = "\n\nAssistant:"
_TLDR_KEYS = frozenset({"info", "summaries", "choice", "worker", "batch", "split", "extra"})

Converter = Callable[[dict, ReadContext, "str | None"], Pair]


def detect_format(record: dict, mapping: Mapping[str, str]) -> str:
    """Guess the layout from one record's keys (after the user's column mapping)."""
    keys = set(record)
    present = {name for name in MAPPABLE if mapping.get(name, name) in keys}
    if {"info", "summaries", "choice"} <= keys:
        return "tldr"
    if set(PAIRWISE_COLUMNS) <= present:
        return "pairwise"
    if {"prompt", "chosen", "rejected"} <= present:
        return "generic"
    if {"chosen", "rejected"} <= present:
        chosen = record[mapping.get("chosen", "chosen")]
        return "hh" if isinstance(chosen, str) and HH_MARKER in chosen else "implicit"
    raise DataError(
        f"cannot detect the format from the keys {sorted(keys)}: expected TL;DR "
        "(info, summaries, choice), prompt/chosen/rejected (text or message lists), "
        "chosen/rejected whole conversations (HH-RLHF or implicit prompt), or "
        "response_a/response_b/label; pass format= or map your columns"
    )


def tldr_prompt(info: dict) -> str:
    """The TL;DR prompt: the Reddit template, or ``ARTICLE: ...`` for CNN/DM rows.

    CNN/DM rows have no subreddit/title/post, so the Reddit template would be
    mostly empty; the article followed by the same ``TL;DR:`` cue is our choice.
    """
    if info.get("post") is not None:
        post = text_of(info, "post", "info.post")
        title = text_of(info, "title", "info.title")
        subreddit = text_of(info, "subreddit", "info.subreddit")
        return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"
    if info.get("article") is None:
        detail = "neither 'info.post' nor 'info.article' is set"
        raise RowIssue("missing_field", "info.post", detail)
    return f"ARTICLE: {text_of(info, 'article', 'info.article')}\n\nTL;DR:"


def _summaries(record: dict) -> list[dict]:
    """Exactly two summary objects."""
    summaries = value_of(record, "summaries", "summaries")
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
    choice = value_of(record, "choice", "choice")
    if isinstance(choice, bool) or not isinstance(choice, int):
        raise RowIssue("wrong_type", "choice", f"'choice' is {type(choice).__name__}, not int")
    if choice not in (0, 1):
        raise RowIssue("bad_choice", "choice", f"'choice' is {choice}, expected 0 or 1")
    return choice


def convert_tldr(record: dict, context: ReadContext, split: str | None) -> Pair:
    """A TL;DR comparison: chosen is ``summaries[choice]``, rejected the other one."""
    info = object_of(record, "info", "info")
    summaries = _summaries(record)
    choice = _choice(record)
    prompt = tldr_prompt(info)
    texts = [text_of(s, "text", f"summaries[{i}].text") for i, s in enumerate(summaries)]
    check_distinct(texts[0], texts[1], "summaries")
    post_id = text_of(info, "id", "info.id")
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
    row_id = user_id(record, context) or f"{post_id}/{row_hash(record)[:12]}"
    return Pair(row_id, prompt, texts[choice], texts[1 - choice], split_of(record, split), meta)


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


def convert_hh(record: dict, context: ReadContext, split: str | None) -> Pair:
    """An HH-RLHF pair of full transcripts that must share the prompt.

    With the plain rendering the transcripts are read as they are; a backbone with a chat
    template reads them as the conversations they are (``Human`` turns as ``user`` messages,
    ``Assistant`` turns as ``assistant``), rendered with its template like any message list.
    """
    keys = (context.key("chosen"), context.key("rejected"))
    transcripts = (text_of(record, keys[0], keys[0]), text_of(record, keys[1], keys[1]))
    prompt, chosen = split_transcript(transcripts[0], keys[0])
    other, rejected = split_transcript(transcripts[1], keys[1])
    if prompt != other:
        at = common_prefix(prompt, other)
        raise RowIssue("hh_prompt_mismatch", keys[1],
                       f"chosen and rejected transcripts differ before the last turn "
                       f"(first difference at character {at})")
    if context.rendering is not PLAIN:
        turns = [hh_messages(text, key) for text, key in zip(transcripts, keys)]
        prompt, chosen, rejected = explicit_texts(
            [turns[0][:-1], turns[0][-1:], turns[1][-1:]], ("prompt", *keys), context.rendering)
    check_responses(chosen, rejected, keys)
    return make_pair(record, context, split, (prompt, chosen, rejected), set(keys))


#: The speaker markers of an HH-RLHF transcript and the chat roles they become.
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_messages(transcript: str, label: str) -> list[dict[str, str]]:
    """An HH transcript as messages; it must start with a turn and end with the assistant."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3 or parts[-2] != "Assistant":
        raise RowIssue("hh_prompt_mismatch", label, f"'{label}' is not a sequence of "
                                                    "Human/Assistant turns ending with the "
                                                    "assistant")
    return [{"role": _HH_ROLES[speaker], "content": content}
            for speaker, content in zip(parts[1::2], parts[2::2])]


def convert_generic(record: dict, context: ReadContext, split: str | None) -> Pair:
    """Explicit prompt/chosen/rejected: three strings, or three message lists."""
    keys = tuple(context.key(n) for n in ("prompt", "chosen", "rejected"))
    values = [value_of(record, key, key) for key in keys]
    if any(is_messages(v) for v in values):
        prompt, chosen, rejected = explicit_texts(values, keys, context.rendering)
        check_responses(chosen, rejected, keys[1:])
    else:
        prompt, chosen, rejected = (text_of(record, key, key) for key in keys)
        check_distinct(chosen, rejected, keys[2])
    return make_pair(record, context, split, (prompt, chosen, rejected), set(keys))


def convert_implicit(record: dict, context: ReadContext, split: str | None) -> Pair:
    """Chosen and rejected as whole conversations with an implicit (shared) prompt."""
    keys = (context.key("chosen"), context.key("rejected"))
    prompt, chosen, rejected = implicit_texts(value_of(record, keys[0], keys[0]),
                                              value_of(record, keys[1], keys[1]), keys,
                                              context.rendering)
    check_responses(chosen, rejected, keys)
    return make_pair(record, context, split, (prompt, chosen, rejected), set(keys))


CONVERTERS: dict[str, Converter] = {
    "tldr": convert_tldr,
    "hh": convert_hh,
    "generic": convert_generic,
    "implicit": convert_implicit,
    "pairwise": convert_pairwise,
}
