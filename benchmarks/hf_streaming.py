"""Peak memory of training on a Hugging Face dataset, streamed or cached, at two sizes:

    python benchmarks/hf_streaming.py [--images 200 2000] [--pixels 160] [--steps 20]
        [--modes streaming cached] [-- OVERRIDES]

Each size is a local parquet dataset (train files of 200 rows, `validation.parquet` of 32)
of random-noise PNGs of `--pixels` squared (noise: they do not compress, so the bytes are
real). Each run is `mmtrain train data=hf ... trainer.max_steps=STEPS` in its own process,
whose peak resident memory (ru_maxrss) is read when it ends. With `data.streaming=true` the
peak should not follow the data set's size (it holds `--shuffle-buffer` encoded rows at
most, a bound both sizes pass); cached (the default) holds a split's image
bytes while it builds the cache, so its peak grows with it. OVERRIDES go to every run
(e.g. a smaller model).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

ROWS_PER_FILE = 200
NAMES = ("red", "green", "blue")


def _png(rng: np.random.Generator, pixels: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (pixels, pixels, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _write(path: Path, count: int, pixels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = [NAMES[i % 3] for i in range(count)]
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"),
         "label": datasets.ClassLabel(names=list(NAMES))}
    )  # fmt: skip
    rows = {
        "image": [{"bytes": _png(rng, pixels), "path": None} for _ in names],
        "text": [f"a picture that is mostly {name}" for name in names],
        "label": [NAMES.index(name) for name in names],
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))


def write_dataset(folder: Path, images: int, pixels: int) -> int:
    """A parquet dataset of `images` training rows; its size on disk in bytes."""
    folder.mkdir(parents=True)
    for start in range(0, images, ROWS_PER_FILE):
        count = min(ROWS_PER_FILE, images - start)
        _write(folder / f"train-{start // ROWS_PER_FILE:05d}.parquet", count, pixels, start)
    _write(folder / "validation.parquet", 32, pixels, 10**6)
    return sum(f.stat().st_size for f in folder.iterdir())


def peak_rss_mib(argv: list[str], work: Path) -> tuple[float, float]:
    """(peak resident MiB, wall seconds) of `argv` run to its end in `work`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {process.returncode}:\n{output[-4000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs=2, default=[200, 2000])
    parser.add_argument("--pixels", type=int, default=160)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shuffle-buffer", type=int, default=100)
    parser.add_argument("--modes", nargs="+", choices=("streaming", "cached"),
                        default=["streaming", "cached"])  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    peaks: dict[str, list[float]] = {mode: [] for mode in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for images in args.images:
            folder = root / f"pairs_{images}"
            size = write_dataset(folder, images, args.pixels)
            print(f"{images} images of {args.pixels}px: {size / 2**20:.1f} MiB of parquet")
            for mode in args.modes:
                streaming = "true" if mode == "streaming" else "false"
                argv = [
                    sys.executable, "-m", "mmtrain", "train", "data=hf", f"data.path={folder}",
                    f"data.streaming={streaming}", f"data.shuffle_buffer={args.shuffle_buffer}",
                    f"data.cache_dir={root / 'cache'}",
                    f"data.batch_size={args.batch_size}", f"trainer.max_steps={args.steps}",
                    "trainer.device=cpu", f"hydra.run.dir={root / f'run_{mode}_{images}'}",
                    *args.overrides,
                ]  # fmt: skip
                peak, wall = peak_rss_mib(argv, Path.cwd())
                peaks[mode].append(peak)
                print(f"  {mode}, {images} images: peak RSS {peak:.1f} MiB ({wall:.1f} s)")
    for mode, (small, large) in peaks.items():
        print(
            f"{mode}: peak at {args.images[1]} / at {args.images[0]} images: x{large / small:.3f}"
        )


if __name__ == "__main__":
    main()
