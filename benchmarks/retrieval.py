"""Memory and time of recall@k over N image-text pairs: mmtrain's block-wise scoring
(`mmtrain.retrieval.recall_at_k`) against the full N x N computation it replaced, in the same
process; and a Flickr30k/COCO-shaped set (5 captions per image) scored by their protocol.

    python benchmarks/retrieval.py [--pairs 100000] [--dim 512] [--full-pairs 10000]
                                   [--images 1000] [--device cpu|cuda] [--threads 2]

The embeddings (normalised, float32, with duplicate captions) are made first; "extra" is the
peak resident memory (CPU: VmRSS sampled every 5 ms; CUDA: torch.cuda.max_memory_allocated)
above what they already use. The full computation (the similarity and match matrices,
N x N x 5 bytes) runs at --full-pairs only (at 100,000 pairs it would need 50 GB); both
methods are run there and must agree exactly.

The 5-captions case (--images images, 5 x as many captions, as Flickr30k's 1,000-image test
split) scores each unique image against every caption (a hit: any of its 5) and each caption
against the unique images, block-wise, against a full-matrix computation of the same protocol
(they must agree), and prints what counting every row as an image of its own would report.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch

from mmtrain.retrieval import BUDGET_BYTES, recall_at_k

MiB = 2**20


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


class PeakMemory:
    """The peak memory above the level at entry, while the block runs."""

    def __init__(self, device: torch.device):
        self.device, self.extra, self._stop = device, 0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = rss_bytes()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self.thread.join()
            self.extra = max(self.peak, rss_bytes()) - self.base


def pairs(n: int, dim: int, device: torch.device, seed: int = 0):
    """n pairs, texts near their images, captions from a pool of n/2 (many duplicates)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    captions = torch.randint(n // 2, (n,), generator=generator, device=device)
    pool = torch.randn(n // 2, dim, generator=generator, device=device)
    texts = torch.nn.functional.normalize(pool[captions], dim=-1)
    del pool
    noise = torch.randn(n, dim, generator=generator, device=device)
    images = torch.nn.functional.normalize(texts + 6.0 * noise / dim**0.5, dim=-1)
    del noise
    return images, texts, captions


def full_matrix(images, texts, groups, ks=(1, 5)):
    """The replaced computation: the whole similarity and match matrices."""
    similarity = images @ texts.T
    same = groups[:, None] == groups[None, :]
    values = {}
    for k in ks:
        top_texts = similarity.topk(k, dim=1).indices
        top_images = similarity.topk(k, dim=0).indices.T
        values[f"recall@{k}_i2t"] = float(same.gather(1, top_texts).any(1).float().mean())
        values[f"recall@{k}_t2i"] = float(same.gather(1, top_images).any(1).float().mean())
    return values


CAPTIONS_PER_IMAGE = 5


def flickr_shaped(images: int, dim: int, device: torch.device, seed: int = 1):
    """`images` image embeddings, each with 5 captions near it (rows: image i's captions are
    rows 5i..5i+4, the image embedding repeated on each), as a Flickr30k/COCO split."""
    generator = torch.Generator(device=device).manual_seed(seed)
    pictures = torch.randn(images, dim, generator=generator, device=device)
    pictures = torch.nn.functional.normalize(pictures, dim=-1)
    image_ids = torch.arange(images, device=device).repeat_interleave(CAPTIONS_PER_IMAGE)
    noise = torch.randn(len(image_ids), dim, generator=generator, device=device)
    texts = torch.nn.functional.normalize(pictures[image_ids] + 0.4 * noise, dim=-1)
    return pictures[image_ids], texts, image_ids


def full_matrix_protocol(images, texts, image_ids, ks=(1, 5)):
    """The protocol on whole matrices: [unique images, captions] scores and their hits."""
    first = [int((image_ids == i).nonzero()[0]) for i in range(int(image_ids.max()) + 1)]
    similarity = images[first] @ texts.T  # [U, N]
    own = torch.arange(len(first), device=images.device)[:, None] == image_ids[None, :]
    values = {}
    for k in ks:
        top_texts = similarity.topk(k, dim=1).indices  # [U, k] captions
        top_images = similarity.topk(k, dim=0).indices.T  # [N, k] images
        values[f"recall@{k}_i2t"] = float(own.gather(1, top_texts).any(1).float().mean())
        values[f"recall@{k}_t2i"] = float((top_images == image_ids[:, None]).any(1).float().mean())
    return values


def captions_per_image_case(count: int, dim: int, device: torch.device) -> None:
    """Flickr30k/COCO-shaped: the protocol, block-wise and on full matrices, and per row."""
    images, texts, image_ids = flickr_shaped(count, dim, device)
    captions = torch.arange(len(texts), device=device)  # every caption its own text
    print(f"\n{count:,} images x {CAPTIONS_PER_IMAGE} captions x {dim}-d (Flickr30k/COCO-shaped)")
    full, _, _ = measure(
        "protocol, full matrices",
        lambda: full_matrix_protocol(images, texts, image_ids),
        device,
    )
    blocks, _, _ = measure(
        "protocol, blocks (mmtrain)",
        lambda: recall_at_k(images, texts, captions, image_ids=image_ids),
        device,
    )
    print("identical results (5 captions per image):", full == blocks)
    measure(
        "each row its own image (not the protocol)",
        lambda: recall_at_k(images, texts, captions),
        device,
    )


def measure(name, fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with PeakMemory(device) as memory:
        values = fn()
    seconds = time.perf_counter() - start
    print(
        f"{name:<42} extra peak {memory.extra / MiB:8.1f} MiB  {seconds:7.1f} s  "
        + "  ".join(f"{k} {v:.4f}" for k, v in values.items()),
        flush=True,
    )
    return values, memory.extra, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--full-pairs", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device {device}, {torch.get_num_threads()} threads, block budget {BUDGET_BYTES // MiB} MiB"
    )

    n = args.full_pairs
    images, texts, captions = pairs(n, args.dim, device)
    groups = torch.unique(captions, return_inverse=True)[1]
    print(f"\n{n:,} pairs x {args.dim}-d (embeddings: {2 * images.numel() * 4 / MiB:.0f} MiB)")
    full, _, _ = measure(
        "full N x N matrices (replaced)", lambda: full_matrix(images, texts, groups), device
    )
    blocks, _, _ = measure("blocks (mmtrain)", lambda: recall_at_k(images, texts, groups), device)
    print("identical results:", full == blocks)
    del images, texts, captions, groups

    captions_per_image_case(args.images, args.dim, device)

    n = args.pairs
    images, texts, captions = pairs(n, args.dim, device)
    groups = torch.unique(captions, return_inverse=True)[1]
    print(f"\n{n:,} pairs x {args.dim}-d (embeddings: {2 * images.numel() * 4 / MiB:.0f} MiB)")
    print(f"full N x N matrices (replaced)     would need {n * n * 5 / 2**30:.1f} GiB: not run")
    measure("blocks (mmtrain)", lambda: recall_at_k(images, texts, groups), device)


if __name__ == "__main__":
    main()
