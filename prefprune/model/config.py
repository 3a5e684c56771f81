"""What defines a reward model: backbone, LoRA, sequence length, and how it runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from prefprune.config import Settings, setting
from prefprune.errors import ConfigError
from prefprune.model.feature_store import default_feature_root

#: RAM for cached frozen-layer activations when LoRA adapts only the top layers.
DEFAULT_LAYER_CACHE_MB = 2048.0
#: Disk for them (SmolLM2-135M on all of HH harmless needs about 1.3 GB).
DEFAULT_FEATURE_CACHE_MB = 20480.0


@dataclass(frozen=True)
class RewardModelConfig(Settings):
    """A reward model's architecture, its trainable parameters θ, and how it is run.

    θ is the LoRA matrices plus the scalar head. ``lora_layers=k`` adapts only the top k
    transformer layers (0: all); the layers below are then frozen, and their output is
    computed once per sequence and cached (``layer_cache_mb``), which makes every epoch,
    retrain and gradient pass run only the top layers. The default, the top layer, is the
    measured best for the default backbone (docs/defaults.md).
    """

    section: ClassVar[str] = "model"

    objective: str = setting(
        "reward", choices=("reward", "dpo"),
        help="reward: a reward model (a scalar head on the backbone, Bradley–Terry loss); dpo: "
             "a DPO policy (the backbone as a causal LM, its implicit reward "
             "β·log(π/π_ref) in the same loss).")
    beta: float = setting(0.1, above=0.0, help="DPO's β: the scale of the implicit reward "
                                               "(--objective dpo).")
    backbone: str | None = setting(
        None, help="Backbone: a local directory or a hub model name. Default: the offline "
                   "all-MiniLM-L6-v2.")
    max_length: int = setting(
        128, min=8, help="Tokens per prompt+response; the prompt is cut from the left first.")
    lora_r: int = setting(8, min=1, help="LoRA rank.")
    lora_alpha: int = setting(16, min=1, help="LoRA scaling alpha.")
    lora_dropout: float = setting(0.0, min=0.0, max=0.99, help="LoRA dropout probability.")
    target_modules: tuple[str, ...] | None = setting(
        None, metavar="NAMES", help="Comma-separated module names LoRA adapts (e.g. "
                                    "q_proj,v_proj). Default: detected from the architecture.")
    lora_layers: int = setting(
        1, min=0, help="Adapt only the top N transformer layers (0: all of them). The frozen "
                       "layers below are computed once per sequence and cached (see "
                       "--layer-cache-mb).")
    layer_cache_mb: float = setting(
        DEFAULT_LAYER_CACHE_MB, min=0.0, identity=False,
        help="RAM for the cached output of the frozen layers when --lora-layers is set; 0 "
             "keeps none in RAM.")
    feature_cache: str | None = setting(
        "auto", identity=False, negatable=True, metavar="DIR",
        help="Folder where the frozen layers' output is kept on disk, shared by every "
             "command, process and run on this machine; auto: features/ in prefprune's "
             "cache folder ($PREFPRUNE_CACHE_DIR, default ~/.cache/prefprune). "
             "--no-feature-cache keeps it in RAM only.")
    feature_cache_mb: float = setting(
        DEFAULT_FEATURE_CACHE_MB, min=0.0, identity=False,
        help="Disk budget of the feature cache; past it no more features are written.")
    attn_implementation: str = setting(
        "eager", cli=False, choices=("eager", "sdpa"),
        help="Attention kernel. Eager attention supports the double backward of exact "
             "Hessian-vector products on CPU, which SDPA does not.")
    trust_remote_code: bool = setting(
        False, persist=False, identity=False,
        help="Allow custom model code from the backbone's repository to run. Never read "
             "from a file: only this flag (or the Python argument) turns it on.")

    def validate(self) -> None:
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError("target_modules", "must name at least one module (or be null "
                                                "to detect them)")

    def feature_store(self) -> tuple[Path, float] | None:
        """The feature cache's folder and disk budget, or None when it is off."""
        if self.feature_cache is None:
            return None
        root = default_feature_root() if self.feature_cache == "auto" \
            else Path(self.feature_cache).expanduser()
        return root, self.feature_cache_mb
