"""End to end: `mmtrain train data=manifest` on generated 640x480 JPEGs with 10-15 word
captions, the decoded cache's build timed apart from training.

1. Writes --pairs JPEGs (smooth colour fields with noise, photo-like file sizes) and a train
   and a val manifest whose captions have 10-15 words; the label says whether the caption
   names the image's dominant colour, so the task is learnable.
2. Builds the cache through the public command (`mmtrain validate`, which reads and
   decodes every row the way a run does) and times it.
3. Trains with `mmtrain train` for --steps steps (CLIP ViT-B/32 sizes from a config, concat
   head, --batch-size, bf16 on CUDA) and reads the run's own summary.json: samples/s over
   the training steps (validation and saving excluded), wall time, status.

    python benchmarks/e2e.py --device cuda --pairs 20000 --steps 300 --json e2e.json
    python benchmarks/e2e.py --device cpu --pairs 256 --steps 6 --batch-size 16 --model small
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import MODELS
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
FILLER = ["a", "photo", "taken", "outside", "on", "a", "quiet", "afternoon", "with", "soft",
          "light", "and", "some", "noise"]  # fmt: skip


def _write_image(task: tuple[Path, int, str]) -> None:
    path, index, colour = task
    rng = np.random.default_rng(index)
    ys, xs = np.mgrid[0:480, 0:640]
    slope = rng.uniform(-0.08, 0.08, size=(2, 3))
    pixels = np.array(COLOURS[colour]) + ys[..., None] * slope[0] + xs[..., None] * slope[1]
    pixels += rng.normal(0, 18, size=pixels.shape)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write_pairs(folder: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """JPEGs (written by every core) and train/val manifests (9:1); returns the manifests."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    rows, tasks = [], []
    for index in range(count):
        colour = names[index % len(names)]
        name = f"{index:06d}.jpg"
        tasks.append((folder / name, index, colour))
        match = index % 2 == 0
        said = colour if match else names[(names.index(colour) + 1 + index % 3) % len(names)]
        words = int(rng.integers(8, 14))  # 10-15 words with the two below
        caption = " ".join([*FILLER[:words], "mostly", said])
        rows.append({"image": name, "text": caption, "label": int(match)})
    with multiprocessing.Pool() as pool:
        pool.map(_write_image, tasks, chunksize=64)
    split = count * 9 // 10
    paths = []
    for name, part in (("train.csv", rows[:split]), ("val.csv", rows[split:])):
        with open(folder / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["image", "text", "label"])
            writer.writeheader()
            writer.writerows(part)
        paths.append(folder / name)
    return paths[0], paths[1]


def mmtrain(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    return subprocess.run(
        [sys.executable, "-m", "mmtrain", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--model", choices=tuple(MODELS), default="vit-b32")
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=min(12, os.cpu_count() or 1))
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--workdir", type=Path, help="keep the images and runs here")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mmtrain-e2e-"))
    (work / "images").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, val = write_pairs(work / "images", args.pairs)
    written = time.perf_counter() - started
    data = [
        "data=manifest", f"data.train={train}", f"data.val={val}",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.num_workers}",
    ]  # fmt: skip
    common = [*data, *MODELS[args.model], f"trainer.device={args.device}"]

    started = time.perf_counter()
    built = mmtrain("validate", *common, timeout=3600)
    cache_s = time.perf_counter() - started
    if built.returncode != 0:
        sys.exit(f"cache build failed:\n{built.stderr[-3000:]}")

    run_dir = work / "run"
    started = time.perf_counter()
    trained = mmtrain(
        "train", *common, f"trainer.precision={args.precision}", f"trainer.compile={str(args.compile).lower()}",
        f"trainer.max_steps={args.steps}", "trainer.max_epochs=1000", f"trainer.log_every_n_steps={max(args.steps // 10, 1)}",
        f"trainer.val_every_n_steps={args.steps}", f"hydra.run.dir={run_dir}",
        timeout=3600,
    )  # fmt: skip
    train_wall = time.perf_counter() - started
    if trained.returncode != 0:
        sys.exit(f"training failed:\n{trained.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {
        "device": args.device,
        "model": args.model,
        "pairs": args.pairs,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "steps": summary["steps"],
        "jpeg_write_s": round(written, 1),
        "cache_build_s": round(cache_s, 1),
        "cache_build_images_per_s": round(args.pairs / cache_s, 1),
        "train_wall_s": round(train_wall, 1),
        "mmtrain_e2e_samples_per_s": summary["samples_per_s"],
        "final": summary["final"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
