"""Turn an experiment's results into ``report.md`` and a self-contained ``report.html``.

Both documents are rendered from one list of :class:`Section` objects (a heading, prose, a
table, a figure), so they always say the same thing: Markdown for a repository or a pull
request (figures beside it as PNG files), HTML with the figures embedded for a browser.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prefprune.document import Bold, Code, Paragraph, Section, render_html, render_markdown
from prefprune.experiment import CONFIG_FILE, ExperimentResult
from prefprune.experiment.validation import VALIDATE_FILE, format_lds
from prefprune.files import write_bytes_atomic
from prefprune.model import RewardModelConfig

#: Metadata columns whose groups a user wants harm summed over (docs/method.md, section 4).
GROUP_COLUMNS = ("worker", "batch", "policy_pair", "subreddit")
#: ``prefprune validate --output DIR/validate`` beside an experiment in DIR joins its report.
VALIDATION_FOLDER = "validate"
TOP_PAIRS = 10


def write_report(result: ExperimentResult, output: str | Path,
                 command: str | None = None) -> dict[str, Path]:
    """Write report.md, report.html and figures/*.png into ``output``; return their paths."""
    output = Path(output)
    sections = build_sections(result, output, command)
    figures = output / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for section in sections:
        if section.figure and section.figure_png:
            write_bytes_atomic(figures / f"{section.figure}.png", section.figure_png)
    paths = {"markdown": output / "report.md", "html": output / "report.html"}
    write_bytes_atomic(paths["markdown"], render_markdown(sections).encode())
    write_bytes_atomic(paths["html"], render_html(sections).encode())
    return paths


# --- content -----------------------------------------------------------------------------------

def build_sections(result: ExperimentResult, output: Path,
                   command: str | None = None) -> list[Section]:
    """The report's content, in reading order."""
    sections = [_overview(result, output, command)]
    for group in _groups(result):
        sections.append(_arm_table(result, group))
    sections.append(_accuracy_figure(result))
    if result.summary["detection"]:
        sections += [_detection_table(result), _roc_figure(result)]
    if result.summary.get("agreement"):
        sections.append(_agreement_table(result))
    sections.append(_distribution_figure(result))
    sections += _validation_sections(output / VALIDATION_FOLDER / VALIDATE_FILE)
    sections += _aggregations(result)
    sections.append(_top_pairs(result))
    return sections


def _agreement_table(result: ExperimentResult) -> Section:
    agreement = result.summary["agreement"]
    rows = [[score, format_interval(values["spearman"], 3),
             format_interval(values["top10_overlap"], 3)] for score, values in agreement.items()]
    return Section("Agreement between ensemble members", text=[
        "How much the ensemble's members agree on each score, averaged over seeds: the mean "
        "pairwise Spearman correlation of their harms, and the mean share of one member's top "
        "10% that another member also puts in its top 10%."],
        header=["score", "Spearman", "top-10% overlap"], rows=rows)


def _validation_sections(path: Path) -> list[Section]:
    """``prefprune validate`` run into DIR/validate: which score to trust on this data."""
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    cfg = saved["config"]
    lds = [[m, format_lds(entry),
            format_lds(entry["vs_random"], signed=True) if "vs_random" in entry else "",
            f"{saved['set_level'][m]['spearman']:.2f}"] for m, entry in saved["lds"].items()]
    sections = [Section("Which score to trust here: linear datamodeling score", text=[
        f"From prefprune validate: {cfg['subsets']} models retrained on random "
        f"{cfg['subset_fraction']:.0%} subsets of the training pairs; per validation pair, the "
        "Spearman correlation between each score's predicted change of its loss and the actual "
        "change, averaged over pairs (95% bootstrap interval over subsets and pairs), its "
        "paired difference to random scores, and for the validation set as a whole. Random is "
        "the floor."], header=["score", "LDS (per pair)", "vs random", "LDS (whole set)"],
        rows=lds)]
    flips = saved.get("flip_calibration") or {}
    if flips:
        sections.append(Section("Which score to trust here: flip calibration", text=[
            f"{cfg['flip_share']:.0%} of the training labels flipped on purpose in a copy of "
            "the data; how well each score finds them."],
            header=["score", "AUROC", "average precision", "top 10%", "top 20%"],
            rows=[[m, f"{e['auroc']:.3f}", f"{e['average_precision']:.3f}",
                   f"{e['found_in_top_10%']:.0%}", f"{e['found_in_top_20%']:.0%}"]
                  for m, e in flips.items()]))
    return sections


def format_interval(stat: Mapping[str, Any] | None, digits: int = 4,
                    signed: bool = False, scale: float = 1.0) -> str:
    """``mean ± ci95`` of a :func:`~prefprune.experiment.mean_interval` (the mean alone with
    one seed, ``–`` when missing), as the report and the CLI print it; ``scale=100`` shows a
    share in percent or points."""
    if not stat:
        return "–"
    sign = "+" if signed else ""
    text = f"{stat['mean'] * scale:{sign}.{digits}f}"
    if stat.get("ci95") is None:
        return text
    return f"{text} ± {stat['ci95'] * scale:.{digits}f}"


def _overview(result: ExperimentResult, output: Path, command: str | None) -> Section:
    cfg, data = result.config, result.data
    trained = data.get("trained_model")
    model = RewardModelConfig.from_dict(trained["recipe"]) if trained else cfg.model
    sizes = data["sizes"]
    rerun = command or f"prefprune experiment --config {output / CONFIG_FILE} --output {output}"
    base = result.summary["baseline"]["test_accuracy"]
    return Section("Pruning experiment", text=[
        ("Data: ", Code(data["source"]), f" ({data['format']}): read {data['read']} = kept "
         f"{data['kept']} + skipped {data['skipped']}; train / validation / test = "
         f"{sizes['train']} / {sizes['validation']} / {sizes['test']} pairs"
         + "".join(f"; {n} source pairs in no split ({why})"
                   for why, n in data.get("left_out_by_reason", {}).items())
         + (f" (seed {cfg.seeds[0]}'s split; every replicate draws its own, so the "
            "intervals include the variance between splits)." if cfg.split_per_seed else ".")),
        *_truncation_lines(data),
        *_held_out_lines(data),
        *_trained_model_lines(trained),
        f"Model: {model.backbone or 'all-MiniLM-L6-v2 (default)'}, LoRA r={model.lora_r}"
        f"{f' on the top {model.lora_layers} layers' if model.lora_layers else ' on every layer'}, "
        f"max_length {model.max_length}; training {_plural(cfg.train.epochs, 'epoch')}, batch "
        f"{cfg.train.batch_size}, lr {cfg.train.learning_rate:g}.",
        f"Seeds {', '.join(map(str, cfg.seeds))}; methods {', '.join(cfg.methods)}; fractions "
        f"{', '.join(f'{f:.0%}' for f in cfg.fractions)}"
        + (f"; {cfg.inject_flips:.0%} of training labels flipped on purpose (seeded per "
           "replicate)" if cfg.inject_flips else "") + ".",
        ("Unpruned test accuracy: ", Bold(format_interval(base)),
         " (mean ± 95% interval over seeds)."),
        "Every score is a harm (larger = more harmful). Each pruned model is retrained from "
        "the same initialisation, seed and hyper-parameters as its unpruned baseline; "
        "differences are paired by seed.",
        ("Reproduce: ", Code(rerun), f" ({_plural(len(result.runs), 'training run')}, "
         f"{sum(r.seconds for r in result.runs) / 60:.0f} minutes of training and "
         "evaluation here)."),
    ])


def _trained_model_lines(trained: Mapping[str, Any] | None) -> list[Paragraph]:
    """A model trained elsewhere: the scores are its own, the retrains follow its recipe."""
    if not trained:
        return []
    test = trained["test"]
    return [("Scores taken at the given model ", Code(trained["path"]),
             f" (test accuracy {test['accuracy']:.3f} on {test['pairs']} pairs); the unpruned "
             "and pruned retrains below follow its recipe.")]


def _held_out_lines(data: Mapping[str, Any]) -> list[Paragraph]:
    """Which pairs the influence scores target and which the retrains are measured on."""
    origins = data.get("origins") or {}
    return [(f"{label}: ", Code(origins[name]), ".")
            for name, label in (("validation", "Influence target (validation)"),
                                ("test", "Test set")) if name in origins]


def _truncation_lines(data: Mapping[str, Any]) -> list[str]:
    """Say where text was cut to fit max_length: lost context changes what a model learns."""
    cuts = data.get("truncation") or {}
    return [f"Truncation ({name}): {cut['prompts_cut']} of {cut['pairs']} pairs had their "
            f"prompt cut from the left and {cut['responses_cut']} a response cut, at max_length "
            f"{cut['max_length']}." for name, cut in cuts.items()
            if cut["prompts_cut"] or cut["responses_cut"]]


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _groups(result: ExperimentResult) -> list[str]:
    seen: list[str] = []
    for arm in result.summary["arms"]:
        name = f"{arm['action']} {arm['direction']}"
        if name not in seen:
            seen.append(name)
    return seen


_GROUP_TEXT = {
    "remove harmful": "Remove the top-f most harmful pairs and retrain. Higher test accuracy "
                      "than the baseline and than random removal means the method found pairs "
                      "that hurt.",
    "remove helpful": "Remove the top-f most helpful pairs (lowest harm) and retrain. The larger "
                      "the drop, the better the method finds the pairs the model needs.",
    "relabel harmful": "Flip the labels of the top-f most harmful pairs instead of removing "
                       "them.",
}


def _arm_table(result: ExperimentResult, group: str) -> Section:
    rows = []
    for arm in result.summary["arms"]:
        if f"{arm['action']} {arm['direction']}" != group:
            continue
        rows.append([arm["method"], f"{arm['fraction']:.0%}",
                     format_interval(arm["test_accuracy"]),
                     format_interval(arm["vs_baseline"], signed=True),
                     format_interval(arm.get("vs_random"), signed=True),
                     format_interval(arm["test_loss"]), str(len(arm["seeds"]))])
    return Section(f"Test accuracy: {group}", text=[_GROUP_TEXT.get(group, "")],
                   header=["method", "fraction", "test accuracy", "Δ vs no pruning",
                           "Δ vs random", "test loss", "seeds"], rows=rows)


def _detection_table(result: ExperimentResult) -> Section:
    detection = result.summary["detection"]
    metrics = list(next(iter(detection.values())))
    rows = [[m, *[format_interval(detection[m][k], 3) for k in metrics]] for m in detection]
    return Section("Finding the flipped labels", text=[
        "How well each score ranks the pairs whose label is wrong first (ground truth: the "
        "generator's or the injected flips). AUROC 0.5 is chance; found_in_top is the share "
        "of all flipped pairs among the top-ranked 10%."], header=["score", *metrics], rows=rows)


def _top_pairs(result: ExperimentResult) -> Section:
    seed = min(result.scores)
    table, texts = result.scores[seed], result.train_texts[seed]
    by = _primary(result)
    lookup = {pid: i for i, pid in enumerate(texts["id"])}
    rows = []
    for _, row in table.nsmallest(TOP_PAIRS, f"rank_{by}").iterrows():
        pair = texts[lookup[row["id"]]]
        flipped = str(bool(row["label_flipped"])) if "label_flipped" in table else "?"
        rows.append([str(row[f"rank_{by}"]), str(row["id"]), f"{row[by]:.3g}", flipped,
                     _clip(pair["prompt"][-300:]), _clip(pair["chosen"]),
                     _clip(pair["rejected"])])
    return Section(f"The {TOP_PAIRS} most harmful training pairs by {by} (seed {seed})",
                   header=["rank", "id", by, "label wrong", "prompt (end)", "chosen",
                           "rejected"], rows=rows)


def _clip(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _primary(result: ExperimentResult) -> str:
    return "if" if "if" in result.config.methods else result.config.methods[0]


def _aggregations(result: ExperimentResult) -> list[Section]:
    """Harm summed per worker / batch / policy pair, where the data has those columns."""
    seed = min(result.scores)
    table = result.scores[seed].copy()
    if {"policy_chosen", "policy_rejected"} <= set(table.columns):
        table["policy_pair"] = table["policy_chosen"].astype(str) + " vs " \
            + table["policy_rejected"].astype(str)
    by = _primary(result)
    sections = []
    for column in GROUP_COLUMNS:
        if column not in table or table[column].nunique() < 2:
            continue
        stats = _group_harm(table, column, by)
        rows = [[str(name), str(int(r["pairs"])), f"{r['total']:.4g}", f"{r['mean']:.4g}",
                 f"{r['top_share']:.0%}"] for name, r in stats.head(15).iterrows()]
        sections.append(Section(
            f"Harm by {column} ({by}, seed {seed})",
            text=[f"Summed harm per {column}, largest first ({min(15, len(stats))} of "
                  f"{len(stats)}); "
                  "'in top 10%' is the share of its pairs among the 10% most harmful."],
            header=[column, "pairs", "total harm", "mean harm", "in top 10%"], rows=rows,
            figure=f"harm_by_{column}", figure_png=_bar_png(stats.head(15), column, by)))
    return sections


def _group_harm(table: pd.DataFrame, column: str, by: str) -> pd.DataFrame:
    cutoff = max(1, round(0.1 * len(table)))
    top = table[f"rank_{by}"] <= cutoff
    grouped = table.assign(_top=top).groupby(column)
    return pd.DataFrame({"pairs": grouped.size(), "total": grouped[by].sum(),
                         "mean": grouped[by].mean(), "top_share": grouped["_top"].mean()}
                        ).sort_values("total", ascending=False)


# --- figures -----------------------------------------------------------------------------------

def _figure(width: float = 7.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _accuracy_figure(result: ExperimentResult) -> Section:
    groups = _groups(result)
    fig, axes = _figure(5.0, 4.0, len(groups))
    base = result.summary["baseline"]["test_accuracy"]
    methods = result.config.methods
    shift = _dodge(sorted({a["fraction"] * 100 for a in result.summary["arms"]}), len(methods))
    for ax, group in zip(axes, groups):
        for k, method in enumerate(methods):
            arms = sorted((a for a in result.summary["arms"] if a["method"] == method
                           and f"{a['action']} {a['direction']}" == group),
                          key=lambda a: a["fraction"])
            if not arms:
                continue
            x = [a["fraction"] * 100 + shift(k) for a in arms]
            y = [a["test_accuracy"]["mean"] for a in arms]
            err = [a["test_accuracy"]["ci95"] or 0.0 for a in arms]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        ax.axhline(base["mean"], color="black", linestyle="--", linewidth=1, label="no pruning")
        if base["ci95"]:
            ax.axhspan(base["mean"] - base["ci95"], base["mean"] + base["ci95"], color="grey",
                       alpha=0.15)
        ax.set(title=group, xlabel="pairs affected (%)", ylabel="test accuracy")
        ax.legend(fontsize=8)
    return Section("Accuracy against fraction", text=[
        "Mean test accuracy over seeds with 95% intervals; the dashed line and grey band are "
        "the unpruned baseline."], figure="accuracy", figure_png=_png(fig))


def _dodge(fractions: list[float], methods: int) -> Callable[[int], float]:
    """Horizontal offset of method ``k``'s points, so that intervals at the same fraction sit
    side by side instead of on top of each other (within 60% of the gap between fractions)."""
    gap = min((b - a for a, b in itertools.pairwise(fractions)), default=2.0)
    step = 0.6 * gap / max(methods, 1)
    return lambda k: (k - (methods - 1) / 2) * step


def _roc_figure(result: ExperimentResult) -> Section:
    seed = min(result.scores)
    table = result.scores[seed]
    truth = table["label_flipped"].astype(bool).to_numpy()
    fig, (ax,) = _figure(5.5, 5.0)
    for method in result.config.methods:
        fpr, tpr = roc_curve(table[method].to_numpy(), truth)
        ax.plot(fpr, tpr, label=method)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set(title=f"Detecting flipped labels (seed {seed})", xlabel="false positive rate",
           ylabel="true positive rate")
    ax.legend(fontsize=8)
    return Section("Detection curves", figure="detection", figure_png=_png(fig))


def roc_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates as the threshold sweeps from the highest score down."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(truth, dtype=bool)[order]
    tpr = np.concatenate(([0.0], np.cumsum(hits) / max(1, hits.sum())))
    fpr = np.concatenate(([0.0], np.cumsum(~hits) / max(1, (~hits).sum())))
    return fpr, tpr


def _distribution_figure(result: ExperimentResult) -> Section:
    seed = min(result.scores)
    table = result.scores[seed]
    methods = [m for m in result.config.methods if m in table]
    fig, axes = _figure(3.6, 3.2, len(methods))
    truth = table["label_flipped"].astype(bool).to_numpy() if "label_flipped" in table else None
    for ax, method in zip(axes, methods):
        values = table[method].to_numpy(dtype=np.float64)
        bins = np.histogram_bin_edges(values, bins=40)
        if truth is None:
            ax.hist(values, bins=bins, color="tab:blue")
        else:
            ax.hist(values[~truth], bins=bins, alpha=0.6, label="label right")
            ax.hist(values[truth], bins=bins, alpha=0.6, label="label wrong")
            ax.legend(fontsize=7)
        ax.set(title=method, xlabel="harm", ylabel="pairs")
    return Section("Score distributions", text=[
        f"Harm of every training pair by method (seed {seed})."],
        figure="distributions", figure_png=_png(fig))


def _bar_png(stats: pd.DataFrame, column: str, by: str) -> bytes:
    fig, (ax,) = _figure(7.0, 3.6)
    ax.bar([str(i) for i in stats.index], stats["total"].to_numpy())
    ax.set(title=f"summed {by} harm by {column}", ylabel="total harm")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    return _png(fig)
