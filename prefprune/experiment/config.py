"""Every setting of a pruning experiment, as one validated, YAML-round-tripping object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from prefprune.config import Settings, limits_text, setting
from prefprune.data import DEFAULT_SPLIT_FRACTIONS, default_expert_validation_path
from prefprune.data.options import DataOptions
from prefprune.ensemble import SUFFIX, EnsembleConfig, ensembled
from prefprune.errors import ConfigError, ExperimentConfigError
from prefprune.influence.config import ENGINE_SCORES, InfluenceConfig
from prefprune.integrations.trl import TrlConfig
from prefprune.model.config import RewardModelConfig
from prefprune.pruning import PruneConfig
from prefprune.training import TrainConfig

#: Scores an experiment ranks pairs by unless told otherwise (docs/method.md, section 4).
DEFAULT_METHODS = ("if", "grad_dot", "grad_cos", "flip", "loss", "random")
#: Scores ``prefprune validate`` checks unless told otherwise: influence, gradient similarity,
#: the label-noise baseline and the floor.
VALIDATE_SCORES = ("if", "flip", "grad_dot", "grad_cos", "loss", "random")


@dataclass(frozen=True)
class RunConfig(Settings):
    """What every retraining run needs: the data and its held-out sets, the model, training,
    scoring and ensemble settings. ``data=None`` is the embedded synthetic set."""

    error: ClassVar[type[ConfigError]] = ExperimentConfigError

    data: str | None = setting(None, cli=False, help="The preference data (default: the "
                                                     "embedded synthetic set).")
    data_options: DataOptions = setting(default_factory=DataOptions, cli=False,
                                        help="How to read the data.")
    validation: str | None = setting(
        None, help="A separate validation source (any layout prefprune reads, with its own "
                   "--validation-* options) used as the influence target instead of DATA's "
                   "validation split: e.g. a small expert-labelled set.")
    validation_options: DataOptions = setting(default_factory=DataOptions, cli=False,
                                              help="How to read the validation source.")
    test: str | None = setting(None, help="A separate test source (its own --test-* options) "
                                          "instead of DATA's test split: what every model is "
                                          "measured on.")
    test_options: DataOptions = setting(default_factory=DataOptions, cli=False,
                                        help="How to read the test source.")
    allow_overlap: bool = setting(False, help="Use a validation or test source even if it "
                                              "shares pairs with the training split.")
    split_fractions: tuple[float, float, float] = setting(
        DEFAULT_SPLIT_FRACTIONS, min=0.0, max=1.0, metavar="TRAIN,VAL,TEST",
        help="Train/validation/test shares for data without source splits; shares summing "
             "below 1 leave a seeded sample of the rest out (a quick run).")
    split_seed: int = setting(0, help="Seed of the train/validation/test split of data "
                                      "without source splits.")
    model: RewardModelConfig = setting(default_factory=RewardModelConfig, cli=False,
                                       help="The reward model.")
    train: TrainConfig = setting(default_factory=TrainConfig, cli=False,
                                 help="Training settings (the seed comes from the run).")
    influence: InfluenceConfig = setting(default_factory=InfluenceConfig, cli=False,
                                         help="Scoring settings.")
    ensemble: EnsembleConfig = setting(default_factory=EnsembleConfig, cli=False,
                                       help="Combine several models' scores per pair.")

    #: Settings that only choose which runs are made, not what any saved model, score table
    #: or run record holds: a run may resume with them changed (more seeds, fewer methods).
    plan_fields: ClassVar[frozenset[str]] = frozenset()
    #: Nested settings the run sets itself from its own seed(s): a file or a caller that set
    #: them would be silently overruled, so they are refused, and never saved.
    run_owned: ClassVar[tuple[tuple[str, str], ...]] = (("train", "seed"), ("influence", "seed"))

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any] | None, **fixed: Any) -> R:
        for section, key in cls.run_owned:
            if isinstance((data or {}).get(section), Mapping) and key in data[section]:
                raise cls.error(f"{section}.{key}", cls._owned_problem())
        return super().from_dict(data, **fixed)

    @classmethod
    def _owned_problem(cls) -> str:
        return ("is set for each run from the run's own seed (seeds, or seed for validate); "
                "remove it")

    def _plain_fields(self, *, identity: bool) -> dict[str, Any]:
        out = super()._plain_fields(identity=identity)
        for section, key in self.run_owned:
            out[section].pop(key, None)
        return out

    def run_identity(self) -> dict[str, object]:
        """What every saved model, score table and run record of this run depends on."""
        return {k: v for k, v in self.identity().items() if k not in self.plan_fields}

    def validate(self) -> None:
        for section, key in self.run_owned:
            nested = getattr(self, section)
            if getattr(nested, key) != type(nested).fields_help()[key].default:
                raise ConfigError(f"{section}.{key}", self._owned_problem())
        if not 0 < sum(self.split_fractions) <= 1 + 1e-6:
            raise ConfigError("split_fractions", "must sum to at most 1 (less leaves the rest of "
                                                 f"the data out), got {list(self.split_fractions)}")

    def score_columns(self) -> tuple[str, ...]:
        """The score columns a run's table will have: each requested score, and the
        ensemble's combination of every engine score but the random control."""
        columns = list(self.influence.scores)
        if self.ensemble.enabled:
            columns += [f"{s}{SUFFIX}" for s in ensembled(self.influence.scores)
                        if s in ENGINE_SCORES]
        return tuple(columns)

    def data_kwargs(self) -> dict[str, object]:
        """Keyword arguments of :func:`~prefprune.pipeline.prepare_data` for this run."""
        return {"options": self.data_options, "fractions": self.split_fractions,
                "seed": self.split_seed, "validation": self.validation,
                "validation_options": self.validation_options, "test": self.test,
                "test_options": self.test_options, "allow_overlap": self.allow_overlap}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls: type[R], path: str | Path, **fixed: object) -> R:
        """Read and validate a YAML file; every problem names the file and the setting."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ExperimentConfigError(str(path), f"not a readable YAML file: {exc}") from exc
        if not isinstance(data, dict):
            raise ExperimentConfigError(str(path), "expected a mapping of settings")
        try:
            return cls.from_dict(data, **fixed)
        except ConfigError as exc:
            raise ExperimentConfigError(str(path), str(exc)) from exc


R = TypeVar("R", bound=RunConfig)


@dataclass(frozen=True)
class ExperimentConfig(RunConfig):
    """Every setting of a pruning experiment (docs/method.md, section 4).

    Each column of ``prune_by`` (default: every score computed) ranks the pairs; its top
    fraction is removed (or relabelled) and the model retrained, per replicate seed.
    ``inject_flips`` swaps a seeded share of the training labels (seeded per replicate) and
    keeps the truth, for detection metrics.
    """

    plan_fields: ClassVar[frozenset[str]] = frozenset(
        {"seeds", "fractions", "helpful", "relabel", "prune_by", "helpful_by", "relabel_by"})

    influence: InfluenceConfig = setting(
        default_factory=lambda: InfluenceConfig(scores=DEFAULT_METHODS), cli=False,
        help="Scoring settings; influence.scores are computed for every replicate.")
    fractions: tuple[float, ...] = setting(
        (0.05, 0.1, 0.2), metavar="F,...",
        help="Comma-separated shares to remove per method (each as prune's --fraction: "
             f"{limits_text(PruneConfig.fields_help()['fraction'])}).")
    seeds: tuple[int, ...] = setting((0, 1, 2), metavar="S,...",
                                     help="Comma-separated replicate seeds.")
    split_per_seed: bool = setting(
        False, help="Draw a new train/validation/test split for every replicate (split seed = "
                    "split_seed + replicate seed), so that the intervals include the variance "
                    "between splits, not only between trainings.")
    helpful: bool = setting(True, help="Also remove the most helpful pairs.")
    relabel: bool = setting(True, help="Also flip the top harmful pairs' labels instead of "
                                       "removing them.")
    inject_flips: float = setting(
        0.0, min=0.0, max=0.99, help="Swap this seeded share of the training labels first "
                                     "(ground truth kept) and measure how well each score "
                                     "finds them.")
    prune_by: tuple[str, ...] | None = setting(
        None, metavar="COLUMNS",
        help="Score columns whose top pairs are removed and retrained without (e.g. "
             "if,if_ens,oof,random). Default: every score computed.")
    helpful_by: tuple[str, ...] | None = setting(
        None, metavar="COLUMNS",
        help="Score columns of the helpful-removal arm (keep random in it: it is the arm's "
             "control). Default: those of --prune-by.")
    relabel_by: tuple[str, ...] | None = setting(
        None, metavar="COLUMNS",
        help="Score columns of the relabel arm (keep random in it: it is the arm's control). "
             "Default: those of --prune-by.")
    trained_model: str | None = setting(
        None, metavar="DIR",
        help="Score with this trained model (a prefprune model folder, a PEFT adapter or a TRL "
             "RewardTrainer/DPOTrainer output) instead of one trained per replicate. DATA is "
             "then the pairs it was trained on, all of them (give --validation and --test); "
             "every retrain, the unpruned one too, follows its recipe: objective, beta, "
             "backbone, LoRA shape, max_length (docs/trl.md).")
    trl: TrlConfig = setting(default_factory=TrlConfig, cli=False,
                             help="What a TRL output given as trained_model cannot say.")

    def validate(self) -> None:
        super().validate()
        if self.trained_model is not None:
            self._check_trained_model()
        elif self.trl != TrlConfig():
            raise ConfigError("trl", "describes a TRL run given as trained_model (--model); "
                                     "give the run, or drop these settings")
        if not self.seeds:
            raise ConfigError("seeds", "must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"lists a seed twice: {list(self.seeds)}")
        if not self.fractions:
            raise ConfigError("fractions", "must list at least one fraction")
        for i, fraction in enumerate(self.fractions):
            PruneConfig.check_value("fraction", fraction, called=f"fractions[{i}]")
        for name in ("prune_by", "helpful_by", "relabel_by"):
            unknown = sorted(set(getattr(self, name) or ()) - set(self.score_columns()))
            if unknown:
                raise ConfigError(name, f"{unknown} would not be computed; the scores are "
                                        f"{', '.join(self.score_columns())}")

    def _check_trained_model(self) -> None:
        """A given model fixes what an experiment would otherwise choose: its training
        pairs (all of DATA, unflipped, in one split) and its recipe (the model section)."""
        if self.validation is None or self.test is None:
            raise ConfigError("trained_model", "needs separate validation and test sources "
                                               "(--validation, --test): DATA is every pair the "
                                               "model was trained on")
        if self.inject_flips > 0 or self.split_per_seed:
            name = "inject_flips" if self.inject_flips > 0 else "split_per_seed"
            raise ConfigError(name, "cannot be used with trained_model: the model was trained "
                                    "on DATA as it is")
        if self.model.identity() != RewardModelConfig().identity():
            raise ConfigError("model", "comes from trained_model (its objective, backbone, LoRA "
                                       "and max_length); set only the cache settings")
        if self.ensemble.enabled and self.ensemble.kind == "checkpoints":
            raise ConfigError("ensemble", "of a trained model's checkpoints is the ones its "
                                          "TRL run saved: give them with --checkpoints")
        if self.trl.checkpoints is not None and self.ensemble.enabled:
            raise ConfigError("ensemble", "is the TRL run's checkpoints (trl.checkpoints); "
                                          "drop one of the two")

    def replicate_split_seed(self, seed: int) -> int:
        """The split seed of replicate ``seed``: its own with ``split_per_seed``, else the
        one split every replicate shares."""
        return self.split_seed + seed if self.split_per_seed else self.split_seed

    @property
    def methods(self) -> tuple[str, ...]:
        """The score columns compared: ``prune_by``, or every score computed."""
        return self.prune_by or self.score_columns()

    def arm_methods(self, direction: str, action: str) -> tuple[str, ...]:
        """The score columns one arm retrains by: a smaller list for the helpful or relabel
        arm keeps an experiment affordable when the removal arm compares many scores."""
        own = {("helpful", "remove"): self.helpful_by,
               ("harmful", "relabel"): self.relabel_by}.get((direction, action))
        return own or self.methods


@dataclass(frozen=True)
class ValidateConfig(RunConfig):
    """Settings of ``prefprune validate`` (docs/method.md, section 6): the linear datamodeling
    score over random subsets, and flip calibration on a copy of the data."""

    influence: InfluenceConfig = setting(
        default_factory=lambda: InfluenceConfig(scores=VALIDATE_SCORES), cli=False,
        help="Scoring settings; influence.scores are the methods validated.")
    subsets: int = setting(20, min=2, help="Random training subsets retrained for the linear "
                                           "datamodeling score (LDS).")
    subset_fraction: float = setting(0.5, above=0.0, max=0.95,
                                     help="Share of the training pairs each subset keeps.")
    lds_targets: int = setting(100, min=1, help="Validation pairs whose loss the LDS predicts "
                                                "(a seeded sample when there are more).")
    flip_share: float = setting(0.2, min=0.0, max=0.9,
                                help="Share of training labels flipped in the calibration copy "
                                     "(0 skips flip calibration).")
    seed: int = setting(0, help="Seeds the model, the subsets and the injected flips.")


#: Methods the demo compares: influence, gradient similarity and the two controls.
DEMO_METHODS = ("if", "grad_cos", "loss", "random")


DEMO_SEEDS = (0, 1, 2)


def demo_config(seeds: tuple[int, ...] = DEMO_SEEDS, model: RewardModelConfig | None = None,
                train: TrainConfig | None = None) -> ExperimentConfig:
    """The demo: the 10% arm for IF, gradient cosine, loss and random over three seeds, on
    the embedded synthetic set scored against its expert-labelled validation pairs (the
    trusted target a user would bring), sized for under ten minutes on two CPU cores.

    LoRA adapts the top layer only, so every retrain reads the frozen layers from the cache;
    one epoch at a high rate with small batches (101 steps on the ~800 train pairs) already
    reaches ~0.9 test accuracy against the true preference.
    """
    return ExperimentConfig(
        validation=str(default_expert_validation_path()),
        fractions=(0.1,), seeds=tuple(seeds), helpful=False, relabel=False,
        model=model or RewardModelConfig(),
        train=train or TrainConfig(epochs=1),
        influence=InfluenceConfig(scores=DEMO_METHODS))
