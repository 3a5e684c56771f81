"""Conversations as message lists: checking them, finding the prompt two of them share, and
rendering them to the text a reward model reads.

Most preference sets on the hub (and TRL's own documentation) store conversations as lists of
``{"role": ..., "content": ...}`` messages. A reward model reads text, so a message list is
rendered: with the backbone tokenizer's chat template when it has one (the layout the model
was pre-trained on), otherwise with one plain rendering documented here::

    System: <content>

    User: <content>

    Assistant: <content>

(a role is capitalised; messages are separated by a blank line). The prompt is rendered with
the cue for the next turn (``\\n\\nAssistant:`` in the plain rendering, the template's
generation prompt otherwise) and the response is what the full conversation adds to it, so
prompt + response is exactly the rendered conversation. The rendering's name is recorded with
the data and the model, so that scoring and retraining read the same text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

from prefprune.data.report import RowIssue

Message = dict[str, str]


def as_messages(value: Any, label: str) -> list[Message]:
    """``value`` as a checked list of ``{"role": str, "content": str}`` messages."""
    if isinstance(value, str):
        raise RowIssue("wrong_type", label, f"'{label}' is a string where the row's other "
                                            "fields are message lists")
    if not isinstance(value, list) or not value:
        kind = "an empty list" if isinstance(value, list) else type(value).__name__
        raise RowIssue("wrong_type", label, f"'{label}' is {kind}, not a list of messages")
    messages = []
    for k, message in enumerate(value):
        where = f"{label}[{k}]"
        if not isinstance(message, dict):
            raise RowIssue("malformed_message", where,
                           f"{where} is {type(message).__name__}, not a message object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            raise RowIssue("malformed_message", where,
                           f"{where} has no role string (got {type(role).__name__})")
        if not isinstance(content, str):
            what = "no content" if content is None else f"content of type {type(content).__name__}"
            raise RowIssue("malformed_message", where, f"{where} has {what}")
        messages.append({"role": role, "content": content})
    return messages


def is_messages(value: Any) -> bool:
    """Whether a field holds a message list (rather than text)."""
    return isinstance(value, list)


def shared_items(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items two sequences share (messages of two conversations, token ids
    of two encodings)."""
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def common_prefix(a: str, b: str, block: int = 4096) -> int:
    """Length of the common prefix of two texts. Blocks are compared at C speed, so that two
    long transcripts (megabytes) cost milliseconds, not a Python loop per character."""
    start, end = 0, min(len(a), len(b))
    while start < end and a[start:start + block] == b[start:start + block]:
        start += block
    start = min(start, end)
    return next((i for i in range(start, min(start + block, end)) if a[i] != b[i]), end)


def shared_text(a: str, b: str) -> int:
    """Length of the prompt two texts share: their common prefix, cut back to the last
    whitespace so that no word is split between prompt and response."""
    count = common_prefix(a, b)
    if count == min(len(a), len(b)):  # one text is a prefix of the other: no response left
        return 0
    while count > 0 and not a[count - 1].isspace() and not a[count].isspace():
        count -= 1
    while count > 0 and a[count - 1].isspace():  # the response keeps its leading whitespace
        count -= 1
    return count


class Rendering(Protocol):
    """How message lists become text; ``name`` identifies it in records and model metadata."""

    name: str

    def render(self, messages: Sequence[Message], *, cue: bool) -> str: ...


class PlainRendering:
    """``Role: content`` blocks separated by blank lines; the cue is ``\\n\\nAssistant:``."""

    name = "plain"

    def render(self, messages: Sequence[Message], *, cue: bool) -> str:
        text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
        return text + "\n\nAssistant:" if cue else text


class ChatTemplateRendering:
    """The tokenizer's own chat template (its generation prompt is the cue)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        template = tokenizer.chat_template
        digest = hashlib.sha256(str(template).encode()).hexdigest()[:12]
        self.name = f"chat_template:{digest}"

    def render(self, messages: Sequence[Message], *, cue: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=cue)
        except Exception as exc:  # jinja raises its own types for roles a template rejects
            raise RowIssue("malformed_message", None,
                           f"the chat template cannot render these messages: {exc}") from exc


PLAIN = PlainRendering()


def rendering_for(tokenizer: Any | None) -> Rendering:
    """The backbone tokenizer's chat template when it has one, else the plain rendering."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return ChatTemplateRendering(tokenizer)
    return PLAIN


def check_said(response: list[Message], label: str) -> None:
    """A response whose messages say nothing is ``empty_field``, as an empty string response
    is: a chat template wraps even an empty message in its markers, so the rendered text
    alone would hide it, and the rows kept (hence every split) would depend on the backbone."""
    if not any(message["content"].strip() for message in response):
        raise RowIssue("empty_field", label, f"the '{label}' response is empty")


def render_pair(rendering: Rendering, prompt: list[Message],
                response: list[Message]) -> tuple[str, str]:
    """(prompt text with the cue, what the full conversation adds to it)."""
    prompt_text = rendering.render(prompt, cue=True) if prompt else ""
    full = rendering.render([*prompt, *response], cue=False)
    if prompt_text and full.startswith(prompt_text):
        return prompt_text, full[len(prompt_text):]
    # a template that renders the prompt differently inside the conversation
    return prompt_text, rendering.render(response, cue=False)


def explicit_texts(values: Sequence[Any], keys: Sequence[str],
                   rendering: Rendering) -> tuple[str, str, str]:
    """(prompt, first response, second response) from a prompt message list and two lists of
    response messages (TRL's conversational format)."""
    prompt, first, second = (as_messages(v, key) for v, key in zip(values, keys))
    check_said(first, keys[1])
    check_said(second, keys[2])
    prompt_text, first_text = render_pair(rendering, prompt, first)
    _, second_text = render_pair(rendering, prompt, second)
    return prompt_text, first_text, second_text


def implicit_texts(first: object, second: object, keys: tuple[str, str],
                   rendering: Rendering) -> tuple[str, str, str]:
    """(prompt, first response, second response) of two whole conversations: strings or
    message lists whose shared beginning is the prompt."""
    if is_messages(first) or is_messages(second):
        a, b = as_messages(first, keys[0]), as_messages(second, keys[1])
        shared = shared_items(a, b)
        if shared == 0:
            raise RowIssue("no_shared_prompt", keys[1], "the two conversations share no "
                                                        "leading messages to use as the prompt")
        check_said(a[shared:], keys[0])
        check_said(b[shared:], keys[1])
        prompt, first_text = render_pair(rendering, a[:shared], a[shared:])
        _, second_text = render_pair(rendering, a[:shared], b[shared:])
        return prompt, first_text, second_text
    for key, value in zip(keys, (first, second)):
        if not isinstance(value, str):
            raise RowIssue("wrong_type", key, f"'{key}' is {type(value).__name__}, not str "
                                              "or a message list")
    shared = shared_text(first, second)
    if shared == 0:
        raise RowIssue("no_shared_prompt", keys[1], "the two texts share no leading words to "
                                                    "use as the prompt")
    return first[:shared], first[shared:], second[shared:]
