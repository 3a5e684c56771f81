"""Render bench/out/peers.json (written by compare.py) as the Markdown table of RESULTS.md.

    python bench/peers/render.py bench/out/peers.json > bench/peers/table.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(figures: dict) -> str:
    lines = [
        f"date {figures['date']}; {figures['machine']}; {figures['cpu_count']} CPUs, torch "
        f"{figures['torch']} on {figures['torch_threads']} thread; model: {figures['model']}; "
        f"{figures['n_train']} train / {figures['n_val']} validation pairs; "
        f"{figures['n_parameters']} parameters θ; damping λ = {figures['damping']:.4g} "
        f"(absolute, from prefprune's run); adapter margin error vs prefprune "
        f"{figures['adapter_max_abs_margin_error']}",
        "",
        "| peer | version | method | curvature | time (s) | time / prefprune CG | "
        "Spearman vs exact | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in figures["results"]:
        if row["status"] == "ok":
            info = row.get("info") or {}
            notes = row.get("notes") or ", ".join(f"{k} {v}" for k, v in info.items())
            lines.append(
                f"| {row['name']} | {row['version']} | {cell(row['method'])} | "
                f"{cell(row['curvature'])} | {row['seconds']:.1f} | "
                f"{row['ratio_to_prefprune_cg']:.2f} | {row['spearman']:.3f} | {cell(notes)} |")
        else:
            lines.append(
                f"| {row['name']} | {row.get('version', '—')} | {cell(row['method'])} | "
                f"{cell(row['curvature'])} | — | — | — | {row['status']}: "
                f"{cell(row.get('error', ''))[:400]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, nargs="?", default=Path("bench/out/peers.json"))
    args = parser.parse_args()
    print(render(json.loads(args.json.read_text())), end="")


if __name__ == "__main__":
    main()
