"""The ``prefprune`` command line: parse options, call :mod:`prefprune.pipeline`, print results.

Options shared by several commands live in :class:`OptionGroup` objects (data, model,
training); a command lists the groups it needs in :func:`with_options` and receives each group
already built (``DataOptions``, ``RewardModelConfig``, ``TrainConfig``), so a new command gets
the same flags, help and validation without copying them. Every user mistake ends as one red
``error:`` line on stderr: exit code 2 for usage, 1 for data or model problems.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import datasets
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from typer.core import TyperGroup

from prefprune import distributed
from prefprune.data import IngestionReport, load_preferences
from prefprune.data.formats import MAPPABLE
from prefprune.data.loader import FORMATS
from prefprune.errors import InfluenceError, PrefpruneError, SelectionError
from prefprune.experiment import (
    Experiment,
    ExperimentConfig,
    ExperimentResult,
    demo_config,
    headline,
)
from prefprune.influence.scores import ALL_SCORES, InfluenceConfig
from prefprune.pipeline import (
    DEFAULT_LAYER_CACHE_MB,
    PreparedData,
    TrainOutcome,
    evaluate_saved,
    metrics_dict,
    prepare_data,
    recorded_seed,
    score_pairs,
    train_and_evaluate,
)
from prefprune.pruning import prune_source, read_scores
from prefprune.report import format_interval, write_report
from prefprune.reward_model import RewardModelConfig
from prefprune.training import EvalResult, TrainConfig, TrainResult, resolve_device

#: Exceptions that mean "the input or a setting is wrong", not "prefprune has a bug".
USER_ERRORS = (PrefpruneError, OSError)

stdout = Console()
stderr = Console(stderr=True)


def fail(message: str, code: int) -> NoReturn:
    """Print one red ``error:`` line (never wrapped) and exit with ``code``."""
    stderr.print(f"[red]error: {escape(message)}[/red]", soft_wrap=True, highlight=False)
    sys.exit(code)


class App(TyperGroup):
    """The root command group; turns usage and user errors into one ``error:`` line.

    Typer would draw a panel for a usage error and a traceback for a ``DataError``; a user
    who passed a wrong path needs neither.
    """

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except typer.TyperException as exc:  # usage errors: bad flag, bad value, missing argument
            _usage_error(exc)
        except typer.Abort:
            fail("aborted", 1)
        except USER_ERRORS as exc:
            fail(str(exc), 1)
        sys.exit(code if isinstance(code, int) else 0)


def _usage_error(exc: typer.TyperException) -> NoReturn:
    """Click's message plus where to read the help, on one line. An empty message means the
    help was already printed (a command group called without arguments): nothing to add."""
    message = exc.format_message().replace("\n", " ").strip()
    if not message:
        sys.exit(exc.exit_code)
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    fail(message + hint, exc.exit_code)


app = typer.Typer(cls=App, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  help="Find, prune or relabel the preference pairs that hurt a reward model.")
data_app = typer.Typer(no_args_is_help=True, help="Look at preference data before training.")
app.add_typer(data_app, name="data")


# --- reusable option groups ------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class OptionGroup:
    """Options several commands share; the command receives ``build(**values)`` as ``name``."""

    name: str
    build: Callable[..., Any]
    options: tuple[inspect.Parameter, ...]


def option(name: str, kind: Any, default: Any, help: str, *, panel: str,
           **info: Any) -> inspect.Parameter:
    """A keyword-only command parameter carrying its typer option: ``--name-with-dashes``,
    and for a bool a plain on-switch (no ``--no-...`` twin)."""
    decls = (f"--{name.replace('_', '-')}",) if kind is bool else ()
    spec = typer.Option(*decls, help=help, rich_help_panel=panel, **info)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[kind, spec])


def with_options(*groups: OptionGroup) -> Callable[[F], F]:
    """Add the groups' options to a command and hand it each group as one built object."""

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name not in {g.name for g in groups}]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            for group in groups:
                values = {p.name: kwargs.pop(p.name) for p in group.options}
                kwargs[group.name] = group.build(**values)
            return func(**kwargs)

        extra = [p for group in groups for p in group.options]
        command.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return command  # type: ignore[return-value]

    return decorate


def parse_columns(values: Iterable[str] | None) -> dict[str, str]:
    """``["prompt=question", ...]`` -> ``{"prompt": "question"}``; bad syntax is a usage error."""
    mapping: dict[str, str] = {}
    for value in values or ():
        canonical, sep, column = (part.strip() for part in value.partition("="))
        if not sep or not canonical or not column:
            raise typer.BadParameter(f"expected CANONICAL=COLUMN (e.g. prompt=question), "
                                     f"got '{value}'", param_hint="--column")
        if canonical not in MAPPABLE:
            raise typer.BadParameter(f"'{canonical}' is not a canonical column; mappable ones "
                                     f"are {', '.join(MAPPABLE)}", param_hint="--column")
        if canonical in mapping:
            raise typer.BadParameter(f"'{canonical}' is mapped twice", param_hint="--column")
        mapping[canonical] = column
    return mapping


def parse_list(value: str | None) -> tuple[str, ...] | None:
    """A comma-separated list (``q_proj,v_proj``); empty means "not given"."""
    items = tuple(item.strip() for item in (value or "").split(",") if item.strip())
    return items or None


@dataclass(frozen=True)
class DataOptions:
    """How to read a source; the fields are the keyword arguments of ``prepare_data`` and
    ``load_preferences``."""

    format: str = "auto"
    columns: Mapping[str, str] | None = None
    strict: bool = False
    hub_config: str | None = None
    hub_split: str | None = None
    data_dir: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def build_data_options(*, format: str, column: list[str] | None, strict: bool,
                       hub_config: str | None, hub_split: str | None,
                       data_dir: str | None) -> DataOptions:
    if format not in FORMATS:
        raise typer.BadParameter(f"'{format}' is not one of {', '.join(FORMATS)}",
                                 param_hint="--format")
    return DataOptions(format, parse_columns(column), strict, hub_config, hub_split, data_dir)


def build_model_config(*, backbone: str | None, max_length: int, lora_r: int, lora_alpha: int,
                       lora_dropout: float, target_modules: str | None, lora_layers: int | None,
                       trust_remote_code: bool) -> RewardModelConfig:
    return RewardModelConfig(backbone=backbone, max_length=max_length, lora_r=lora_r,
                             lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             target_modules=parse_list(target_modules), lora_layers=lora_layers,
                             trust_remote_code=trust_remote_code)


def build_train_config(*, epochs: int, batch_size: int, learning_rate: float,
                       warmup_ratio: float, grad_accum: int, seed: int,
                       device: str) -> TrainConfig:
    check_device(device)
    return TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                       warmup_ratio=warmup_ratio, grad_accum_steps=grad_accum, seed=seed,
                       device=device)


def check_device(device: str) -> str:
    """A torch device name (``auto``, ``cpu``, ``cuda``, ``cuda:1``), else a usage error."""
    try:
        resolve_device(device)
    except RuntimeError as exc:
        raise typer.BadParameter(f"'{device}' is not a device; use auto, cpu, cuda or cuda:N",
                                 param_hint="--device") from exc
    return device


_data = partial(option, panel="Data options")
_model = partial(option, panel="Model options")
_train = partial(option, panel="Training options")
_MODEL_DEFAULTS = RewardModelConfig()
_TRAIN_DEFAULTS = TrainConfig()

DATA_OPTIONS = OptionGroup("data_options", build_data_options, (
    _data("format", str, "auto", f"Input layout: {', '.join(FORMATS)}."),
    _data("column", list[str] | None, None,
          "Map a canonical column (id, prompt, chosen, rejected) to yours as "
          "CANONICAL=COLUMN, e.g. --column prompt=question. Repeatable.",
          metavar="CANONICAL=COLUMN"),
    _data("strict", bool, False, "Stop at the first bad row instead of skipping and reporting it."),
    _data("hub_config", str | None, None, "Configuration of a hub dataset (e.g. comparisons)."),
    _data("hub_split", str | None, None, "Only this split of a hub or saved dataset."),
    _data("data_dir", str | None, None, "data_dir argument of a hub dataset."),
))
MODEL_OPTIONS = OptionGroup("model_config", build_model_config, (
    _model("backbone", str | None, None,
           "Backbone: a local directory or a hub model name. Default: the offline "
           "all-MiniLM-L6-v2."),
    _model("max_length", int, _MODEL_DEFAULTS.max_length,
           "Tokens per prompt+response; the prompt is cut from the left first.", min=8),
    _model("lora_r", int, _MODEL_DEFAULTS.lora_r, "LoRA rank.", min=1),
    _model("lora_alpha", int, _MODEL_DEFAULTS.lora_alpha, "LoRA scaling alpha.", min=1),
    _model("lora_dropout", float, _MODEL_DEFAULTS.lora_dropout, "LoRA dropout probability.",
           min=0.0, max=0.99),
    _model("target_modules", str | None, None,
           "Comma-separated module names LoRA adapts (e.g. q_proj,v_proj). Default: detected "
           "from the architecture."),
    _model("lora_layers", int | None, None,
           "Adapt only the top N transformer layers. The frozen layers below are then computed "
           "once per sequence and cached (see --layer-cache-mb). Default: all layers.", min=1),
    _model("trust_remote_code", bool, False,
           "Allow custom model code from the backbone's repository to run."),
))
TRAIN_OPTIONS = OptionGroup("train_config", build_train_config, (
    _train("epochs", int, _TRAIN_DEFAULTS.epochs, "Passes over the training pairs.", min=1),
    _train("batch_size", int, _TRAIN_DEFAULTS.batch_size, "Pairs per forward pass.", min=1),
    _train("learning_rate", float, _TRAIN_DEFAULTS.learning_rate, "Peak AdamW learning rate.",
           min=0.0),
    _train("warmup_ratio", float, _TRAIN_DEFAULTS.warmup_ratio,
           "Share of the optimiser steps spent warming the learning rate up.", min=0.0, max=1.0),
    _train("grad_accum", int, _TRAIN_DEFAULTS.grad_accum_steps,
           "Batches whose gradients are summed per optimiser step.", min=1),
    _train("seed", int, _TRAIN_DEFAULTS.seed,
           "Seeds the model initialisation, the data order and the split of data without "
           "source splits."),
    _train("device", str, _TRAIN_DEFAULTS.device, "auto (CUDA when present), cpu, cuda or cuda:N."),
))

CACHE_OPTIONS = OptionGroup("layer_cache_mb", lambda *, layer_cache_mb: layer_cache_mb, (
    _model("layer_cache_mb", float, DEFAULT_LAYER_CACHE_MB,
           "RAM for the frozen layers' cached activations when --lora-layers is set; past it, "
           "sequences are computed through the whole model. 0 turns the cache off.", min=0.0),
))

_influence = partial(option, panel="Influence options")
_INFLUENCE_DEFAULTS = InfluenceConfig()


def build_influence_config(*, scores: str, curvature: str, solver: str, damping: float,
                           absolute_damping: bool, tol: float, max_iter: int,
                           curvature_samples: int | None, memory_budget_mb: float,
                           negative_curvature: str, score_batch_size: int, shard_size: int,
                           projection_dim: int | None) -> InfluenceConfig:
    try:
        return InfluenceConfig(
            scores=parse_list(scores) or (), curvature=curvature, solver=solver,
            damping=damping, damping_relative=not absolute_damping, tol=tol, max_iter=max_iter,
            curvature_samples=curvature_samples, memory_budget_mb=memory_budget_mb,
            negative_curvature=negative_curvature, batch_size=score_batch_size,
            shard_size=shard_size, projection_dim=projection_dim)
    except InfluenceError as exc:
        raise typer.BadParameter(str(exc)) from exc


INFLUENCE_OPTIONS = OptionGroup("influence_config", build_influence_config, (
    _influence("scores", str, ",".join(_INFLUENCE_DEFAULTS.scores),
               f"Comma-separated scores to compute: {', '.join(ALL_SCORES)}."),
    _influence("curvature", str, _INFLUENCE_DEFAULTS.curvature,
               "gauss_newton (PSD, cheap with the gradient cache) or hessian (exact, by "
               "double backward)."),
    _influence("solver", str, _INFLUENCE_DEFAULTS.solver,
               "cg (conjugate gradient), lissa, or direct (exact: the Gauss–Newton system in "
               "the dual, or a dense Hessian for small models)."),
    _influence("damping", float, _INFLUENCE_DEFAULTS.damping,
               "Damping λ added to the curvature; relative to the mean Gauss–Newton "
               "eigenvalue unless --absolute-damping.", min=0.0),
    _influence("absolute_damping", bool, False, "Read --damping as an absolute λ."),
    _influence("tol", float, _INFLUENCE_DEFAULTS.tol, "Relative residual at which CG/LiSSA stop.",
               min=0.0),
    _influence("max_iter", int, _INFLUENCE_DEFAULTS.max_iter, "CG iteration cap.", min=1),
    _influence("curvature_samples", int | None, None,
               "Define the curvature on a seeded subsample of this many training pairs.", min=1),
    _influence("memory_budget_mb", float, _INFLUENCE_DEFAULTS.memory_budget_mb,
               "RAM allowed for cached per-pair gradients; past it the engine streams.", min=0.0),
    _influence("negative_curvature", str, _INFLUENCE_DEFAULTS.negative_curvature,
               "When CG meets negative curvature of the exact Hessian: gauss_newton (re-solve "
               "with Gauss–Newton), raise, or stop."),
    _influence("score_batch_size", int, _INFLUENCE_DEFAULTS.batch_size,
               "Pairs per gradient batch while scoring.", min=1),
    _influence("shard_size", int, _INFLUENCE_DEFAULTS.shard_size,
               "Pairs per saved shard: the unit of resuming and of the split between "
               "torchrun processes.", min=1),
    _influence("projection_dim", int | None, None,
               "Project every per-pair gradient to this many dimensions (seeded random "
               "projection): a small stored gradient index, approximate scores "
               "(docs/scaling.md).", min=1),
))

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead "
                                                       "of tables.")]
QuietFlag = Annotated[bool, typer.Option("--quiet", help="Hide progress bars.")]
DataArg = Annotated[str | None, typer.Argument(
    help="Preference data: a file (.jsonl, .jsonl.gz, .json, .csv, .parquet), a saved dataset "
         "directory or a hub dataset name. Omitted: the embedded synthetic set.")]


# --- printing ----------------------------------------------------------------------------------

def print_json(data: Any) -> None:
    """JSON on stdout, unstyled, so other tools can parse it."""
    typer.echo(json.dumps(data, indent=2, default=str))


def ingestion_line(report: IngestionReport) -> str:
    return f"read {report.read} = kept {report.kept} + skipped {len(report.skipped)}"


def print_report(report: IngestionReport, max_issues: int = 10) -> None:
    """The account of every input row: totals, reasons and the first skipped rows."""
    stdout.print(f"[bold]{escape(report.source)}[/bold] (format {report.format}, "
                 f"container {report.container})")
    stdout.print(ingestion_line(report))
    if not report.skipped:
        return
    reasons = Table("reason", "rows", title="skipped rows by reason")
    for reason, count in report.by_reason().items():
        reasons.add_row(reason, str(count))
    stdout.print(reasons)
    issues = Table(Column("where", overflow="fold"), "reason", "field", "detail",
                   title=f"first {min(max_issues, len(report.skipped))} of "
                         f"{len(report.skipped)} skipped rows")
    for row in report.skipped[:max_issues]:
        issues.add_row(escape(row.location), row.reason, row.field or "", escape(row.detail))
    stdout.print(issues)


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return escape(text if len(text) <= limit else text[: limit - 1] + "…")


def print_examples(ds: datasets.Dataset, n: int) -> None:
    table = Table("id", "prompt", "chosen", "rejected", title=f"first {min(n, len(ds))} pairs",
                  show_lines=True)
    for row in ds.select(range(min(n, len(ds)))):
        table.add_row(_short(row["id"], 24), _short(row["prompt"]), _short(row["chosen"]),
                      _short(row["rejected"]))
    stdout.print(table)


def metrics_table(metrics: Mapping[str, EvalResult]) -> Table:
    table = Table("split", "pairs", "accuracy", "loss", "margin mean", "margin std",
                  "margin median", title="evaluation")
    for name, m in metrics.items():
        table.add_row(name, str(m.pairs), f"{m.accuracy:.4f}", f"{m.loss:.4f}",
                      f"{m.margin_mean:.4f}", f"{m.margin_std:.4f}", f"{m.margin_median:.4f}")
    return table


def training_table(result: TrainResult) -> Table:
    table = Table("epoch", "loss", "seconds", title=f"training: {result.pairs} pairs, "
                  f"{result.steps} steps, {result.tokens_per_second:,.0f} tokens/s")
    for epoch, (loss, seconds) in enumerate(zip(result.epoch_losses, result.epoch_seconds), 1):
        table.add_row(str(epoch), f"{loss:.4f}", f"{seconds:.1f}")
    return table


def pairs_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    table = Table("", "", title=title, show_header=False)
    for label, value in rows:
        table.add_row(label, escape(value))
    return table


def data_summary(data: PreparedData) -> dict[str, Any]:
    return {"source": data.source, "sizes": data.sizes(), "fingerprint": data.fingerprint,
            "read": data.report.read, "kept": data.report.kept,
            "skipped": len(data.report.skipped)}


def outcome_dict(outcome: TrainOutcome) -> dict[str, Any]:
    return {"data": data_summary(outcome.data), "train": outcome.train.to_dict(),
            "metrics": metrics_dict(outcome.metrics), "seconds": outcome.seconds}


def print_outcome(outcome: TrainOutcome) -> None:
    data = outcome.data
    sizes = " / ".join(f"{name} {n}" for name, n in data.sizes().items())
    stdout.print(f"{ingestion_line(data.report)}; {sizes}; train fingerprint {data.fingerprint}")
    stdout.print(training_table(outcome.train))
    stdout.print(metrics_table(outcome.metrics))


def solves_table(meta: Mapping[str, Any]) -> Table:
    table = Table("target", "curvature", "solver", "iterations", "final residual", "converged",
                  title=f"inverse-HVP solves (damping {meta.get('damping', float('nan')):.3g})")
    for target, solve in meta.get("solves", {}).items():
        residual = solve["final_residual"]
        table.add_row(escape(target), solve["curvature"], solve["method"],
                      str(solve["iterations"]), "" if residual is None else f"{residual:.2e}",
                      "yes" if solve["converged"] else f"no: {escape(solve['message'])}")
    return table


def detection_table(detection: Mapping[str, Mapping[str, float]]) -> Table:
    """Per score: how well it ranks the known flipped labels first (0.5 AUROC = chance)."""
    metrics = list(next(iter(detection.values())))
    table = Table("score", *metrics, title="finding flipped labels in the training pairs")
    for name, values in detection.items():
        table.add_row(name, *[f"{values[m]:.3f}" for m in metrics])
    return table


def top_table(table: Any, top: int) -> Table:
    """The ``top`` most harmful pairs by the first score, with every score's rank beside it
    (for several targets, the ranks against the whole validation split)."""
    ranked = [c for c in table.columns
              if c.startswith("rank_") and ("@" not in c or c.endswith("@validation"))]
    first = ranked[0] if ranked else None
    out = Table("id", *[c.removeprefix("rank_") for c in ranked],
                title=f"most harmful pairs by {first.removeprefix('rank_') if first else '-'} "
                      "(ranks; 1 = most harmful)")
    if first is not None:
        for _, row in table.nsmallest(top, first).iterrows():
            out.add_row(escape(str(row["id"])), *[str(row[c]) for c in ranked])
    return out


# --- commands ----------------------------------------------------------------------------------

@data_app.command("inspect")
@with_options(DATA_OPTIONS)
def inspect_command(
    path: Annotated[str, typer.Argument(help="File, saved dataset directory or hub name.")],
    data_options: DataOptions,
    examples: Annotated[int, typer.Option(help="How many kept pairs to show.", min=0)] = 3,
    json_output: JsonFlag = False,
) -> None:
    """Load a source and show what was kept, what was skipped and why, and a few pairs."""
    loaded = load_preferences(path, **data_options.kwargs())
    if json_output:
        print_json({"report": loaded.report.to_dict(),
                    "examples": loaded.dataset.select(range(min(examples, len(loaded.dataset))))
                    .to_list()})
        return
    print_report(loaded.report)
    if examples:
        print_examples(loaded.dataset, examples)


@app.command("train")
@with_options(DATA_OPTIONS, MODEL_OPTIONS, CACHE_OPTIONS, TRAIN_OPTIONS)
def train_command(
    output: Annotated[Path, typer.Option(help="Directory to save the trained reward model to.")],
    data_options: DataOptions,
    model_config: RewardModelConfig,
    layer_cache_mb: float,
    train_config: TrainConfig,
    data: DataArg = None,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Train a LoRA reward model on DATA's train split and evaluate it on the held-out splits."""
    prepared = prepare_data(data, seed=train_config.seed, **data_options.kwargs())
    outcome = train_and_evaluate(prepared, model_config, train_config, output=output,
                                 progress=not quiet, layer_cache_mb=layer_cache_mb)
    if not distributed.is_main_process():
        return
    if json_output:
        print_json({**outcome_dict(outcome), "output": str(output)})
        return
    print_outcome(outcome)
    stdout.print(f"saved to {escape(str(output))}")


@app.command("evaluate")
@with_options(DATA_OPTIONS)
def evaluate_command(
    model: Annotated[Path, typer.Argument(help="A saved reward model directory (prefprune, a "
                                               "PEFT adapter or a full checkpoint).")],
    data_options: DataOptions,
    data: DataArg = None,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    seed: Annotated[int | None, typer.Option(
        help="Split seed for data without source splits. Default: the model's training seed, "
             "so that its test pairs stay unseen.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Evaluate a saved reward model on a split of DATA: accuracy, loss, margin statistics."""
    split_seed = recorded_seed(model) if seed is None else seed
    prepared = prepare_data(data, seed=split_seed, **data_options.kwargs())
    result = evaluate_saved(model, prepared, split, device=check_device(device),
                            progress=not quiet)
    if not distributed.is_main_process():
        return
    if json_output:
        print_json({"data": data_summary(prepared), "split": split,
                    "metrics": metrics_dict({split: result})})
        return
    stdout.print(metrics_table({split: result}))


@app.command("score")
@with_options(DATA_OPTIONS, MODEL_OPTIONS, CACHE_OPTIONS, TRAIN_OPTIONS, INFLUENCE_OPTIONS)
def score_command(
    output: Annotated[Path, typer.Option(help="Parquet file for the scores; a JSON sidecar "
                                              "with the run's metadata is written beside it.")],
    data_options: DataOptions,
    model_config: RewardModelConfig,
    layer_cache_mb: float,
    train_config: TrainConfig,
    influence_config: InfluenceConfig,
    data: DataArg = None,
    model: Annotated[Path | None, typer.Option(
        help="A trained reward model directory. Omitted: train one first with the model and "
             "training options.")] = None,
    target_column: Annotated[str | None, typer.Option(
        help="Also score against each value of this validation column (e.g. subreddit).")] = None,
    work_dir: Annotated[Path | None, typer.Option(
        help="Where finished shards are kept for resuming. Default: <output>.work.")] = None,
    top: Annotated[int, typer.Option(help="How many most harmful pairs to print.", min=0)] = 5,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Score every training pair: how removing (or flipping) it would change validation loss."""
    seed = recorded_seed(model) if model is not None else train_config.seed
    prepared = prepare_data(data, seed=seed, **data_options.kwargs())
    outcome = score_pairs(prepared, model, influence_config, model_config=model_config,
                          train_config=train_config, target_column=target_column,
                          output=output, work_dir=work_dir, progress=not quiet,
                          layer_cache_mb=layer_cache_mb)
    if not distributed.is_main_process():
        return
    meta = outcome.result.metadata
    if json_output:
        print_json({"output": str(output), "metadata": meta})
        return
    if outcome.trained is not None:
        print_outcome(outcome.trained)
    stdout.print(solves_table(meta))
    stdout.print(top_table(outcome.result.table, top))
    stdout.print(f"{meta['n_train']} pairs scored over {meta['n_parameters']:,} parameters in "
                 f"{sum(meta['timings_seconds'].values()):.1f} s; saved "
                 f"{escape(str(output))} and its .json sidecar")


@app.command("prune")
@with_options(DATA_OPTIONS)
def prune_command(
    scores: Annotated[Path, typer.Argument(help="Score table written by 'prefprune score'.")],
    data: Annotated[str, typer.Argument(help="The preference data the scores were computed on "
                                             "(file, saved dataset directory or hub name).")],
    output: Annotated[Path, typer.Option(help="Directory for the pruned data (same name and "
                                              "format as DATA), removed.jsonl and prune.json.")],
    data_options: DataOptions,
    by: Annotated[str, typer.Option(help="Score column to rank by (e.g. if, grad_cos, loss, "
                                         "flip, or if@subreddit=tifu).")] = "if",
    fraction: Annotated[float, typer.Option(help="Share of the scored pairs to act on.",
                                            min=0.0, max=1.0)] = 0.1,
    direction: Annotated[str, typer.Option(help="harmful (largest harm first) or helpful "
                                                "(smallest first).")] = "harmful",
    relabel: Annotated[bool, typer.Option("--relabel", help="Flip the selected pairs' labels "
                                                            "instead of removing them.")] = False,
    top: Annotated[int, typer.Option(help="How many affected pairs to print.", min=0)] = 5,
    json_output: JsonFlag = False,
) -> None:
    """Remove (or relabel) the top pairs by a score; write DATA back in its own format."""
    try:
        result = prune_source(scores, data, output, by=by, fraction=fraction,
                              direction=direction, relabel=relabel,
                              data_options=data_options.kwargs())
    except SelectionError as exc:
        raise typer.BadParameter(str(exc)) from exc
    summary = json.loads(result.summary_file.read_text())
    if json_output:
        print_json({**summary, "removed_file": str(result.removed_file)})
        return
    verb = "relabelled" if relabel else "removed"
    stdout.print(f"{verb} {len(result.selection.ids)} of {summary['scored_pairs']} scored pairs "
                 f"({fraction:.0%} most {direction} by {escape(by)}); rows {result.rewrite.rows_in}"
                 f" -> {result.rewrite.rows_out}")
    stdout.print(f"wrote {escape(str(result.rewrite.output))}, "
                 f"{escape(str(result.removed_file))} and {escape(str(result.summary_file))}")
    affected = Table("rank", "id", by, title=f"first {min(top, len(result.selection.ids))} "
                                            f"{verb} pairs")
    table = read_scores(scores).set_index("id")
    for rank, pid in enumerate(result.selection.ids[:top], start=1):
        affected.add_row(str(rank), escape(pid), f"{table.loc[pid, by]:.4g}")
    stdout.print(affected)


def _typed(ctx: typer.Context, flag: str) -> bool:
    """Whether the user typed ``flag`` (not just left it at its default)."""
    source = ctx.get_parameter_source(flag)
    return source is not None and source.name == "COMMANDLINE"


def _experiment_overrides(ctx: typer.Context,
                          built: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Settings the user typed on the command line, by config section (``""``: top level).

    With --config, only these replace the file's values; flags left at their defaults do not.
    """
    out: dict[str, dict[str, Any]] = {}
    for flag, (section, name, read) in _EXPERIMENT_FLAGS.items():
        if _typed(ctx, flag):
            out.setdefault(section, {})[name] = read(built)
    return out


def _field(group: str, name: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda built: getattr(built[group], name)


def _value(name: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda built: built[name]


_EXPERIMENT_FLAGS: dict[str, tuple[str, str, Callable[[Mapping[str, Any]], Any]]] = {
    **{p.name: ("model", p.name, _field("model_config", p.name))
       for p in MODEL_OPTIONS.options},
    **{p.name: ("train", p.name, _field("train_config", p.name))
       for p in TRAIN_OPTIONS.options if p.name not in {"seed", "grad_accum"}},
    "grad_accum": ("train", "grad_accum_steps", _field("train_config", "grad_accum_steps")),
    **{p.name: ("influence", p.name, _field("influence_config", p.name))
       for p in INFLUENCE_OPTIONS.options
       if p.name not in {"scores", "absolute_damping", "score_batch_size"}},
    "absolute_damping": ("influence", "damping_relative",
                         _field("influence_config", "damping_relative")),
    "score_batch_size": ("influence", "batch_size", _field("influence_config", "batch_size")),
    "scores": ("", "methods", _field("influence_config", "scores")),
    "seed": ("", "seeds", lambda built: (built["train_config"].seed,)),
    "layer_cache_mb": ("", "layer_cache_mb", _value("layer_cache_mb")),
    **{name: ("", name, _value(name)) for name in
       ("fractions", "seeds", "helpful", "relabel", "inject_flips", "split_seed")},
}


def build_experiment_config(ctx: typer.Context, data: str | None, config: Path | None,
                            data_options: DataOptions,
                            built: Mapping[str, Any]) -> ExperimentConfig:
    """The YAML file (when given) with the typed flags on top; flags alone otherwise."""
    base = ExperimentConfig.from_yaml(config) if config is not None else ExperimentConfig()
    overrides = _experiment_overrides(ctx, built)
    values = base.to_dict()
    for section, settings in overrides.items():
        target = values if section == "" else values[section]
        target.update({k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()})
    if data is not None:
        values["data"] = data
    typed = {k: v for k, v in data_options.kwargs().items()
             if _typed(ctx, "column" if k == "columns" else k)}
    values["data_options"] = {**values["data_options"], **typed}
    return ExperimentConfig.from_dict(values)


def parse_numbers(value: str | None, kind: type, flag: str) -> tuple | None:
    """``"0.05,0.1"`` -> ``(0.05, 0.1)``; bad syntax is a usage error."""
    try:
        return tuple(kind(item) for item in parse_list(value) or ()) or None
    except ValueError as exc:
        raise typer.BadParameter(f"expected comma-separated numbers, got '{value}'",
                                 param_hint=flag) from exc


@app.command("experiment")
@with_options(DATA_OPTIONS, MODEL_OPTIONS, CACHE_OPTIONS, TRAIN_OPTIONS, INFLUENCE_OPTIONS)
def experiment_command(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option(help="Directory for config.yaml, models, scores, runs, "
                                              "results.json and the report; rerun to resume.")],
    data_options: DataOptions,
    model_config: RewardModelConfig,
    layer_cache_mb: float,
    train_config: TrainConfig,
    influence_config: InfluenceConfig,
    data: DataArg = None,
    config: Annotated[Path | None, typer.Option(
        help="YAML settings (e.g. a saved config.yaml); flags typed here override them.",
        exists=True, dir_okay=False)] = None,
    fractions: Annotated[str | None, typer.Option(
        help="Comma-separated shares to remove per method. Default 0.05,0.1,0.2.")] = None,
    seeds: Annotated[str | None, typer.Option(
        help="Comma-separated replicate seeds. Default 0,1,2.")] = None,
    helpful: Annotated[bool, typer.Option(help="Also remove the most helpful pairs.")] = True,
    relabel: Annotated[bool, typer.Option(help="Also flip the top harmful pairs' labels instead "
                                               "of removing them.")] = True,
    inject_flips: Annotated[float, typer.Option(
        help="Swap this seeded share of the training labels first (ground truth kept) and "
             "measure how well each score finds them.", min=0.0, max=0.99)] = 0.0,
    split_seed: Annotated[int, typer.Option(help="Seed of the train/validation/test split of "
                                                 "data without source splits.")] = 0,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Train, score, prune the top-f pairs per method, retrain and compare (SPEC §4), over
    several seeds; write results.json, report.md and report.html."""
    built = {"model_config": model_config, "train_config": train_config,
             "influence_config": influence_config, "layer_cache_mb": layer_cache_mb,
             "fractions": parse_numbers(fractions, float, "--fractions"),
             "seeds": parse_numbers(seeds, int, "--seeds"), "helpful": helpful,
             "relabel": relabel, "inject_flips": inject_flips, "split_seed": split_seed}
    settings = build_experiment_config(ctx, data, config, data_options, built)
    result = Experiment(settings, output, progress=not quiet,
                        on_run=None if quiet or json_output else _print_run).run()
    paths = write_report(result, output)
    if json_output:
        print_json({"results": str(output / "results.json"),
                    **{k: str(v) for k, v in paths.items()}, "summary": result.summary})
        return
    print_headline(result)
    stdout.print(f"wrote {escape(str(output / 'results.json'))}, "
                 f"{escape(str(paths['markdown']))} and {escape(str(paths['html']))}")


def _print_run(record: Mapping[str, Any]) -> None:
    stdout.print(f"  {record['key']}: test accuracy {record['test_accuracy']:.4f} "
                 f"({record['train_pairs']} pairs, {record['seconds']:.0f} s)")


def print_headline(result: ExperimentResult) -> None:
    """Test accuracy per method at the first fraction, and flip detection when known."""
    rows = headline(result)
    fraction = result.config.fractions[0]
    table = Table("method", f"test accuracy ({fraction:.0%} removed)", "Δ vs no pruning",
                  "Δ vs random", "flip AUROC", "flips in top 10%",
                  title=f"prefprune: {len(result.config.seeds)} seed(s), "
                        f"{result.seconds / 60:.1f} min")
    for row in rows:
        detection = row.get("detection") or {}
        found = next((v for k, v in detection.items() if k.startswith("found_in_top")), None)
        table.add_row(row["method"], format_interval(row["test_accuracy"]),
                      format_interval(row.get("vs_baseline"), signed=True),
                      format_interval(row.get("vs_random"), signed=True),
                      format_interval(detection.get("auroc")), format_interval(found))
    stdout.print(table)


@app.command("demo")
def demo_command(
    output: Annotated[Path | None, typer.Option(
        help="Keep the experiment (models, scores, results.json, report) here.")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the training and the random control.")] = 0,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """A small pruning experiment on the embedded synthetic set: train, score, remove the top
    10% by IF, gradient cosine, loss and random, retrain, and print the headline table."""
    with tempfile.TemporaryDirectory(prefix="prefprune-demo-") as scratch:
        where = output or Path(scratch)
        result = Experiment(demo_config(seed), where, progress=not quiet).run()
        paths = write_report(result, where) if output is not None else {}
    if json_output:
        print_json({"summary": result.summary, "data": result.data,
                    "seconds": result.seconds, **{k: str(v) for k, v in paths.items()}})
        return
    stdout.print(f"{escape(result.data['source'])}: read {result.data['read']} = kept "
                 f"{result.data['kept']} + skipped {result.data['skipped']}; "
                 + " / ".join(f"{k} {v}" for k, v in result.data["sizes"].items()))
    print_headline(result)
    if paths:
        stdout.print(f"wrote {escape(str(paths['markdown']))} and {escape(str(paths['html']))}")


def main() -> None:
    """Console-script entry point."""
    app()
