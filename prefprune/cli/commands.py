"""The ``prefprune`` commands: parse options, call the library, print the result.

Options come from the config dataclasses (:mod:`prefprune.cli.options`), so a flag is its
field's name with the field's help and limits. Every user mistake ends as one red ``error:``
line on stderr: exit code 2 for usage, 1 for data, model or file problems; prefprune's
warnings print as one yellow ``warning:`` line.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
import warnings
from collections.abc import Callable
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
from prefprune.data import DataOptions, load_preferences, rendering_for
from prefprune.ensemble import EnsembleConfig
from prefprune.errors import ConfigError, PrefpruneError, PrefpruneWarning, SelectionError
from prefprune.experiment import Experiment, ExperimentConfig, demo_config
from prefprune.experiment.config import ValidateConfig
from prefprune.experiment.validation import VALIDATE_FILE, Validation
from prefprune.influence import InfluenceConfig
from prefprune.model import PairEncoder, RewardModelConfig
from prefprune.model.loading import default_backbone, load_tokenizer
from prefprune.pipeline import (
    data_summary,
    evaluate_saved,
    metrics_dict,
    prepare_data,
    recorded_seed,
    rendering_of,
    score_pairs,
    train_and_evaluate,
)
from prefprune.pruning import PruneConfig, prune_source
from prefprune.report import write_report
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
_HELD_OUT_FIELDS = frozenset({"format", "columns", "hub_config", "hub_split", "hub"})
VALIDATION = OptionGroup("validation_options", DataOptions, "Validation target options",
                         only=_HELD_OUT_FIELDS, prefix="validation")
TEST = OptionGroup("test_options", DataOptions, "Test set options", only=_HELD_OUT_FIELDS,
                   prefix="test")
MODEL = OptionGroup("model_config", RewardModelConfig, "Model options")
TOKENIZER = OptionGroup("model_config", RewardModelConfig, "Model options",
                        only=frozenset({"backbone", "max_length", "trust_remote_code"}))
TRAIN = OptionGroup("train_config", TrainConfig, "Training options")
INFLUENCE = OptionGroup("influence_config", InfluenceConfig, "Influence options",
                        exclude=frozenset({"seed"}))
_EXPERIMENT_DEFAULTS = ExperimentConfig()
EXPERIMENT = OptionGroup("run_values", ExperimentConfig, "Experiment options",
                         defaults=_EXPERIMENT_DEFAULTS)
_VALIDATE_DEFAULTS = ValidateConfig()
VALIDATE = OptionGroup("run_values", ValidateConfig, "Validation options",
                       defaults=_VALIDATE_DEFAULTS)
VALIDATE_INFLUENCE = OptionGroup("influence_config", InfluenceConfig, "Influence options",
                                 exclude=frozenset({"seed"}),
                                 defaults=_VALIDATE_DEFAULTS.influence)
ENSEMBLE = OptionGroup("ensemble_config", EnsembleConfig, "Ensemble options", prefix="ensemble")
DEVICE = OptionGroup("device_config", TrainConfig, "Model options", only=frozenset({"device"}))
TRUST = OptionGroup("trust_config", RewardModelConfig, "Model options",
                    only=frozenset({"trust_remote_code"}))
TARGET = OptionGroup("target_config", ExperimentConfig, "Validation target options",
                     only=frozenset({"validation", "allow_overlap"}))
DEMO = OptionGroup("demo_values", ExperimentConfig, "Demo options", only=frozenset({"seeds"}),
                   defaults=demo_config())
PRUNE = OptionGroup("prune_config", PruneConfig, "Pruning options")
EXPERIMENT_TRAIN = OptionGroup("train_config", TrainConfig, "Training options",
                               exclude=frozenset({"seed"}))
EXPERIMENT_INFLUENCE = OptionGroup("influence_config", InfluenceConfig, "Influence options",
                                   exclude=frozenset({"seed"}),
                                   defaults=_EXPERIMENT_DEFAULTS.influence)

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


def _device(name: str) -> str:
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
    model = TOKENIZER.build(model_config)
    tokenizer = load_tokenizer(model.backbone or default_backbone(), model.trust_remote_code)
    loaded = load_preferences(path, **_data(data_options).kwargs(),
                              rendering=rendering_for(tokenizer))
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
    _device(train.device)
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
@with_options(DATA, DEVICE, TRUST)
def evaluate_command(
    model: Annotated[Path, typer.Argument(help="A saved reward model directory (prefprune, a "
                                               "PEFT adapter or a full checkpoint).")],
    data_options: dict[str, Any],
    device_config: dict[str, Any],
    trust_config: dict[str, Any],
    data: DataArg = None,
    split: Annotated[str, typer.Option(help="train, validation or test.")] = "test",
    seed: Annotated[int | None, typer.Option(
        help="Split seed for data without source splits. Default: the model's training seed, "
             "so that its test pairs stay unseen.")] = None,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Evaluate a saved reward model on a split of DATA: accuracy, loss, margin statistics."""
    device = _device(DEVICE.build(device_config).device)
    trust_remote_code = TRUST.build(trust_config).trust_remote_code
    split_seed = recorded_seed(model) if seed is None else seed
    prepared = prepare_data(data, seed=split_seed, options=_data(data_options),
                            rendering=rendering_of(model, trust_remote_code=trust_remote_code))
    result = evaluate_saved(model, prepared, split, device=device, progress=not quiet,
                            trust_remote_code=trust_remote_code)
    if not distributed.is_main_process():
        return
    if json_output:
        print_json({"data": data_summary(prepared), "split": split,
                    "metrics": metrics_dict({split: result})})
        return
    stdout.print(render.metrics_table({split: result}))


@app.command("score")
@with_options(DATA, VALIDATION, TARGET, MODEL, TRAIN, INFLUENCE, ENSEMBLE)
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
    data: DataArg = None,
    model: Annotated[Path | None, typer.Option(
        help="A trained reward model directory. Omitted: train one first with the model and "
             "training options.")] = None,
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
    _device(train.device)
    seed = recorded_seed(model) if model is not None else train.seed
    influence = apply(INFLUENCE.build(influence_config), {"seed": seed})
    model_settings = MODEL.build(model_config)
    reader = rendering_of(model if model is not None else model_settings,
                          trust_remote_code=model_settings.trust_remote_code)
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
                          trust_remote_code=model_settings.trust_remote_code)
    if not distributed.is_main_process():
        return
    meta = outcome.result.metadata
    if json_output:
        print_json({"output": str(output), "metadata": meta})
        return
    if outcome.trained is not None:
        render.print_outcome(outcome.trained)
    stdout.print(render.solves_table(meta))
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
                              data_options=_data(data_options).kwargs())
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


#: The sections of a run's settings and the option groups their flags come from.
_RUN_SECTIONS = {"data_options": DATA, "validation_options": VALIDATION, "test_options": TEST,
                 "model": MODEL, "train": EXPERIMENT_TRAIN, "ensemble": ENSEMBLE}


def run_config(top: OptionGroup, influence: OptionGroup, config: Path | None,
               data: str | None, values: dict[str, dict[str, Any]]) -> Any:
    """An experiment's or validation's settings: the YAML file (when given, else the
    defaults) with DATA and the typed flags on top, section by section."""
    base = top.settings.from_yaml(config) if config is not None else top.base
    typed: dict[str, Any] = top.typed(values[top.name])
    if data is not None:
        typed["data"] = data
    for section, group in {**_RUN_SECTIONS, "influence": influence}.items():
        typed[section] = apply(getattr(base, section), group.typed(values[group.name]),
                               group.prefix)
    return apply(base, typed)


ConfigArg = Annotated[Path | None, typer.Option(
    help="YAML settings (e.g. a saved config.yaml); flags typed here override them.",
    exists=True, dir_okay=False)]


def run_command(top: OptionGroup, influence: OptionGroup, output_help: str,
                execute: Callable[[Any, Path, bool, bool, bool], None]) -> Callable[..., None]:
    """A command that builds a run's settings from a ``--config`` file and flags (the option
    groups of every section) and hands them to ``execute(settings, output, overwrite, json,
    quiet)``: ``experiment`` and ``validate`` share it."""

    def command(output: Path, options: dict[str, dict[str, Any]], data: DataArg = None,
                config: ConfigArg = None, overwrite: OverwriteFlag = False,
                json_output: JsonFlag = False, quiet: QuietFlag = False) -> None:
        settings = run_config(top, influence, config, data, options)
        _device(settings.train.device)
        execute(settings, output, overwrite, json_output, quiet)

    signature = inspect.signature(command, eval_str=True)
    command.__signature__ = signature.replace(parameters=[  # type: ignore[attr-defined]
        p.replace(annotation=Annotated[Path, typer.Option(help=output_help)])
        if p.name == "output" else p for p in signature.parameters.values()])
    groups = (*_RUN_SECTIONS.values(), influence, top)
    return with_options(*groups, into="options")(command)


def _experiment(settings: ExperimentConfig, output: Path, overwrite: bool, json_output: bool,
                quiet: bool) -> None:
    result = Experiment(settings, output, progress=not quiet, overwrite=overwrite,
                        on_run=None if quiet or json_output else _print_run).run()
    paths = write_report(result, output)
    if json_output:
        print_json({"results": str(output / "results.json"),
                    **{k: str(v) for k, v in paths.items()}, "summary": result.summary})
        return
    render.print_headline(result)
    stdout.print(f"wrote {escape(str(output / 'results.json'))}, "
                 f"{escape(str(paths['markdown']))} and {escape(str(paths['html']))}")


def _validate(settings: ValidateConfig, output: Path, overwrite: bool, json_output: bool,
              quiet: bool) -> None:
    result = Validation(settings, output, progress=not quiet, overwrite=overwrite).run()
    if json_output:
        print_json({"validate": str(output / VALIDATE_FILE), **result.to_dict()})
        return
    render.print_validation(result)
    stdout.print(f"wrote {escape(str(output / VALIDATE_FILE))}")


app.command("experiment", help=(
    "Train, score, prune the top-f pairs per method, retrain and compare, over several seeds; "
    "write results.json, report.md and report.html."))(run_command(
        EXPERIMENT, EXPERIMENT_INFLUENCE, "Folder for config.yaml, models, scores, runs, "
        "results.json and the report; rerun to resume.", _experiment))
app.command("validate", help=(
    "Which score to trust on DATA: the linear datamodeling score (retrain on random subsets, "
    "correlate each score's predicted loss changes with the actual ones) and flip calibration "
    "(find labels flipped on purpose in a copy of DATA)."))(run_command(
        VALIDATE, VALIDATE_INFLUENCE, "Folder for config.yaml, models, scores, the subset runs "
        "and validate.json; rerun to resume.", _validate))


def _print_run(record: Any) -> None:
    stdout.print(f"  {record.arm.key}: test accuracy {record.test_accuracy:.4f} "
                 f"({record.train_pairs} pairs, {record.seconds:.0f} s)")


@app.command("demo")
@with_options(DEMO)
def demo_command(
    demo_values: dict[str, Any],
    output: Annotated[Path | None, typer.Option(
        help="Keep the experiment (models, scores, results.json, report) in this new folder.")
    ] = None,
    overwrite: OverwriteFlag = False,
    json_output: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """A small pruning experiment on the embedded synthetic set, scored against its
    expert-labelled validation pairs: train, score, remove the top 10% by IF, gradient cosine,
    loss and random, retrain, over three seeds, and print the headline table."""
    config = DEMO.build(demo_values, base=demo_config())
    with tempfile.TemporaryDirectory(prefix="prefprune-demo-") as scratch:
        where = output or Path(scratch) / "demo"
        result = Experiment(config, where, progress=not quiet,
                            overwrite=overwrite).run()
        paths = write_report(result, where) if output is not None else {}
    if json_output:
        print_json({"summary": result.summary, "data": result.data,
                    "seconds": result.seconds, **{k: str(v) for k, v in paths.items()}})
        return
    stdout.print(f"{escape(result.data['source'])}: read {result.data['read']} = kept "
                 f"{result.data['kept']} + skipped {result.data['skipped']}; "
                 + " / ".join(f"{k} {v}" for k, v in result.data["sizes"].items()))
    render.print_headline(result)
    if paths:
        stdout.print(f"wrote {escape(str(paths['markdown']))} and {escape(str(paths['html']))}")


def main() -> None:
    """Console-script entry point."""
    app()
