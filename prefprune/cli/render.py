"""What the command line prints: tables and one-line summaries, built from library results.

Nothing here computes; it only formats what :mod:`prefprune.pipeline`, the experiment and the
pruning step return. Text that comes from the user's data is escaped, so a pair containing
rich markup prints as written.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Mapping
from typing import Any, NoReturn

import datasets
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from prefprune.data import IngestionReport
from prefprune.errors import PrefpruneWarning
from prefprune.experiment import ExperimentResult, headline
from prefprune.experiment.validation import ValidationResult, format_lds
from prefprune.model import Truncation
from prefprune.pipeline import TrainOutcome, data_summary, frozen_layer_summary, metrics_dict
from prefprune.report import format_interval
from prefprune.training import EvalResult, TrainResult

stdout = Console()
stderr = Console(stderr=True)
_python_showwarning = warnings.showwarning


def fail(message: str, code: int) -> NoReturn:
    """Print one red ``error:`` line (never wrapped) and exit with ``code``."""
    stderr.print(f"[red]error: {escape(message)}[/red]", soft_wrap=True, highlight=False)
    sys.exit(code)


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """prefprune's warnings as one yellow ``warning:`` line; others as Python prints them."""
    if issubclass(category, PrefpruneWarning):
        stderr.print(f"[yellow]warning: {escape(str(message))}[/yellow]", soft_wrap=True,
                     highlight=False)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def print_json(data: Any) -> None:
    """JSON on stdout, unstyled, so other tools can parse it."""
    typer.echo(json.dumps(data, indent=2, default=str))


def ingestion_line(report: IngestionReport) -> str:
    return f"read {report.read} = kept {report.kept} + skipped {len(report.skipped)}"


def split_line(data: dict[str, Any]) -> str:
    """Pairs per split, and the source pairs no split uses (a sampled or replaced split)."""
    sizes = " / ".join(f"{name} {n}" for name, n in data["sizes"].items())
    reasons = "; ".join(f"{n} {why}" for why, n in data.get("left_out_by_reason", {}).items())
    return sizes + (f" (source pairs in no split: {reasons})" if reasons else "")


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
        issues.add_row(escape(row.location), row.reason, escape(row.field or ""),
                       escape(row.detail))
    stdout.print(issues)


def print_truncation(cuts: Mapping[str, Truncation]) -> None:
    """One line per split that loses text at max_length (silence when nothing is cut)."""
    for name, cut in cuts.items():
        if cut.prompts_cut or cut.responses_cut:
            stdout.print(f"{name}: {cut.describe()}")


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


def outcome_dict(outcome: TrainOutcome) -> dict[str, Any]:
    return {"data": data_summary(outcome.data), "train": outcome.train.to_dict(),
            "metrics": metrics_dict(outcome.metrics), "seconds": outcome.seconds,
            "truncation": {k: v.to_dict() for k, v in outcome.truncation.items()},
            "frozen_layers": frozen_layer_summary(outcome.model)}


def print_outcome(outcome: TrainOutcome) -> None:
    data = outcome.data
    stdout.print(f"{ingestion_line(data.report)}; {split_line(data_summary(data))}; "
                 f"train fingerprint {data.fingerprint}")
    print_truncation(outcome.truncation)
    stdout.print(training_table(outcome.train))
    stdout.print(metrics_table(outcome.metrics))
    print_frozen_layers(frozen_layer_summary(outcome.model))


def print_frozen_layers(summary: Mapping[str, Any] | None) -> None:
    """Where the frozen layers' output came from in this command: computed, RAM or disk."""
    if summary:
        stdout.print(f"frozen layers: {summary['misses']} sequences computed "
                     f"({summary['frozen_seconds']:.1f} s), {summary['disk_hits']} read from "
                     f"the feature cache on disk, {summary['hits']} from RAM")


def solves_table(meta: Mapping[str, Any]) -> Table:
    table = Table("target", "curvature", "solver", "iterations", "final residual", "converged",
                  title=f"inverse-HVP solves (damping {meta.get('damping', float('nan')):.3g})")
    for target, solve in meta.get("solves", {}).items():
        residual = solve["final_residual"]
        table.add_row(escape(target), solve["curvature"], solve["method"],
                      str(solve["iterations"]), "" if residual is None else f"{residual:.2e}",
                      "yes" if solve["converged"] else f"no: {escape(solve['message'])}")
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


def print_headline(result: ExperimentResult) -> None:
    """Test accuracy per method at the first fraction, and flip detection when known; sized
    for an 80-column terminal (accuracy in percent, differences in points)."""
    rows = headline(result)
    fraction = result.config.fractions[0]
    seeds = len(result.config.seeds)
    table = Table("method", "test acc %", "Δ vs none", "Δ vs random", "flip AUROC",
                  "top 10%", box=box.SIMPLE_HEAD, pad_edge=False,
                  title=f"{fraction:.0%} of training pairs removed by each score and the model "
                        f"retrained; {seeds} seed{'s' if seeds > 1 else ''}, mean"
                        f"{' ± 95% interval' if seeds > 1 else ''} "
                        f"({result.seconds / 60:.1f} min)")
    for row in rows:
        detection = row.get("detection") or {}
        found = next((v for k, v in detection.items() if k.startswith("found_in_top")), None)
        table.add_row(row["method"], format_interval(row["test_accuracy"], 1, scale=100),
                      format_interval(row.get("vs_baseline"), 1, signed=True, scale=100),
                      format_interval(row.get("vs_random"), 1, signed=True, scale=100),
                      format_interval(detection.get("auroc"), 2),
                      format_interval(found, 0, scale=100))
    stdout.print(table)
    if any(row.get("detection") for row in rows):
        stdout.print("flip AUROC: how well the score ranks the wrong labels first (0.5 = "
                     "chance); top 10%: the share of all wrong labels among its top 10%.")


def print_validation(result: ValidationResult) -> None:
    """The LDS per score (mean over targets with a bootstrap interval, and for the whole
    validation set) and the flip calibration; both sized for an 80-column terminal."""
    data = result.data
    lds = Table("score", "LDS (per pair)", "vs random", "LDS (whole set)", box=box.SIMPLE_HEAD,
                pad_edge=False,
                title=f"linear datamodeling score: {result.config.subsets} retrains on "
                      f"{result.config.subset_fraction:.0%} subsets, {data['lds_targets']} "
                      "validation pairs; Spearman of predicted vs actual loss change, 95% "
                      "bootstrap interval")
    for method, entry in result.lds.items():
        whole = result.set_level[method]
        interval = whole.get("ci95")
        versus = entry.get("vs_random")
        lds.add_row(method, format_lds(entry), format_lds(versus, signed=True) if versus else "",
                    f"{whole['spearman']:.2f}" + (
            f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""))
    stdout.print(lds)
    if result.flips:
        flips = Table("score", "AUROC", "avg precision", "top 10%", "top 20%",
                      box=box.SIMPLE_HEAD, pad_edge=False,
                      title=f"flip calibration: {result.config.flip_share:.0%} of the training "
                            "labels flipped on purpose; how well each score finds them")
        for method, entry in result.flips.items():
            flips.add_row(method, f"{entry['auroc']:.3f}", f"{entry['average_precision']:.3f}",
                          f"{entry['found_in_top_10%']:.0%}", f"{entry['found_in_top_20%']:.0%}")
        stdout.print(flips)
