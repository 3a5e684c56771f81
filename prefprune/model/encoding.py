"""Turn preference pairs into model inputs: 2B rows per batch of B pairs.

The response is always kept whole and the prompt is cut from the left, so the model sees the
text being judged and the end of the context closest to it. A response longer than
``max_length`` on its own is cut on the right. Users must know when context is lost, so the
encoder counts both kinds of cut, and :meth:`PairEncoder.truncation` reports them per split
before any training starts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class EncodingStats:
    """Rows cut by the encoder so far (each encode call counts its rows again)."""

    prompts_truncated: int = 0
    responses_truncated: int = 0


@dataclass(frozen=True)
class Truncation:
    """How many pairs of a set lose text at ``max_length`` (each pair counted once)."""

    pairs: int
    prompts_cut: int
    responses_cut: int
    max_length: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def describe(self) -> str:
        """One line for the terminal and the report."""
        return (f"at max_length {self.max_length}, {self.prompts_cut} of {self.pairs} pairs "
                f"had their prompt cut from the left and {self.responses_cut} a response cut")


@dataclass
class PairBatch:
    """A batch of B pairs as 2B rows: rows [0, B) are chosen, rows [B, 2B) rejected.
    ``completion_mask`` marks the response tokens of each row, for objectives that score
    the response alone (DPO)."""

    inputs: dict[str, torch.Tensor]
    size: int
    completion_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PairBatch:
        mask = None if self.completion_mask is None else self.completion_mask.to(device)
        return PairBatch({k: v.to(device) for k, v in self.inputs.items()}, self.size, mask)

    @property
    def tokens(self) -> int:
        return int(self.inputs["attention_mask"].sum())


class PairEncoder:
    """Encodes pairs with a tokenizer at a fixed ``max_length``."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.stats = EncodingStats()

    def __call__(self, prompts: Sequence[str], chosen: Sequence[str],
                 rejected: Sequence[str]) -> PairBatch:
        """Encode B pairs as 2B rows, padded to the longest row."""
        rows = self._rows(list(prompts) * 2, list(chosen) + list(rejected))
        padded = self.tokenizer.pad(rows, padding=True, return_tensors="pt")
        return PairBatch(dict(padded), len(prompts))

    @property
    def _budget(self) -> int:
        """Tokens left for prompt + response once the special tokens are placed."""
        return self.max_length - self.tokenizer.num_special_tokens_to_add(pair=True)

    def _rows(self, prompts: list[str], responses: list[str]) -> list[dict[str, list]]:
        tok = self.tokenizer
        response_lengths = self._token_counts(responses)
        fits = [n < self._budget for n in response_lengths]
        rows: list[dict[str, list]] = [{} for _ in prompts]
        whole = [i for i, ok in enumerate(fits) if ok]
        cut = [i for i, ok in enumerate(fits) if not ok]
        if whole:
            tok.truncation_side = "left"
            encoded = tok([prompts[i] for i in whole], [responses[i] for i in whole],
                          truncation="only_first", max_length=self.max_length)
            _scatter(rows, whole, encoded)
            prompt_lengths = self._token_counts([prompts[i] for i in whole])
            self.stats.prompts_truncated += sum(
                p + response_lengths[i] > self._budget for p, i in zip(prompt_lengths, whole))
        if cut:
            tok.truncation_side = "right"
            _scatter(rows, cut, tok([responses[i] for i in cut], truncation=True,
                                    max_length=self.max_length))
            self.stats.responses_truncated += len(cut)
        return rows

    def _token_counts(self, texts: list[str]) -> list[int]:
        """Token counts up to one more than fits (``budget + 1``), which is all that deciding
        what is cut needs. A text is tokenized only as far as that takes: a window of
        characters, widened only for the texts whose window held too few tokens. Whole texts
        cost memory per token, so a single 60 MB response used to take gigabytes."""
        cap = self._budget + 1
        counts = [0] * len(texts)
        todo, window = list(range(len(texts))), _CHARS_PER_TOKEN * cap
        while todo:
            heads = [_head(texts[i], window) for i in todo]
            encoded = self.tokenizer(heads, add_special_tokens=False, verbose=False).input_ids
            for i, ids in zip(todo, encoded):
                counts[i] = min(len(ids), cap)
            todo = [i for i, head, ids in zip(todo, heads, encoded)
                    if len(ids) < cap and len(head) < len(texts[i])]
            window *= _CHARS_PER_TOKEN
        return counts

    def truncation(self, records: Any) -> Truncation:
        """Count the pairs of ``records`` (prompt/chosen/rejected columns) that lose text,
        without encoding them: a pair's prompt is cut when it does not fit beside one of its
        responses, a response is cut when it does not fit on its own."""
        prompts = self._token_counts(list(records["prompt"]))
        chosen = self._token_counts(list(records["chosen"]))
        rejected = self._token_counts(list(records["rejected"]))
        budget = self._budget
        prompts_cut = responses_cut = 0
        for p, c, r in zip(prompts, chosen, rejected):
            responses_cut += max(c, r) >= budget
            prompts_cut += any(n < budget and p + n > budget for n in (c, r))
        return Truncation(len(prompts), prompts_cut, responses_cut, self.max_length)


#: Characters per token the first counting window allows (text is about 4 per token).
_CHARS_PER_TOKEN = 16


def _head(text: str, size: int) -> str:
    """The first ``size`` characters of ``text``, cut back to a whitespace when there is one in
    their second half: a word split in two could count more tokens than it has."""
    if len(text) <= size:
        return text
    cut = max(text.rfind(" ", 0, size), text.rfind("\n", 0, size))
    return text[:cut] if cut > size // 2 else text[:size]


def _scatter(rows: list[dict[str, list]], where: list[int], encoded: Any) -> None:
    for j, i in enumerate(where):
        rows[i] = {key: values[j] for key, values in encoded.items()}


def encoded_batches(encode: PairEncoder, records: Any, batch_size: int,
                    order: Sequence[int] | None = None
                    ) -> Iterator[tuple[list[int], PairBatch]]:
    """Yield (row indices, encoded batch) over ``records`` (anything indexable by a list of
    rows that returns ``prompt``/``chosen``/``rejected`` columns, e.g. a ``datasets.Dataset``)."""
    order = list(range(len(records))) if order is None else list(order)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        chunk = records[rows]
        yield rows, encode(chunk["prompt"], chunk["chosen"], chunk["rejected"])


def length_order(records: Any) -> list[int]:
    """Rows sorted by text length, so that evaluation batches carry little padding."""
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in
               zip(records["prompt"], records["chosen"], records["rejected"])]
    return sorted(range(len(lengths)), key=lengths.__getitem__)
