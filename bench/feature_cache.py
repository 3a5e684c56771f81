"""What the frozen-layer feature cache on disk buys across commands, measured as a user runs them.

On the first ``--pairs`` pairs of a data file, each step is its own ``prefprune`` process, with
a fresh feature cache folder:

1. ``train`` (cold): the frozen layers run for every sequence; its training epoch is the
   reference (``cold_epoch``).
2. ``train`` again into another folder (warm): every feature comes from disk; the ratio of its
   epoch to the cold one is the cache's gain on training.
3. ``score`` right after (CG-IF and the other default scores): its time over all stages as a
   ratio to the cold epoch; it should run no frozen layer.
4. ``score`` again: no frozen layer, and no gradient pass either (its shards are saved).

    python bench/feature_cache.py ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz \\
        --pairs 400 --out bench/out/feature_cache.json [--backbone smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prefprune(*args: object) -> tuple[dict, float]:
    """Run one command with ``--json``; its output and wall seconds."""
    command = [str(Path(sys.executable).with_name("prefprune")), *map(str, args), "--json",
               "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout), seconds


def first_lines(source: Path, count: int, target: Path) -> Path:
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt", encoding="utf-8") as handle:
        lines = [next(handle) for _ in range(count)]
    target.write_text("".join(lines), encoding="utf-8")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/out/feature_cache.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="prefprune-bench-") as scratch:
        root = Path(scratch)
        data = first_lines(args.data, args.pairs, root / "pairs.jsonl")
        common = ["--feature-cache", root / "features", "--epochs", "1"]
        if args.backbone:
            common += ["--backbone", args.backbone]
        cold, cold_wall = prefprune("train", data, "--output", root / "cold", *common)
        warm, warm_wall = prefprune("train", data, "--output", root / "warm", *common)
        score_args = ["score", data, "--model", root / "cold", "--output"]
        runtime = ["--feature-cache", root / "features"]
        scored, score_wall = prefprune(*score_args, root / "s.parquet", *runtime)
        again, again_wall = prefprune(*score_args, root / "s.parquet", *runtime, "--overwrite")
    cold_epoch = cold["train"]["epoch_seconds"][0]
    warm_epoch = warm["train"]["epoch_seconds"][0]
    timings = scored["metadata"]["timings_seconds"]
    result = {
        "pairs": args.pairs, "backbone": args.backbone or "all-MiniLM-L6-v2",
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "cold_epoch_seconds": cold_epoch, "warm_epoch_seconds": warm_epoch,
        "warm_to_cold_epoch": warm_epoch / cold_epoch,
        "score_seconds_all_stages": sum(timings.values()), "score_timings": timings,
        "score_to_cold_epoch": sum(timings.values()) / cold_epoch,
        "frozen_layers": {"cold_train": cold["frozen_layers"], "warm_train":
                          warm["frozen_layers"], "score": scored["metadata"]["frozen_layers"],
                          "score_again": again["metadata"]["frozen_layers"]},
        "score_again_gradient_pairs": again["metadata"]["pairs_through_gradient_passes"],
        "wall_seconds": {"cold_train": cold_wall, "warm_train": warm_wall, "score": score_wall,
                         "score_again": again_wall},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
