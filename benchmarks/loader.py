"""Loader throughput for one epoch over 640x480 JPEGs: the seed's PIL pipeline against
mmtrain's decoded cache, in the same process, as a ratio.

    python benchmarks/loader.py [--images 400] [--batch-size 64] [--workers 0] [--device cpu]
                                [--repeats 2]

Baseline (the seed's pipeline, per sample): open and decode the JPEG with PIL, resize the
shorter side to 224 and centre-crop, ToTensor, Normalize; batches of float tensors.
mmtrain: `data=manifest` decodes every image once into a memory-mapped uint8 cache at
224 px (built first and timed apart); an epoch then reads uint8 rows from the cache,
tokenizes the captions per batch, and normalises on the device, as training does (the
loader alone, without the normalisation, is reported too).
Both loaders shuffle, use the same batch size and the same number of workers; their epochs
alternate `--repeats` times and the best epoch of each counts (a shared machine's noise
then hits both alike).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mmtrain.data.loader import Collate, make_loader
from mmtrain.data.manifest import manifest
from mmtrain.data.tokenizer import build_word_tokenizer

SIZE = 224


def write_jpegs(folder: Path, count: int) -> Path:
    """`count` 640x480 JPEGs of smooth colour fields with noise (photo-like file sizes)."""
    rng = np.random.default_rng(0)
    rows = []
    ys, xs = np.mgrid[0:480, 0:640]
    for index in range(count):
        base = rng.uniform(0, 255, size=3)
        slope = rng.uniform(-0.3, 0.3, size=(2, 3))
        pixels = base + ys[..., None] * slope[0] + xs[..., None] * slope[1]
        pixels += rng.normal(0, 18, size=pixels.shape)
        name = f"{index:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / name, quality=90)
        rows.append({"image": name, "text": f"photo number {index % 50} of a scene", "label": 0})
    path = folder / "train.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


class SeedPipeline(Dataset):
    """The seed's per-sample PIL path: decode, resize 224, ToTensor, Normalize."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.Resize(SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(SIZE),
                transforms.ToTensor(),
                transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def epoch(batches, per_batch) -> tuple[int, float]:
    """(images, seconds) of one pass over `batches`, `per_batch(batch)` -> its images."""
    started, count = time.perf_counter(), 0
    for batch in batches:
        count += len(per_batch(batch))
    return count, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(OPENAI_CLIP_STD, device=device).view(1, 3, 1, 1) * 255

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        started = time.perf_counter()
        train = write_jpegs(folder, args.images)
        print(f"wrote {args.images} JPEGs of 640x480 in {time.perf_counter() - started:.1f} s")

        paths = sorted(folder.glob("*.jpg"))
        seed_loader = DataLoader(
            SeedPipeline(paths),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.workers,
        )
        started = time.perf_counter()
        split = manifest(image_size=SIZE, train=str(train), val=str(train))["train"]
        build_s = time.perf_counter() - started
        collate = Collate(build_word_tokenizer(split.texts), max_length=77)
        cached_loader = make_loader(
            split,
            collate,
            batch_size=args.batch_size,
            num_workers=args.workers,
            shuffle=True,
            seed=0,
            pin_memory=device.type == "cuda",
        )

        def normalise(batch):
            images = batch["images"].to(device, non_blocking=True)
            return (images.float() - mean) / std

        seed_runs, cached_runs, uint8_runs = [], [], []
        for repeat in range(args.repeats):
            cached_loader.sampler.set_epoch(repeat)
            seed_runs.append(epoch(seed_loader, lambda b: b.to(device)))
            cached_runs.append(epoch(cached_loader, normalise))
            uint8_runs.append(epoch(cached_loader, lambda b: b["images"].to(device)))
        (seed_images, seed_s), (cached_images, cached_s), (uint8_images, uint8_s) = (
            min(runs, key=lambda run: run[1]) for runs in (seed_runs, cached_runs, uint8_runs)
        )

    seed_rate, cached_rate = seed_images / seed_s, cached_images / cached_s
    print(
        f"device {device}, batch {args.batch_size}, {args.workers} workers, "
        f"{torch.get_num_threads()} torch threads, best of {args.repeats} epochs each"
    )
    print(f"seed PIL pipeline:      {seed_rate:9.0f} images/s  ({seed_images} in {seed_s:.2f} s)")
    print(
        f"mmtrain cache (epoch):  {cached_rate:9.0f} images/s  ({cached_images} in {cached_s:.2f} s)"
    )
    print(
        f"  the loader alone:     {uint8_images / uint8_s:9.0f} images/s  (uint8, not normalised)"
    )
    print(f"mmtrain cache build:    {args.images / build_s:9.0f} images/s  (once, {build_s:.2f} s)")
    print(f"ratio (cached / seed):  {cached_rate / seed_rate:9.1f}x")


if __name__ == "__main__":
    main()
