"""Images per second per CPU core of every data path, on the same 640x480 JPEGs, in one run:

    python benchmarks/data_sources.py [--images 300] [--size 224] [--batch-size 32]

- the seed's PIL pipeline: decode, resize the shorter side, centre-crop, ToTensor, Normalize
- the cache build (`data.cache_workers=1`: one worker process, its start-up included;
  and `data.cache_workers=0`: threads of this process), whole pictures at size x 1.143
- the cache read: an epoch from the cache, the centre square cut at load time (one process)
- webdataset streaming: an epoch over shards written by `mmtrain shards` (decoded while read)
- data=hf: a parquet file with the image bytes, loaded and cached (threads of this process)

Everything runs in one process with one torch thread (the cache build in one worker
process), so each figure is the throughput of one core.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from loader import write_jpegs
from PIL import Image
from torchvision import transforms
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from mmtrain.commands.shards import write_shards
from mmtrain.data.hf import hf
from mmtrain.data.loader import Collate, make_loader
from mmtrain.data.manifest import manifest
from mmtrain.data.shards import webdataset
from mmtrain.data.tokenizer import build_word_tokenizer


def _rate(count: int, seconds: float) -> float:
    return count / seconds


def seed_pipeline(paths: list[Path], size: int) -> float:
    transform = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ]
    )
    started = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            transform(image.convert("RGB"))
    return _rate(len(paths), time.perf_counter() - started)


def build_in_worker(train: Path, size: int, count: int) -> float:
    """The cache build with one worker process, timed in a `python -c` process: a worker
    process re-imports its parent's main script, which for this script means torch,
    transformers and datasets; under `mmtrain` it is the light `mmtrain.__main__`."""
    code = (
        "import time; from mmtrain.data.manifest import manifest; t = time.perf_counter(); "
        f"manifest(image_size={size}, train={str(train)!r}, val={str(train)!r}, cache_workers=1); "
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return _rate(count, float(out.stdout.split()[-1]))


def epoch(split, collate, batch_size: int) -> float:
    loader = make_loader(split, collate, batch_size=batch_size, num_workers=0, shuffle=True, seed=0)
    loader.sampler.set_epoch(0)
    started, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["images"])
    return _rate(count, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        train = write_jpegs(folder, args.images)
        paths = sorted(folder.glob("*.jpg"))
        collate = Collate(build_word_tokenizer(["photo number of a scene"]), 16)
        results["seed PIL pipeline (decode+resize+crop+normalise)"] = seed_pipeline(
            paths, args.size
        )

        results["cache build (1 worker process, whole at x1.143)"] = build_in_worker(
            train, args.size, args.images
        )
        splits = manifest(image_size=args.size, train=str(train), val=str(train), cache_workers=1)
        started = time.perf_counter()
        manifest(image_size=args.size, train=str(train), val=str(train), cache_workers=0,
                 cache_dir=str(folder / "threads_cache"))  # fmt: skip
        # threads of this process: no worker start-up; PIL releases the GIL, so up to the
        # machine's cores (2 here) decode at once
        results["cache build (threads of this process, whole at x1.143)"] = _rate(
            args.images, time.perf_counter() - started
        )
        results["cache read (epoch, centre square cut at load time)"] = epoch(
            splits["train"], collate, args.batch_size
        )

        write_shards([str(train), str(folder / "shards"), "shard_size=50"])
        last = len(list((folder / "shards").glob("*.tar"))) - 1
        pattern = f"{folder}/shards/{{00000..{last:05d}}}.tar"
        streamed = webdataset(image_size=args.size, train=pattern, val=pattern)
        results["webdataset streaming (epoch, decoded in the reader)"] = epoch(
            streamed["train"], collate, args.batch_size
        )

        import datasets

        records: dict = {"text": [f"photo {i}" for i in range(args.images)]}
        records["image"] = [{"bytes": p.read_bytes(), "path": None} for p in paths]
        records["label"] = [0] * args.images
        features = datasets.Features(
            {
                "text": datasets.Value("string"),
                "image": datasets.Image(),
                "label": datasets.Value("int64"),
            }
        )
        (folder / "pq").mkdir()
        datasets.Dataset.from_dict(records, features=features).to_parquet(
            str(folder / "pq" / "train.parquet")
        )
        started = time.perf_counter()
        hf(image_size=args.size, path=str(folder / "pq" / "train.parquet"), val_split="train",
           cache_dir=str(folder / "hf_cache"), cache_workers=0)  # fmt: skip
        results["data=hf (parquet bytes: load + cache build, threads)"] = _rate(
            args.images, time.perf_counter() - started
        )
    print(f"{args.images} JPEGs 640x480 -> {args.size} px, images/s on one core:")
    for name, rate in results.items():
        print(f"  {name:58s} {rate:8.0f}")


if __name__ == "__main__":
    main()
