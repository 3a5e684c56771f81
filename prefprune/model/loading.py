"""Hugging Face and PEFT plumbing: backbones, tokenizers, LoRA, adapters, model folders.

Loading is where untrusted files enter, so the rules live here:

* custom model code runs only when the caller passes ``trust_remote_code=True`` (the user's
  own flag); a setting saved in a model folder or a config file never turns it on;
* weights are read from safetensors only: a pickled ``adapter_model.bin`` or
  ``pytorch_model.bin`` is refused, never unpickled;
* a damaged file (truncated safetensors, invalid JSON) is reported with its path.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from prefprune.errors import ModelError
from prefprune.model.backbones import default_backbone, resolve_backbone
from prefprune.model.config import RewardModelConfig
from prefprune.model.layer_cache import HEAD_NAMES, layer_stack

#: Version of the folder layout :meth:`RewardModel.save` writes.
FORMAT_VERSION = 1
#: The file that makes a folder a prefprune reward model.
METADATA_FILE = "prefprune.json"
MODEL_KIND = "prefprune-reward-model"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Attention projections that LoRA adapts, by architecture family (first match wins).
_TARGET_FAMILIES: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa, MiniLM, DeBERTa-style
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen, OPT
    ("c_attn",),  # GPT-2
    ("q_lin", "v_lin"),  # DistilBERT
)
_PICKLE_WEIGHTS = ("adapter_model.bin", "pytorch_model.bin")


def detect_target_modules(model: nn.Module) -> tuple[str, ...]:
    """Pick LoRA targets by the projection names the architecture uses."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for family in _TARGET_FAMILIES:
        if all(name in leaf_names for name in family):
            return family
    raise ModelError(
        "cannot detect LoRA target modules for this architecture; "
        "pass target_modules (e.g. --target-modules q_proj,v_proj)"
    )


def head_name(model: nn.Module) -> str:
    children = dict(model.named_children())
    for name in HEAD_NAMES:
        if name in children:
            return name
    raise ModelError(f"cannot find the scoring head among {sorted(children)}")


def _where(source: str) -> str:
    """How a loading error names ``source``: a hub id that failed is also no local folder."""
    if Path(source).is_dir():
        return repr(source)
    return f"{source!r} (no local folder of that name, so it was looked up on the hub)"


def _one_line(exc: Exception) -> str:
    """transformers' messages span lines (hub advice); an error is one line."""
    return " ".join(str(exc).split())


def load_tokenizer(source: str | None, trust_remote_code: bool) -> Any:
    """The tokenizer of backbone ``source`` (any name :func:`resolve_backbone` accepts; None:
    the default), padded on the right, with a pad token when it has none.

    Like TRL, a tokenizer without a pad token pads with its end-of-sequence token (else its
    unknown or beginning-of-sequence token). Which token pads does not matter to the reward:
    it is read at the last position of the attention mask (:mod:`prefprune.model.pooling`),
    never found by looking for the pad id, which may also end a real text (SmolLM2 pads with
    ``<|im_end|>``).
    """
    from transformers import AutoTokenizer

    folder = resolve_backbone(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            folder, trust_remote_code=trust_remote_code, local_files_only=Path(folder).is_dir())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {_where(folder)}: {_one_line(exc)}"
                         ) from exc
    if tokenizer.pad_token is None:
        filler = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if filler is None:
            raise ModelError(f"the tokenizer of {folder!r} has no pad, end-of-sequence, "
                             "unknown or beginning token to pad with")
        tokenizer.pad_token = filler
    tokenizer.padding_side = "right"
    return tokenizer


def load_backbone(source: str | None, config: RewardModelConfig,
                  pad_token_id: int | None) -> nn.Module:
    """A one-output sequence-classification model from safetensors weights (``source``: any
    name :func:`resolve_backbone` accepts).

    Its KV cache is off: a reward model never generates, and the cache would hold every
    layer's keys and values until each forward pass ends.
    """
    from transformers import AutoModelForSequenceClassification

    model = _from_pretrained(AutoModelForSequenceClassification, source, config, num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def load_causal_lm(source: str | None, config: RewardModelConfig) -> nn.Module:
    """A causal language model (a DPO policy's base) from safetensors weights."""
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, source, config)


def _from_pretrained(auto: Any, source: str | None, config: RewardModelConfig,
                     **extra: Any) -> nn.Module:
    """``auto.from_pretrained`` with prefprune's rules: safetensors only, remote code only from
    the user's flag, local folders offline, one error line, no KV cache."""
    folder = resolve_backbone(source)
    _refuse_pickle(Path(folder))
    try:
        with quiet_transformers():  # the "head newly initialised" notice is expected here
            model = auto.from_pretrained(
                folder,
                use_safetensors=True,
                trust_remote_code=config.trust_remote_code,
                attn_implementation=config.attn_implementation,
                local_files_only=Path(folder).is_dir(),
                **extra,
            )
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelError(f"cannot load backbone {_where(folder)}: {_one_line(exc)}") from exc
    model.config.use_cache = False
    return model


def _refuse_pickle(folder: Path) -> None:
    """A local folder whose weights exist only as pickles is refused, never unpickled."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = [name for name in _PICKLE_WEIGHTS if (folder / name).is_file()]
    if pickles:
        raise ModelError(f"{folder / pickles[0]}: pickled weights are refused (loading a "
                         "pickle can run arbitrary code); convert them to safetensors")


def attach_lora(model: nn.Module, config: RewardModelConfig) -> nn.Module:
    """Wrap ``model`` in a fresh LoRA adapter (seeded by the caller); a reward model's scalar
    head trains too, a DPO policy's LM head stays frozen."""
    from peft import LoraConfig, get_peft_model

    targets = config.target_modules or detect_target_modules(model)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(targets),
        modules_to_save=[head_name(model)] if config.objective == "reward" else None,
        fan_in_fan_out="c_attn" in targets,  # GPT-2's Conv1D stores weights transposed
        **_layer_selection(model, config.lora_layers),
    )
    try:
        with quiet_peft():
            model = get_peft_model(model, lora)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError, or a module LoRA cannot wrap
        raise _target_error(targets, model, exc) from exc
    freeze_head_bias(model)
    return model


def _target_error(targets: Sequence[str], model: nn.Module, exc: ValueError) -> ModelError:
    """Which target modules the backbone lacks (peft matches a target by name suffix), and
    the names of the layers it could adapt, which is what the user needs to pick again."""
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    problem = (f"no module named {', '.join(unmatched)} in this backbone" if unmatched
               else f"LoRA cannot adapt {', '.join(targets)} ({exc})")
    return ModelError(f"target_modules: {problem}; its linear layers are named "
                      f"{', '.join(linear_names(model))}")


def linear_names(model: nn.Module) -> list[str]:
    """The leaf names of the layers below the head that LoRA adapts best (linear, and GPT-2's
    Conv1D): what ``--target-modules`` may name."""
    from transformers.pytorch_utils import Conv1D

    head = head_name(model)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (nn.Linear, Conv1D))
                   and name.split(".", 1)[0] != head})


def _layer_selection(model: nn.Module, lora_layers: int) -> dict[str, Any]:
    """PEFT arguments that restrict LoRA to the top ``lora_layers`` layers (0: all)."""
    if lora_layers == 0:
        return {}
    _, pattern, layers = layer_stack(model)
    if not 1 <= lora_layers <= len(layers):
        raise ModelError(f"lora_layers must be between 1 and {len(layers)} for this backbone, "
                         f"got {lora_layers}")
    return {"layers_to_transform": list(range(len(layers) - lora_layers, len(layers))),
            "layers_pattern": pattern}


def load_adapter(base: nn.Module, adapter: Path) -> nn.Module:
    """``base`` with the saved LoRA adapter and head of folder ``adapter`` (safetensors only)."""
    from peft import PeftModel

    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = adapter / "adapter_model.bin"
        if pickled.is_file():
            raise ModelError(f"{pickled}: pickled adapter weights are refused (loading a "
                             "pickle can run arbitrary code); save the adapter as safetensors")
        raise ModelError(f"{adapter}: no {ADAPTER_WEIGHTS} in the adapter folder")
    check_safetensors(weights)
    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ModelError(f"{adapter}: cannot load the adapter: {exc}") from exc
    freeze_head_bias(model)
    return model


def check_safetensors(path: Path) -> None:
    """Open ``path``'s header and tensors once, so damage is reported with the file name."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                handle.get_slice(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: damaged or truncated safetensors file ({exc}); save the "
                         "model again") from exc


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a :class:`ModelError` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable {what} ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a readable {what} (expected a JSON object)")
    return data


def saved_tokenizer_source(path: Path) -> str:
    """Where a saved model's tokenizer lives: its own copy (prefprune's ``tokenizer/``, or the
    folder of an adapter or full checkpoint), else the backbone it records."""
    for folder in (path / "tokenizer", path):
        if (folder / "tokenizer_config.json").is_file():
            return str(folder)
    if (path / METADATA_FILE).is_file():
        backbone = (read_json(path / METADATA_FILE, "prefprune model description")
                    .get("config") or {}).get("backbone")
        return backbone or default_backbone()
    if (path / "adapter_config.json").is_file():
        base = read_json(path / "adapter_config.json", "adapter config")
        return base.get("base_model_name_or_path") or default_backbone()
    raise ModelError(f"{path}: not a reward model directory (expected {METADATA_FILE}, "
                     "adapter_config.json or config.json)")


def freeze_head_bias(model: nn.Module) -> None:
    """The head's bias adds the same constant to both rewards of a pair, so it cancels in every
    margin: its gradient is rounding noise that Adam would turn into real steps, and it adds a
    zero-curvature direction to H. It is not part of θ."""
    for name, param in model.named_parameters():
        if is_head_bias(name):
            param.requires_grad_(False)


def is_head_bias(name: str) -> bool:
    """Whether parameter ``name`` of a PEFT model is the trained head's bias, which θ leaves
    out (see :func:`freeze_head_bias`); a model trained elsewhere may have trained it."""
    return name.endswith(".modules_to_save.default.bias")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' notices and progress bars (loading, "Writing model shards") describe its
    internals, not anything a user acts on; prefprune shows its own progress."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextmanager
def quiet_peft() -> Iterator[None]:
    """peft still calls transformers' deprecated ``is_gradient_checkpointing``: nothing for a
    user to fix, so keep the FutureWarning out of their output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield
