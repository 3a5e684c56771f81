"""The reward model: a sequence-classification backbone with one output, adapted by LoRA.

The trainable parameters θ are the LoRA matrices plus the scalar head (docs/method.md,
section 1); every later step (gradients, curvature, scores) works on exactly those parameters,
in the fixed order of :meth:`RewardModel.trainable_parameters`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prefprune.errors import ConfigError, ModelError
from prefprune.files import MARKER, check_folder, mark, replacing_entries, write_json_atomic
from prefprune.model.backbones import resolve_backbone
from prefprune.model.config import RewardModelConfig
from prefprune.model.encoding import EncodingStats, PairBatch, PairEncoder
from prefprune.model.layer_cache import FrozenLayerCache
from prefprune.model.loading import (
    FORMAT_VERSION,
    METADATA_FILE,
    MODEL_KIND,
    attach_lora,
    load_adapter,
    load_backbone,
    load_tokenizer,
    quiet_transformers,
    read_json,
)
from prefprune.model.pooling import read_rewards_at_last_token, right_aligned

#: What :meth:`RewardModel.save` writes into its folder, the description last: a folder
#: without it is no model, so it is written once everything else is in place.
MODEL_ENTRIES = ("adapter", "tokenizer", MARKER, METADATA_FILE)
#: The entries that hold the model itself; its marker stays while a user's files are beside it.
MODEL_FILES = tuple(name for name in MODEL_ENTRIES if name != MARKER)


def seed_everything(seed: int) -> None:
    """Seed every RNG a run touches, so that training on CPU is bit-for-bit repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RewardModel:
    """A LoRA reward model plus its tokenizer and pair encoder.

    Build a fresh one with :meth:`create` (seeded: the same seed gives the same initial
    LoRA and head, which retraining after pruning relies on), or reload a trained one with
    :meth:`load`. ``r(x, y)`` is :meth:`rewards`; the pair margin is chosen minus rejected.
    When LoRA adapts only the top layers, the frozen layers below them are served from a
    :class:`FrozenLayerCache` (``config.layer_cache_mb``; several models may share one).
    A reward is read at each row's last real token, whatever the padding
    (:mod:`prefprune.model.pooling`).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: RewardModelConfig, *,
                 cache: FrozenLayerCache | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self._prepare(model)
        self.encoder = self._make_encoder(tokenizer)
        self.metadata: dict[str, Any] = {}
        self.layer_cache: FrozenLayerCache | None = None
        if config.lora_layers > 0:
            self.use_layer_cache(cache or FrozenLayerCache.for_config(config))

    # --- what makes an objective --------------------------------------------------------

    def _prepare(self, model: nn.Module) -> None:
        """A reward is read at each row's last real token (:mod:`prefprune.model.pooling`)."""
        read_rewards_at_last_token(model)

    def _make_encoder(self, tokenizer: Any) -> PairEncoder:
        return PairEncoder(tokenizer, self.config.max_length)

    @classmethod
    def _base_model(cls, source: str, config: RewardModelConfig, tokenizer: Any) -> nn.Module:
        """The backbone this objective adapts: one with a fresh scalar head."""
        return load_backbone(source, config, tokenizer.pad_token_id)

    @classmethod
    def implementation(cls, objective: str) -> type[RewardModel]:
        """The class of ``objective`` (``reward`` or ``dpo``)."""
        from prefprune.model.policy import DPOPolicy  # the DPO policy builds on this class

        return {"reward": RewardModel, "dpo": DPOPolicy}[objective]

    # --- construction -------------------------------------------------------------------

    @classmethod
    def create(cls, config: RewardModelConfig | None = None, *, seed: int = 0,
               cache: FrozenLayerCache | None = None) -> RewardModel:
        """Load the backbone, attach LoRA (and a fresh head), all seeded by ``seed``; the
        config's objective says which model it is."""
        config = config or RewardModelConfig()
        impl = cls.implementation(config.objective)
        source = resolve_backbone(config.backbone)
        tokenizer = load_tokenizer(source, config.trust_remote_code)
        seed_everything(seed)
        model = attach_lora(impl._base_model(source, config, tokenizer), config)
        model.eval()
        return impl(model, tokenizer, config, cache=cache)

    @classmethod
    def load(cls, path: str | os.PathLike, *, backbone: str | None = None,
             trust_remote_code: bool = False, runtime: RewardModelConfig | None = None,
             cache: FrozenLayerCache | None = None,
             settings: Mapping[str, Any] | None = None) -> RewardModel:
        """Load a reward model saved by prefprune, a PEFT adapter directory, or a full
        sequence-classification checkpoint.

        ``backbone`` overrides the base model recorded in the directory; the runtime settings
        of ``runtime`` (the caches and their budgets: what does not change results) replace
        the saved ones, so a command's own cache flags apply to a model it loads. Custom model
        code runs only with ``trust_remote_code=True``, never because a file says so. A full
        checkpoint gets a fresh LoRA whose B matrices are zero, so its function is unchanged
        and influence is taken over LoRA + head, exactly as for a model trained here.

        ``settings`` are the model settings a folder prefprune did not write cannot say (the
        objective and β of a DPO policy trained elsewhere). A TRL output folder is loaded with
        :func:`prefprune.integrations.trl.load_model`, which reads pairs as TRL did.
        """
        folder = Path(path)
        runtime = {**_runtime_settings(runtime), "trust_remote_code": trust_remote_code}
        if (folder / METADATA_FILE).is_file():
            meta = read_json(folder / METADATA_FILE, "prefprune model description")
            if meta.get("format_version") != FORMAT_VERSION:
                raise ModelError(f"{folder / METADATA_FILE}: unsupported format_version "
                                 f"{meta.get('format_version')!r}")
            return cls._from_adapter(folder / "adapter", folder / "tokenizer", backbone,
                                     runtime, meta, cache)
        extra = dict(settings or {})
        if (folder / "adapter_config.json").is_file():
            return cls._from_adapter(folder, folder, backbone, runtime, {"config": extra}, cache)
        if (folder / "config.json").is_file():
            return cls.create(RewardModelConfig(backbone=str(folder), **extra, **runtime),
                              cache=cache)
        raise ModelError(f"{folder}: not a reward model directory (expected {METADATA_FILE}, "
                         "adapter_config.json or config.json)")

    @classmethod
    def _from_adapter(cls, adapter: Path, tokenizer_dir: Path, backbone: str | None,
                      runtime: dict[str, Any], meta: dict[str, Any],
                      cache: FrozenLayerCache | None) -> RewardModel:
        adapter_cfg = read_json(adapter / "adapter_config.json", "adapter config")
        config = _saved_config(meta, adapter_cfg, backbone, runtime, adapter)
        if config.objective == "reward" and not adapter_cfg.get("modules_to_save"):
            raise ModelError(f"{adapter}: the adapter has no trained scoring head "
                             "(modules_to_save is empty), so its rewards are undefined")
        impl = cls.implementation(config.objective)
        source = resolve_backbone(config.backbone)
        tok_source = str(tokenizer_dir) if (tokenizer_dir / "tokenizer_config.json").is_file() \
            else source
        tokenizer = load_tokenizer(tok_source, config.trust_remote_code)
        model = load_adapter(impl._base_model(source, config, tokenizer), adapter)
        model.eval()
        loaded = impl(model, tokenizer, config, cache=cache)
        loaded.metadata = meta.get("metadata", {})
        return loaded

    def save(self, path: str | os.PathLike, *, overwrite: bool = False,
             **metadata: Any) -> Path:
        """Save adapter + head (safetensors), tokenizer, config and ``metadata`` to ``path``.

        ``path`` must be new, empty, or (with ``overwrite``) a reward model prefprune saved
        before; only the entries of :data:`MODEL_ENTRIES` are replaced, so files a user put
        beside a model stay. The model is built beside its destination and moved into place
        with its description last, so a crash leaves the old model, the new one, or a folder
        that loads as no model: never a mixture.
        """
        path = Path(path)
        check_folder(path, "model", overwrite=overwrite)
        merged = {**self.metadata, **metadata}
        with replacing_entries(path, MODEL_ENTRIES) as tmp, quiet_transformers():
            self.model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            write_json_atomic(tmp / METADATA_FILE, {
                "format_version": FORMAT_VERSION,
                "kind": MODEL_KIND,
                "config": self.config.to_dict(),  # backbone None = the default, resolved at load
                "metadata": merged,
            })
            mark(tmp, "model")
        self.metadata = merged
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

    # --- encoding and forward -----------------------------------------------------------

    def encode_pairs(self, prompts: Sequence[str], chosen: Sequence[str],
                     rejected: Sequence[str]) -> PairBatch:
        """Encode B pairs as 2B rows (see :class:`~prefprune.model.encoding.PairEncoder`)."""
        return self.encoder(prompts, chosen, rejected)

    @property
    def encoding_stats(self) -> EncodingStats:
        return self.encoder.stats

    def use_layer_cache(self, cache: FrozenLayerCache | None) -> None:
        """Serve the frozen lower layers from ``cache`` (shareable between models on the same
        backbone and adapted layers); ``None`` turns caching off."""
        if cache is not None:
            try:
                cache.bind(resolve_backbone(self.config.backbone), self.model)
            except ValueError as exc:
                raise ModelError(f"cannot cache the frozen layers: {exc}") from exc
        self.layer_cache = cache

    def flush(self) -> None:
        """Write what the caches computed so far to disk (the frozen-layer features)."""
        if self.layer_cache is not None:
            self.layer_cache.flush()

    def rewards(self, batch: PairBatch) -> torch.Tensor:
        """Scalar reward per row, shape (2B,), the same for a row whatever batch it is in and
        whichever side it is padded on (rows are right-aligned first)."""
        inputs = right_aligned(batch.inputs)
        if self.layer_cache is not None:
            return self.layer_cache.rewards(self.model, inputs)
        return self.model(**inputs).logits.squeeze(-1).float()

    def margins(self, batch: PairBatch) -> torch.Tensor:
        """Margin m = r(x, y_w) − r(x, y_l) per pair, shape (B,)."""
        rewards = self.rewards(batch)
        return rewards[: batch.size] - rewards[batch.size :]


def _runtime_settings(config: RewardModelConfig | None) -> dict[str, Any]:
    """The settings of ``config`` that change no result (identity=False), by name."""
    if config is None:
        return {}
    return {name: getattr(config, name) for name, f in RewardModelConfig.fields_help().items()
            if not f.metadata["identity"]}


def _saved_config(meta: dict[str, Any], adapter_cfg: dict[str, Any], backbone: str | None,
                  runtime: dict[str, Any], where: Path) -> RewardModelConfig:
    """The config a saved model records, with the adapter's own LoRA shape, the caller's
    backbone override and the caller's runtime settings (never the file's remote-code flag)."""
    saved = dict(meta.get("config") or {})
    saved.pop("trust_remote_code", None)  # only the user's flag may allow remote code
    known = set(RewardModelConfig.fields_help())
    values = {k: v for k, v in saved.items() if k in known}
    if values.get("lora_layers", 0) is None:  # folders saved before 0 meant "all layers"
        values["lora_layers"] = 0
    if "lora_layers" not in values:  # an adapter trained elsewhere (TRL): the layers it adapts
        values["lora_layers"] = len(adapter_cfg.get("layers_to_transform") or ())
    values.update({
        "backbone": backbone or saved.get("backbone") or adapter_cfg.get("base_model_name_or_path"),
        "lora_r": adapter_cfg.get("r", 8),
        "lora_alpha": adapter_cfg.get("lora_alpha", 16),
        "target_modules": tuple(sorted(adapter_cfg.get("target_modules") or ())) or None,
    })
    try:
        return RewardModelConfig.from_dict(values, **runtime)
    except ConfigError as exc:
        raise ModelError(f"{where}: invalid saved model settings: {exc}") from exc
