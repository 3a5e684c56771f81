"""The reward model: configuration, the Bradley–Terry objective, pair encoding, backbone names
and HF/PEFT loading, the LoRA model itself and the frozen-layer cache that makes its
top-layer variant cheap."""

from prefprune.model.backbones import NAMED_BACKBONES, default_backbone, resolve_backbone
from prefprune.model.config import DEFAULT_LAYER_CACHE_MB, RewardModelConfig
from prefprune.model.encoding import (
    PairBatch,
    PairEncoder,
    Truncation,
    encoded_batches,
    length_order,
)
from prefprune.model.layer_cache import FrozenLayerCache
from prefprune.model.loading import METADATA_FILE, detect_target_modules
from prefprune.model.objective import bradley_terry_loss, gauss_newton_weights, loss_slope
from prefprune.model.reward_model import RewardModel, seed_everything

__all__ = [
    "DEFAULT_LAYER_CACHE_MB",
    "METADATA_FILE",
    "NAMED_BACKBONES",
    "FrozenLayerCache",
    "PairBatch",
    "PairEncoder",
    "RewardModel",
    "RewardModelConfig",
    "Truncation",
    "bradley_terry_loss",
    "default_backbone",
    "detect_target_modules",
    "encoded_batches",
    "gauss_newton_weights",
    "length_order",
    "loss_slope",
    "resolve_backbone",
    "seed_everything",
]
