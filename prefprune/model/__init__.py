"""The models a preference pair trains: a reward model or a DPO policy (one objective seam,
the Bradley–Terry loss of a margin), with their configuration, pair encoding, backbone names,
HF/PEFT loading, and the frozen-layer cache that makes their top-layer variants cheap."""

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
from prefprune.model.policy import DPOPolicy
from prefprune.model.reward_model import RewardModel, seed_everything

__all__ = [
    "DEFAULT_LAYER_CACHE_MB",
    "METADATA_FILE",
    "NAMED_BACKBONES",
    "DPOPolicy",
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
