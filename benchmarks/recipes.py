"""The default recipe against the fusions on a suite of tasks nothing was tuned on.

Writes the task suite (`benchmarks/suite.py`: glyphs, colours, counting, relations, scenes)
as manifests and image files, then runs the real command on each, as a user would:

    mmtrain train data=manifest data.train=TASK/train.csv data.val=TASK/val.csv [RECIPE]

for every task x size x recipe x seed, where the recipes are `default` (no key touched),
`concat` (model.fusion=concat) and `cross_attention` (model.fusion=cross_attention), and
`shapes` with the default, and `digits`: scikit-learn's 1,797 handwritten 8x8 digits
(`pip install scikit-learn`; a real data set, 70/30 split, captions naming a digit, half of
them wrong), the kind of small set a user's first run is on. `--recipes previous_default`
runs 0.2.0's default and `--recipes fixed_rate` the one before the rate followed the batch
(lr 1e-3 at any batch, 1,000 steps, no crop) for comparison. Prints a markdown table of the best validation accuracy (the
median over seeds) and the wall time of each run; `--out FILE` appends it to FILE.

    python benchmarks/recipes.py --sizes small large --seeds 0 1 2
    python benchmarks/recipes.py --tasks glyphs --sizes small --recipes default --seeds 0

`--steps N` cuts every run to N optimizer steps (trainer.max_steps=N; the runs go to their
own directories): a quick check that the grid runs, not figures to compare with full runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from suite import TASKS, write_task

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a picture of {}", "the digit {}", "{}", "a handwritten {}")


def write_digits(folder: Path) -> Path:
    """scikit-learn's digits as a matching task: 32 px grey PNGs, train.csv and val.csv."""
    import csv

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if (folder / "val.csv").is_file():
        return folder
    (folder / "images").mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.images))
    cut = int(0.7 * len(order))
    for split, rows in (("train", order[:cut]), ("val", order[cut:])):
        lines = []
        for index in rows:
            grey = (digits.images[index] * 255 / 16).astype(np.uint8)
            name = f"images/{index}.png"
            Image.fromarray(grey).resize((32, 32), Image.Resampling.NEAREST).save(folder / name)
            digit, label = int(digits.target[index]), int(rng.integers(2))
            named = digit if label else (digit + 1 + int(rng.integers(9))) % 10
            template = DIGIT_TEMPLATES[int(rng.integers(len(DIGIT_TEMPLATES)))]
            lines.append((name, template.format(DIGIT_NAMES[named]), label))
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("image", "text", "label"))
            writer.writerows(lines)
    return folder


SIZES = {"small": (1500, 300), "large": (6000, 1000)}  # (train, val) pairs
RECIPES = {
    "default": [],
    "small_data": ["experiment=small_data"],  # a from-scratch ResNet image tower, 800 steps
    "concat": ["model.fusion=concat"],
    "cross_attention": ["model.fusion=cross_attention"],
    # mmtrain 0.2.0's default, for before/after: cross-attention alone, 10 epochs however
    # small the set, every row of a matching task taken as a contrastive pair.
    # The default before the rate followed the batch: 1e-3 at any batch, 1,000 steps, no crop.
    "fixed_rate": [
        "optimizer.lr=1e-3",
        "trainer.min_steps=1000",
        "data.augment.random_resized_crop.p=0",
    ],
    "previous_default": [
        "model.fusion=cross_attention",
        "optimizer.lr=1e-3",
        "trainer.min_steps=null",
        "data.match_label=null",
        "data.augment.random_resized_crop.p=0",
    ],
}
GRID = ["default", "concat", "cross_attention"]  # what --recipes runs unless told


def run_one(
    data: list[str], recipe: str, seed: int, run_dir: Path, threads: int, steps: int | None = None
) -> dict:
    """One `mmtrain train` run (reused when its summary exists), cut to `steps` optimizer
    steps if given; its summary plus the wall time of the whole command."""
    summary = run_dir / "summary.json"
    if not summary.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        command = [
            sys.executable, "-m", "mmtrain", "train", *data, *RECIPES[recipe],
            f"trainer.seed={seed}", f"hydra.run.dir={run_dir}",
            *([f"trainer.max_steps={steps}"] if steps else []),
        ]  # fmt: skip
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"failed: {' '.join(command)}")
        (run_dir / "command_wall_s.txt").write_text(f"{wall:.1f}\n")
    found = json.loads(summary.read_text())
    found["command_wall_s"] = float((run_dir / "command_wall_s.txt").read_text())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="suite_runs", help="suite data and run directories")
    parser.add_argument(
        "--tasks", nargs="+", default=[*TASKS, "shapes", "digits"],
        choices=[*TASKS, "shapes", "digits"],
    )  # fmt: skip
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--recipes", nargs="+", default=GRID, choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", help="append the markdown table to this file")
    parser.add_argument(
        "--steps", type=int, help="cut every run to this many optimizer steps (a quick check)"
    )
    args = parser.parse_args()
    work = Path(args.work).resolve()

    plan = []  # (task, size, recipe, data, seeds' run dirs)
    for task in args.tasks:
        for size in ["default"] if task in ("shapes", "digits") else args.sizes:
            data = []
            if task == "digits":
                folder = write_digits(work / "data" / "digits")
                data = [
                    "data=manifest",
                    f"data.train={folder}/train.csv",
                    f"data.val={folder}/val.csv",
                ]
            elif task != "shapes":
                train, val = SIZES[size]
                folder = write_task(task, work / "data" / size, train, val)
                data = [
                    "data=manifest",
                    f"data.train={folder}/train.csv",
                    f"data.val={folder}/val.csv",
                ]
            for recipe in ["default"] if task == "shapes" else args.recipes:
                plan.append((task, size, recipe, data))

    def job(entry: tuple, seed: int) -> dict:
        task, size, recipe, data = entry
        name = f"{task}-{size}-{recipe}-{seed}" + (f"-steps{args.steps}" if args.steps else "")
        result = run_one(data, recipe, seed, work / "runs" / name, args.threads, args.steps)
        best = result["best"]
        print(
            f"{task} {size} {recipe} seed {seed}: {best['value']} at step {best['step']}",
            flush=True,
        )
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [[pool.submit(job, entry, seed) for seed in args.seeds] for entry in plan]
        rows = []
        for (task, size, recipe, _), started in zip(plan, futures, strict=True):
            results = [future.result() for future in started]
            accuracy = statistics.median(r["best"]["value"] for r in results)
            last = statistics.median(r.get("last", r["final"])["val/accuracy"] for r in results)
            wall = statistics.median(r["command_wall_s"] for r in results)
            rows.append(
                (task, size, recipe, len(results), accuracy, last, results[0]["steps"], wall)
            )

    lines = [
        "| task | size | recipe | seeds | best val acc (median) | last val acc | steps | wall s (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, size, recipe, n, accuracy, last, steps, wall in rows:
        lines.append(
            f"| {task} | {size} | {recipe} | {n} | {accuracy:.3f} | {last:.3f} | {steps} | {wall:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    main()
