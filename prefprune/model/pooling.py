"""Where a reward is read: at each row's last real token, whatever the padding and the batch.

A decoder's sequence-classification model (Llama, GPT-2, Qwen...) scores every position, and
transformers keeps the rightmost position whose token is not the pad token. TRL builds reward
models that way, but the pad token is often a real token too: a tokenizer without one pads
with its end-of-sequence token (TRL's recipe, and prefprune's), and SmolLM2 pads with
``<|im_end|>``, which ends every chat-templated turn. A text ending in that token would be
read one token early. So prefprune reads the reward at the last position of the attention
mask, which depends on the row alone; BERT-style heads, which score one pooled vector per
row, are left as they are.

Left padding is the other way a batch could change a row's reward: transformers numbers
positions 0..T-1 across the whole padded row (Llama and GPT-2 do not shift them for left
padding), so a left-padded row's positions would depend on the longest row of its batch.
That changes GPT-2's and BERT's absolute position embeddings outright, and Llama's rotary
angles up to rounding (rotary attention depends on relative positions only).
:func:`right_aligned` moves every row's tokens to the start first, the layout whose default
positions are right for every architecture (RoBERTa-style ones included).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prefprune.model.layer_cache import HEAD_NAMES


def right_aligned(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``inputs`` with each row's real tokens moved, in order, to the start of the row (the
    same dict when no row has padding before a real token)."""
    mask = inputs.get("attention_mask")
    if mask is None or not bool((mask[:, 1:] > mask[:, :-1]).any()):
        return inputs
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)
    return {name: value.gather(1, order) if value.shape == mask.shape else value
            for name, value in inputs.items()}


def last_token_index(mask: torch.Tensor | None, length: int, rows: int) -> torch.Tensor:
    """Position of each row's last real token: the rightmost 1 of its attention mask."""
    if mask is None:
        return torch.full((rows,), length - 1, dtype=torch.long)
    flipped = mask.flip(1).to(torch.int8).argmax(dim=1)
    return (length - 1 - flipped).long()


def read_rewards_at_last_token(model: nn.Module) -> None:
    """Make ``model`` (a sequence-classification model, possibly inside a PEFT wrapper) return,
    for heads that score every position, the score at each row's last real token.

    A hook on the head keeps its per-position scores; a hook on the classification model
    replaces the logits transformers pooled by pad id with those at the mask's last 1. Every
    caller of the model (rewards, per-pair gradient hooks, ``functional_call``) gets the same
    value, and gradients flow through the one position that is read.
    """
    classifier = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = next(module for name, module in classifier.named_children() if name in HEAD_NAMES)
    scores: dict[str, torch.Tensor] = {}

    def keep(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        scores["per_position"] = output

    def pool(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        per_position = scores.pop("per_position", None)
        if per_position is None or per_position.dim() != 3:  # a head on one pooled vector
            return output
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        rows, length = per_position.shape[:2]
        last = last_token_index(mask, length, rows).to(per_position.device)
        output.logits = per_position[torch.arange(rows, device=last.device), last]
        return output

    head.register_forward_hook(keep)
    classifier.register_forward_hook(pool, with_kwargs=True)
