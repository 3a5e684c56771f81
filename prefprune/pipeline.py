"""The steps a user runs end to end: prepare data, train and evaluate, evaluate a saved model
(scoring every training pair, the next step, is :func:`prefprune.scoring.score_pairs`).

The CLI only parses arguments and prints; everything it does goes through these functions with
the same defaults, so a Python user gets exactly what ``prefprune train`` or ``prefprune demo``
would produce. Every step that writes checks its output first, before any expensive work: an
output that would replace an input, or a file or folder prefprune did not write, is refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from prefprune import distributed
from prefprune.data import (
    DEFAULT_SPLIT_FRACTIONS,
    PLAIN,
    DataOptions,
    IngestionReport,
    Rendering,
    default_dataset_path,
    fingerprint,
    load_preferences,
    rendering_for,
    split_preferences,
)
from prefprune.errors import DataError
from prefprune.files import check_folder
from prefprune.integrations.trl import TrlConfig, load_model
from prefprune.model import METADATA_FILE, RewardModel, RewardModelConfig, Truncation
from prefprune.model.loading import (
    default_backbone,
    load_tokenizer,
    read_json,
    saved_tokenizer_source,
)
from prefprune.training import (
    Capture,
    EvalResult,
    TrainConfig,
    TrainResult,
    evaluate,
    resolve_device,
    train_reward_model,
)

#: Splits a trained model is measured on; train is fitted, not measured.
EVAL_SPLITS = ("validation", "test")


@dataclass
class PreparedData:
    """Loaded and split pairs, with the account of every input row and their fingerprints.

    ``fingerprint`` identifies the train split (what a model was trained on),
    ``source_fingerprint`` every pair the source yielded (what a score table can be applied to).
    """

    splits: datasets.DatasetDict
    report: IngestionReport
    fingerprint: str
    source: str
    source_fingerprint: str = ""
    #: Where each held-out split came from: the source's own split, or a separate file (a
    #: trusted, expert-labelled target) with its own ingestion report.
    origins: dict[str, str] = field(default_factory=dict)
    held_out_reports: dict[str, IngestionReport] = field(default_factory=dict)
    #: How message lists were rendered to text (models record it, to read data the same way).
    rendering: str = PLAIN.name
    #: Source pairs in no split of the run, by why: split fractions summing below one (a
    #: sample), or a source split that a separate validation or test source replaced.
    left_out: dict[str, int] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Pairs per split, for summaries."""
        return {name: len(split) for name, split in self.splits.items()}


def prepare_data(
    source: str | os.PathLike | None = None,
    *,
    options: DataOptions | None = None,
    fractions: tuple[float, float, float] = DEFAULT_SPLIT_FRACTIONS,
    seed: int = 0,
    rendering: Rendering | None = None,
    validation: str | os.PathLike | None = None,
    validation_options: DataOptions | None = None,
    test: str | os.PathLike | None = None,
    test_options: DataOptions | None = None,
    allow_overlap: bool = False,
    **reading: Any,
) -> PreparedData:
    """Load ``source`` (``None``: the embedded synthetic set) and split it train/validation/test.

    ``options`` (or the same fields as keywords, ``format="hh"``) say how to read it, and
    ``rendering`` how message lists become text (:mod:`prefprune.data.messages`; default: the
    plain rendering).

    The source's own splits win when it has them (see :func:`split_preferences`); ``fractions``
    and ``seed`` only shape a prompt-grouped split of data without them. ``validation`` and
    ``test`` replace those splits by whole separate sources (any layout prefprune reads, read
    with their own options): a small trusted, expert-labelled validation set is the influence
    target that finds label errors, rather than one labelled by the same noisy annotators. A
    separate source that shares pairs with the training split is refused unless
    ``allow_overlap``.
    """
    path = default_dataset_path() if source is None else source
    options = (options or DataOptions()).replace(**reading)
    rendering = rendering or PLAIN
    loaded = load_preferences(path, options, rendering=rendering)
    loaded.report.require_pairs()
    splits = split_preferences(loaded.dataset, fractions=fractions, seed=seed)
    left_out = {"outside the split fractions":
                len(loaded.dataset) - sum(len(split) for split in splits.values())}
    origins = {name: f"the {name} split of {path}" for name in ("validation", "test")}
    reports = {}
    for name, held_out, held_options in (("validation", validation, validation_options),
                                         ("test", test, test_options)):
        if held_out is None:
            continue
        separate = load_preferences(held_out, held_options, rendering=rendering)
        separate.report.require_pairs(f"the {name} set")
        _check_overlap(separate.dataset, splits["train"], name, held_out, allow_overlap)
        left_out[f"in the source's {name} split, replaced by {held_out}"] = len(splits[name])
        splits[name] = separate.dataset
        origins[name] = str(held_out)
        reports[name] = separate.report
    return PreparedData(splits, loaded.report, fingerprint(splits["train"]), str(path),
                        fingerprint(loaded.dataset), origins, reports, rendering.name,
                        {why: n for why, n in left_out.items() if n})


def _pair_keys(pairs: datasets.Dataset) -> dict[tuple[str, frozenset[str]], str]:
    """A comparison's identity whatever its label: the prompt and the two responses."""
    return {(p, frozenset((c, r))): pid for pid, p, c, r in
            zip(pairs["id"], pairs["prompt"], pairs["chosen"], pairs["rejected"])}


def _check_overlap(held_out: datasets.Dataset, train: datasets.Dataset, name: str,
                   where: str | os.PathLike, allow: bool) -> None:
    """A held-out set that repeats training pairs would reward memorising them."""
    shared = _pair_keys(held_out).keys() & _pair_keys(train).keys()
    if shared and not allow:
        example = _pair_keys(held_out)[next(iter(sorted(shared, key=str)))]
        raise DataError(f"{where}: {len(shared)} of its {len(held_out)} pairs are also training "
                        f"pairs (e.g. id '{example}'); a {name} set should be disjoint from "
                        "training. Remove them, or pass --allow-overlap to use it anyway")


def rendering_of(model: RewardModelConfig | str | os.PathLike | None = None, *,
                 trust_remote_code: bool = False) -> Rendering:
    """How this model reads message lists: its tokenizer's chat template when it has one,
    else the plain rendering. ``model`` is a config (of a model to train) or a saved model
    folder; only the tokenizer is loaded."""
    if model is None or isinstance(model, RewardModelConfig):
        config = model or RewardModelConfig()
        source = config.backbone or default_backbone()
        trust_remote_code = trust_remote_code or config.trust_remote_code
    else:
        source = saved_tokenizer_source(Path(model))
    return rendering_for(load_tokenizer(source, trust_remote_code))


def data_summary(data: PreparedData) -> dict[str, Any]:
    """What was read and how it was split: the head of every result file and printout."""
    report = data.report
    return {"source": data.source, "format": report.format, "read": report.read,
            "kept": report.kept, "skipped": len(report.skipped),
            "skipped_by_reason": report.by_reason(), "sizes": data.sizes(),
            "left_out": sum(data.left_out.values()), "left_out_by_reason": data.left_out,
            "train_fingerprint": data.fingerprint,
            "source_fingerprint": data.source_fingerprint, "origins": dict(data.origins),
            "rendering": data.rendering,
            "held_out": {name: {k: v for k, v in r.to_dict().items() if k != "skipped"}
                         for name, r in data.held_out_reports.items()}}


def truncation(model: RewardModel, data: PreparedData) -> dict[str, Truncation]:
    """Per non-empty split, how many pairs lose text at the model's ``max_length``."""
    return {name: model.encoder.truncation(split)
            for name, split in data.splits.items() if len(split)}


@dataclass
class TrainOutcome:
    """A trained model with its training record and its scores on the held-out splits."""

    model: RewardModel
    train: TrainResult
    metrics: dict[str, EvalResult]
    data: PreparedData
    seconds: float
    truncation: dict[str, Truncation]
    capture: Capture | None = None


def train_and_evaluate(
    data: PreparedData,
    model_config: RewardModelConfig | None = None,
    train_config: TrainConfig | None = None,
    *,
    output: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    capture: Callable[[RewardModel], Capture] | None = None,
) -> TrainOutcome:
    """Train a fresh reward model (seeded by ``train_config.seed``) on the train split and
    evaluate it on every non-empty held-out split; save it to ``output`` when given.

    ``output`` is checked before training starts: it must be a new or empty folder, or (with
    ``overwrite``) a reward model prefprune saved, and must not hold the data. ``capture``
    builds, from the new model, what takes per-pair gradients while it trains (a checkpoint
    ensemble); it is kept in the outcome. The saved
    metadata records the training settings, the train fingerprint and the metrics, so that a
    model directory says on its own what it was trained on and how well it did.
    """
    train_config = train_config or TrainConfig()
    if output is not None:
        check_folder(output, "model", overwrite=overwrite, inputs=[data.source])
    resolve_device(train_config.device)
    start = time.perf_counter()
    model = RewardModel.create(model_config, seed=train_config.seed)
    cuts = truncation(model, data)
    taken = capture(model) if capture is not None else None
    result = train_reward_model(model, data.splits["train"], train_config, progress=progress,
                                capture=taken)
    metrics = {name: evaluate(model, data.splits[name], progress=progress)
               for name in EVAL_SPLITS if len(data.splits[name])}
    outcome = TrainOutcome(model, result, metrics, data, time.perf_counter() - start, cuts,
                           taken)
    if output is not None:
        if distributed.is_main_process():  # under torchrun every rank holds the same model
            save_outcome(outcome, train_config, Path(output), overwrite=overwrite)
        distributed.barrier()
    return outcome


def save_outcome(outcome: TrainOutcome, train_config: TrainConfig, output: Path, *,
                 overwrite: bool = False) -> Path:
    """Save the model with the metadata that makes a run traceable to its data and settings."""
    return outcome.model.save(
        output,
        overwrite=overwrite,
        train_config=train_config.to_dict(),
        data_fingerprint=outcome.data.fingerprint,
        source=outcome.data.source,
        ingestion={k: v for k, v in outcome.data.report.to_dict().items() if k != "skipped"},
        metrics=metrics_dict(outcome.metrics),
        train=outcome.train.to_dict(),
        truncation={k: v.to_dict() for k, v in outcome.truncation.items()},
        rendering=outcome.data.rendering,
        frozen_layers=frozen_layer_summary(outcome.model),
    )


def frozen_layer_summary(model: RewardModel) -> dict[str, Any] | None:
    """How many sequences went through the frozen layers in this process and how many were
    read from RAM or from the feature store on disk (None without the cache); the features
    computed so far are written to disk first."""
    model.flush()
    return None if model.layer_cache is None else model.layer_cache.summary()


def evaluate_saved(
    model_path: str | os.PathLike,
    data: PreparedData | datasets.Dataset,
    split: str = "test",
    *,
    device: str = "auto",
    progress: bool = True,
    trust_remote_code: bool = False,
    trl: TrlConfig | None = None,
) -> EvalResult:
    """Load a saved reward model and evaluate it on ``split`` of ``data`` (or on a dataset);
    ``trl`` says what a TRL output folder's files cannot (docs/trl.md)."""
    pairs = data if isinstance(data, datasets.Dataset) else split_of(data, split)
    target = resolve_device(device)
    model = load_model(model_path, trust_remote_code=trust_remote_code, trl=trl).to(target)
    return evaluate(model, pairs, progress=progress)


def recorded_seed(model_path: str | os.PathLike) -> int:
    """The training seed a saved prefprune model records, 0 when it records none.

    Evaluating on data without source splits must reuse it: another seed gives another split,
    and the "test" pairs could then include pairs the model was trained on.
    """
    meta_file = Path(model_path) / METADATA_FILE
    if not meta_file.is_file():
        return 0
    meta = read_json(meta_file, "prefprune model description")
    return int(meta.get("metadata", {}).get("train_config", {}).get("seed", 0))


def split_of(data: PreparedData, split: str) -> datasets.Dataset:
    """One split by name, with an error that lists the names there are."""
    if split not in data.splits:
        raise DataError(f"unknown split '{split}'; expected one of {', '.join(data.splits)}")
    return data.splits[split]


def metrics_dict(metrics: Mapping[str, EvalResult]) -> dict[str, Any]:
    """JSON form of per-split metrics (without the per-pair margins)."""
    return {name: result.to_dict() for name, result in metrics.items()}
