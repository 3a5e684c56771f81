"""The commands that run many trainings: ``experiment``, ``validate`` and ``demo``.

Each builds one run's settings (an :class:`~prefprune.experiment.ExperimentConfig` or
:class:`~prefprune.experiment.ValidateConfig`) from a ``--config`` file with the typed flags
on top, section by section, and hands them to the library.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from prefprune.cli import render
from prefprune.cli.commands import (
    CHECKPOINTS,
    DATA,
    ENSEMBLE,
    HELD_OUT_FIELDS,
    MODEL,
    TRL,
    VALIDATION,
    DataArg,
    JsonFlag,
    OverwriteFlag,
    QuietFlag,
    app,
    check_device,
)
from prefprune.cli.options import OptionGroup, apply, with_options
from prefprune.cli.render import print_json, stdout
from prefprune.data import DataOptions
from prefprune.experiment import Experiment, ExperimentConfig, demo_config
from prefprune.experiment.config import ValidateConfig
from prefprune.experiment.validation import VALIDATE_FILE, Validation
from prefprune.influence import InfluenceConfig
from prefprune.report import write_report
from prefprune.training import TrainConfig

_EXPERIMENT_DEFAULTS = ExperimentConfig()
EXPERIMENT = OptionGroup("run_values", ExperimentConfig, "Experiment options",
                         defaults=_EXPERIMENT_DEFAULTS)
_VALIDATE_DEFAULTS = ValidateConfig()
VALIDATE = OptionGroup("run_values", ValidateConfig, "Validation options",
                       defaults=_VALIDATE_DEFAULTS)
VALIDATE_INFLUENCE = OptionGroup("influence_config", InfluenceConfig, "Influence options",
                                 exclude=frozenset({"seed"}),
                                 defaults=_VALIDATE_DEFAULTS.influence)
DEMO = OptionGroup("demo_values", ExperimentConfig, "Demo options", only=frozenset({"seeds"}),
                   defaults=demo_config())
EXPERIMENT_TRAIN = OptionGroup("train_config", TrainConfig, "Training options",
                               exclude=frozenset({"seed"}))
EXPERIMENT_INFLUENCE = OptionGroup("influence_config", InfluenceConfig, "Influence options",
                                   exclude=frozenset({"seed"}),
                                   defaults=_EXPERIMENT_DEFAULTS.influence)
TEST = OptionGroup("test_options", DataOptions, "Test set options", only=HELD_OUT_FIELDS,
                   prefix="test")

#: The sections of a run's settings and the option groups their flags come from.
_RUN_SECTIONS: dict[str, tuple[OptionGroup, ...]] = {
    "data_options": (DATA,), "validation_options": (VALIDATION,), "test_options": (TEST,),
    "model": (MODEL,), "train": (EXPERIMENT_TRAIN,), "ensemble": (ENSEMBLE,)}
#: An experiment may score a TRL run (--model) and its checkpoints.
_EXPERIMENT_SECTIONS = {**_RUN_SECTIONS, "trl": (CHECKPOINTS, TRL)}


def run_config(top: OptionGroup, influence: OptionGroup, config: Path | None,
               data: str | None, values: dict[str, dict[str, Any]],
               sections: dict[str, tuple[OptionGroup, ...]] = _RUN_SECTIONS) -> Any:
    """An experiment's or validation's settings: the YAML file (when given, else the
    defaults) with DATA and the typed flags on top, section by section."""
    base = top.settings.from_yaml(config) if config is not None else top.base
    typed: dict[str, Any] = top.typed(values[top.name])
    if data is not None:
        typed["data"] = data
    for section, groups in {**sections, "influence": (influence,)}.items():
        value = getattr(base, section)
        for group in groups:
            value = apply(value, group.typed(values[group.name]), group.prefix)
        typed[section] = value
    return apply(base, typed)


ConfigArg = Annotated[Path | None, typer.Option(
    help="YAML settings (e.g. a saved config.yaml); flags typed here override them.",
    exists=True, dir_okay=False)]


def run_command(top: OptionGroup, influence: OptionGroup, output_help: str,
                execute: Callable[[Any, Path, bool, bool, bool], None],
                sections: dict[str, tuple[OptionGroup, ...]] = _RUN_SECTIONS
                ) -> Callable[..., None]:
    """A command that builds a run's settings from a ``--config`` file and flags (the option
    groups of every section) and hands them to ``execute(settings, output, overwrite, json,
    quiet)``: ``experiment`` and ``validate`` share it."""

    def command(output: Path, options: dict[str, dict[str, Any]], data: DataArg = None,
                config: ConfigArg = None, overwrite: OverwriteFlag = False,
                json_output: JsonFlag = False, quiet: QuietFlag = False) -> None:
        settings = run_config(top, influence, config, data, options, sections)
        check_device(settings.train.device)
        execute(settings, output, overwrite, json_output, quiet)

    signature = inspect.signature(command, eval_str=True)
    command.__signature__ = signature.replace(parameters=[  # type: ignore[attr-defined]
        p.replace(annotation=Annotated[Path, typer.Option(help=output_help)])
        if p.name == "output" else p for p in signature.parameters.values()])
    groups = (*(g for section in sections.values() for g in section), influence, top)
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
        "results.json and the report; rerun to resume.", _experiment, _EXPERIMENT_SECTIONS))
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
                 + render.split_line(result.data))
    render.print_headline(result)
    if paths:
        stdout.print(f"wrote {escape(str(paths['markdown']))} and {escape(str(paths['html']))}")
