"""The ``prefprune`` commands: parse options, call the library, print the result.

Options come from the config dataclasses (:mod:`prefprune.cli.options`), so a flag is its
field's name with the field's help and limits. Every user mistake ends as one red ``error:``
line on stderr: exit code 2 for usage, 1 for data, model or file problems; prefprune's
warnings print as one yellow ``warning:`` line.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from prefprune import distributed
from prefprune.cli import render
from prefprune.cli.options import OptionGroup, apply, with_options
from prefprune.cli.render import fail, print_json, stdout
from prefprune.data import DataOptions, load_preferences, locate_source, rendering_for
from prefprune.ensemble import EnsembleConfig
from prefprune.errors import ConfigError, PrefpruneError, PrefpruneWarning, SelectionError
from prefprune.experiment import ExperimentConfig
from prefprune.influence import InfluenceConfig
from prefprune.integrations.trl import TrlConfig, trl_reading
from prefprune.integrations.trl_checkpoints import final_model
from prefprune.model import PairEncoder, RewardModelConfig
from prefprune.model.loading import default_backbone, load_tokenizer
from prefprune.pipeline import (
    data_summary,
    evaluate_saved,
    metrics_dict,
    prepare_data,
    recorded_seed,
    rendering_of,
    train_and_evaluate,
)
from prefprune.pruning import PruneConfig, prune_source
from prefprune.scoring import score_pairs
from prefprune.training import TrainConfig, resolve_device

#: Exceptions that mean "the input, a setting or a file is wrong", not "prefprune has a bug".
USER_ERRORS = (PrefpruneError, OSError)


class App(TyperGroup):
    """The root command group; turns usage and user errors into one ``error:`` line and
    prefprune's warnings into one ``warning:`` line.

    Typer would draw a panel for a usage error and a traceback for a ``DataError``; a user
    who passed a wrong path needs neither.
    """

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        with warnings.catch_warnings():
            warnings.simplefilter("default", PrefpruneWarning)
            warnings.showwarning = render.show_warning
            try:
                code = super().main(args, prog_name, complete_var, False, **extra)
            except typer.TyperException as exc:  # usage: bad flag, bad value, missing argument
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


# --- option groups and common flags --------------------------------------------------------------

DATA = OptionGroup("data_options", DataOptions, "Data options")
HELD_OUT_FIELDS = frozenset({"format", "columns", "hub_config", "hub_split", "hub"})
VALIDATION = OptionGroup("validation_options", DataOptions, "Validation target options",
                         only=HELD_OUT_FIELDS, prefix="validation")
MODEL = OptionGroup("model_config", RewardModelConfig, "Model options")
TOKENIZER = OptionGroup("model_config", RewardModelConfig, "Model options",
                        only=frozenset({"backbone", "max_length", "trust_remote_code"}))
TRAIN = OptionGroup("train_config", TrainConfig, "Training options")
INFLUENCE = OptionGroup("influence_config", InfluenceConfig, "Influence options",
                        exclude=frozenset({"seed"}))
ENSEMBLE = OptionGroup("ensemble_config", EnsembleConfig, "Ensemble options", prefix="ensemble")
DEVICE = OptionGroup("device_config", TrainConfig, "Model options", only=frozenset({"device"}))
TRUST = OptionGroup("trust_config", RewardModelConfig, "Model options",
                    only=frozenset({"trust_remote_code"}))
TARGET = OptionGroup("target_config", ExperimentConfig, "Validation target options",
                     only=frozenset({"validation", "allow_overlap"}))
PRUNE = OptionGroup("prune_config", PruneConfig, "Pruning options")
CHECKPOINTS = OptionGroup("checkpoint_config", TrlConfig, "Model options",
                          only=frozenset({"checkpoints"}))
TRL = OptionGroup("trl_config", TrlConfig, "TRL options",
                  only=frozenset({"max_length", "data", "beta", "reference"}), prefix="trl")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead "
                                                       "of tables.")]
QuietFlag = Annotated[bool, typer.Option("--quiet", help="Hide progress bars.")]
OverwriteFlag = Annotated[bool, typer.Option(
    "--overwrite", help="Replace an earlier prefprune output at --output (never anything "
                        "prefprune did not write).")]
DataArg = Annotated[str | None, typer.Argument(
    help="Preference data: a file (.jsonl, .jsonl.gz, .json, .csv, .parquet), a saved dataset "
         "directory or a hub dataset name. Omitted: the embedded synthetic set.")]

def _data(values: dict[str, Any]) -> DataOptions:
    return DATA.build(values)  # type: ignore[return-value]


def check_device(name: str) -> str:
    """A device this torch can use, or a usage error before any work starts."""
    try:
        resolve_device(name)
    except ConfigError as exc:
        raise typer.BadParameter(exc.problem, param_hint="--device") from None
    return name


# --- commands ---------------------------------------------------------------------------------

@data_app.command("inspect")
@with_options(DATA, TOKENIZER)
def inspect_command(
    path: Annotated[str, typer.Argument(help="File, saved dataset directory or hub name.")],
    data_options: dict[str, Any],
    model_config: dict[str, Any],
    examples: Annotated[int, typer.Option(help="How many kept pairs to show.", min=0)] = 3,
    json_output: JsonFlag = False,
) -> None:
    """Load a source and show what was kept, what was skipped and why, how many pairs lose
    text at --max-length, and a few pairs."""
    options = _data(data_options)
    locate_source(path, options)  # a mistyped path is reported before the tokenizer loads
    model = TOKENIZER.build(model_config)
    tokenizer = load_tokenizer(model.backbone or default_backbone(), model.trust_remote_code)
    loaded = load_preferences(path, options, rendering=rendering_for(tokenizer))
    cut = PairEncoder(tokenizer, model.max_length).truncation(loaded.dataset)
    if json_output:
        print_json({"report": loaded.report.to_dict(), "truncation": cut.to_dict(),
                    "examples": loaded.dataset.select(range(min(examples, len(loaded.dataset))))
                    .to_list()})
        return
    render.print_report(loaded.report)
    stdout.print(f"truncation: {cut.describe()}")
    if examples:
        render.print_examples(loaded.dataset, examples)


@app.command("train")
@with_options(DATA, MODEL, TRAIN)
def train_command(
    output: Annotated[Path, typer.Option(help="New or empty folder to save the trained reward "
                                              "model to.")],
    data_options: dict[str, Any],
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    data: DataArg = None,
    overwrite: OverwriteFlag = False,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Train a LoRA reward model on DATA's train split and evaluate it on the held-out splits."""
    train = TRAIN.build(train_config)
    check_device(train.device)
    model = MODEL.build(model_config)
    prepared = prepare_data(data, seed=train.seed, options=_data(data_options),
                            rendering=rendering_of(model))
    outcome = train_and_evaluate(prepared, model, train, output=output, overwrite=overwrite,
                                 progress=not quiet)
    if not distributed.is_main_process():
        return
    if json_output:
        print_json({**render.outcome_dict(outcome), "output": str(output)})
        return
    render.print_outcome(outcome)
    stdout.print(f"saved to {escape(str(output))}")


@app.command("evaluate")
@with_options(DATA, DEVICE, TRUST, TRL)
def evaluate_command(
    model: Annotated[Path, typer.Argument(help="A saved reward model directory (prefprune, a "
                                               "PEFT adapter or a full checkpoint).")],
    data_options: dict[str, Any],
    device_config: dict[str, Any],
    trust_config: dict[str, Any],
    trl_config: dict[str, Any],
    data: DataArg = None,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    seed: Annotated[int | None, typer.Option(
        help="Split seed for data without source splits. Default: the model's training seed, "
             "so that its test pairs stay unseen.")] = None,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Evaluate a saved reward model on a split of DATA: accuracy, loss, margin statistics."""
    device = check_device(DEVICE.build(device_config).device)
    trust_remote_code = TRUST.build(trust_config).trust_remote_code
    split_seed = recorded_seed(model) if seed is None else seed
    reader, trl = trl_reading(model, data, _data(data_options),
                              rendering_of(model, trust_remote_code=trust_remote_code),
                              TRL.build(trl_config))
    prepared = prepare_data(data, seed=split_seed, options=_data(data_options),
                            rendering=reader)
    result = evaluate_saved(model, prepared, split, device=device, progress=not quiet,
                            trust_remote_code=trust_remote_code, trl=trl)
    if not distributed.is_main_process():
        return
    if json_output:
        print_json({"data": data_summary(prepared), "split": split,
                    "metrics": metrics_dict({split: result})})
        return
    stdout.print(render.metrics_table({split: result}))


@app.command("score")
@with_options(DATA, VALIDATION, TARGET, MODEL, TRAIN, INFLUENCE, ENSEMBLE, CHECKPOINTS, TRL)
def score_command(
    output: Annotated[Path, typer.Option(help="Parquet file for the scores; a JSON sidecar "
                                              "with the run's metadata is written beside it.")],
    data_options: dict[str, Any],
    validation_options: dict[str, Any],
    target_config: dict[str, Any],
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    influence_config: dict[str, Any],
    ensemble_config: dict[str, Any],
    checkpoint_config: dict[str, Any],
    trl_config: dict[str, Any],
    data: DataArg = None,
    model: Annotated[Path | None, typer.Option(
        help="A trained reward model directory (prefprune, a PEFT adapter, a full checkpoint "
             "or a TRL output folder). Omitted: the --checkpoints run's final model, else "
             "train one first with the model and training options.")] = None,
    target_column: Annotated[str | None, typer.Option(
        help="Also score against each value of this validation column (e.g. subreddit).")] = None,
    work_dir: Annotated[Path | None, typer.Option(
        help="Where finished shards are kept for resuming. Default: <output>.work.")] = None,
    top: Annotated[int, typer.Option(help="How many most harmful pairs to print.", min=0)] = 5,
    overwrite: OverwriteFlag = False,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Score every training pair: how removing (or flipping) it would change validation loss.
    The random score and any subsampling are seeded by --seed."""
    train = TRAIN.build(train_config)
    check_device(train.device)
    trl = TRL.build(trl_config, base=CHECKPOINTS.build(checkpoint_config))
    if model is None and trl.checkpoints:
        model = final_model(trl.checkpoints)
    seed = recorded_seed(model) if model is not None else train.seed
    influence = apply(INFLUENCE.build(influence_config), {"seed": seed})
    model_settings = MODEL.build(model_config)
    reader, trl = trl_reading(model, data, _data(data_options),
                              rendering_of(model if model is not None else model_settings,
                                           trust_remote_code=model_settings.trust_remote_code),
                              trl)
    target = TARGET.build(target_config)
    prepared = prepare_data(data, seed=seed, options=_data(data_options), rendering=reader,
                            validation=target.validation,
                            validation_options=VALIDATION.build(validation_options),
                            allow_overlap=target.allow_overlap)
    outcome = score_pairs(prepared, model, influence, model_config=model_settings,
                          train_config=None if model is not None else train,
                          ensemble=ENSEMBLE.build(ensemble_config),
                          target_column=target_column, output=output,
                          work_dir=work_dir, overwrite=overwrite, progress=not quiet,
                          trust_remote_code=model_settings.trust_remote_code,
                          trl=trl)
    if not distributed.is_main_process():
        return
    meta = outcome.result.metadata
    if json_output:
        print_json({"output": str(output), "metadata": meta})
        return
    if outcome.trained is not None:
        render.print_outcome(outcome.trained)
    stdout.print(render.solves_table(meta))
    render.print_frozen_layers(meta.get("frozen_layers"))
    stdout.print(render.top_table(outcome.result.table, top))
    stdout.print(f"{meta['n_train']} pairs scored over {meta['n_parameters']:,} parameters in "
                 f"{sum(meta['timings_seconds'].values()):.1f} s; saved "
                 f"{escape(str(output))} and its .json sidecar")


@app.command("prune")
@with_options(DATA, PRUNE)
def prune_command(
    scores: Annotated[Path, typer.Argument(help="Score table written by 'prefprune score'.")],
    data: Annotated[str, typer.Argument(help="The preference data the scores were computed on "
                                             "(file, saved dataset directory or hub name).")],
    output: Annotated[Path, typer.Option(help="New or empty folder for the pruned data (same "
                                              "name and format as DATA), removed.jsonl and "
                                              "prune.json.")],
    data_options: dict[str, Any],
    prune_config: dict[str, Any],
    top: Annotated[int, typer.Option(help="How many affected pairs to print.", min=0)] = 5,
    overwrite: OverwriteFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Remove (or relabel) the top pairs by a score; write DATA back in its own format."""
    config = PRUNE.build(prune_config)
    try:
        result = prune_source(scores, data, output, config, overwrite=overwrite,
                              data_options=_data(data_options))
    except SelectionError as exc:
        raise typer.BadParameter(str(exc)) from exc
    summary = result.summary
    if json_output:
        print_json({**summary, "removed_file": str(result.removed_file)})
        return
    verb = "relabelled" if config.relabel else "removed"
    stdout.print(f"{verb} {len(result.selection.ids)} of {summary['scored_pairs']} scored pairs "
                 f"({config.fraction:.0%} most {config.direction} by {escape(config.by)}); rows "
                 f"{result.rewrite.rows_in} -> {result.rewrite.rows_out}")
    stdout.print(f"wrote {escape(str(result.rewrite.output))}, "
                 f"{escape(str(result.removed_file))} and {escape(str(result.summary_file))}")
    affected = Table("rank", "id", config.by, title=f"first {min(top, len(result.selection.ids))} "
                                            f"{verb} pairs")
    for rank, (pid, value) in enumerate(result.selected_scores()[:top], start=1):
        affected.add_row(str(rank), escape(pid), f"{value:.4g}")
    stdout.print(affected)


def main() -> None:
    """Console-script entry point."""
    app()
