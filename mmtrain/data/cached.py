"""A built image cache as it is read: opened, checked, memory-mapped; or no cache at all.

`mmtrain.data.cache` builds the cache of one manifest at one resolution, a pair of files:

    KEY.npy    uint8 [N, 3, L, L], one whole image per manifest row (zeros where it failed)
    KEY.json   the index: shape, byte size, per row the crc32 of its pixels, its picture's
               width/height and null or the [reason, detail] of its image problem

This module names them (`cache_key`) and opens them (`open_cache`): the index and the
array's size are checked, with `verify` every row's checksum too; a cache that fails is a
`DamagedCache`, which `reuse_cache` discards so that it is built again. With
data.cache=false, `decoded_on_read` stands in for a cache: images decoded when read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmtrain.data.images import ImageProblem, image_header, load_whole, source_file
from mmtrain.errors import UserError

log = logging.getLogger("mmtrain")
FORMAT = 3  # bump when the decoding or the index changes, so old caches are not reused


@dataclass
class CachedImages:
    """The images of every row (memory-mapped) and, per row, None or (reason, detail)."""

    images: torch.Tensor
    problems: list[tuple[str, str] | None]
    path: Path
    built: bool  # True when this call decoded the images, False when it reused a cache
    aspects: torch.Tensor | None = None  # per row, its picture's width / height


class DamagedCache(Exception):
    """A cache whose files do not match their index; the message says how."""


def cache_key(
    manifest_bytes: bytes, paths: Sequence[Path | None], size: int, max_pixels: int
) -> str:
    """A hash of everything the cached pixels depend on."""
    digest = hashlib.sha256(f"mmtrain-cache-{FORMAT}:{size}:{max_pixels}:".encode())
    digest.update(hashlib.sha256(manifest_bytes).digest())
    for path in paths:
        if isinstance(path, bytes):  # an image's encoded bytes (a dataset's): its content
            digest.update(b"\n" + hashlib.sha256(path).digest())
            continue
        try:
            stat = os.stat(path) if path is not None else None
        except OSError:
            stat = None
        signature = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "missing"
        digest.update(f"\n{path}\0{signature}".encode())
    return digest.hexdigest()[:32]


def open_cache(data: Path, meta: Path, size: int, verify: bool) -> CachedImages:
    """The cache in `data`/`meta`; raises DamagedCache when its files disagree with the index."""
    try:
        record = json.loads(meta.read_text())
        rows, problems, crcs = record["rows"], record["problems"], record["crc32"]
        aspects = torch.tensor(record["aspect"], dtype=torch.float64)
        shape = tuple(record["shape"])
        if not (
            len(problems) == len(crcs) == len(aspects) == rows and shape == (rows, 3, size, size)
        ):
            raise ValueError("its lists and shape disagree")
        problems = [tuple(p) if p else None for p in problems]
        expected = record["bytes"]
        if not isinstance(expected, int) or isinstance(expected, bool):
            raise ValueError(f"its byte size {expected!r} is no integer")
    except (OSError, ValueError, KeyError, TypeError) as error:
        # Every field is read here: a field missing (KeyError 'bytes') damages the index.
        raise DamagedCache(f"its index {meta.name} is unreadable ({error!r})") from None
    actual = data.stat().st_size
    if actual != expected:
        raise DamagedCache(f"{data.name} is {actual:,} bytes, its index says {expected:,}")
    try:
        # Copy-on-write: a writable view (torch wants one) that never changes the file.
        array = np.load(data, mmap_mode="c")
    except (OSError, ValueError) as error:
        raise DamagedCache(f"{data.name} is not a readable array ({error})") from None
    if array.shape != shape or array.dtype != np.uint8:
        raise DamagedCache(f"{data.name} holds {array.dtype} {array.shape}, not uint8 {shape}")
    if verify:
        wrong = [row for row in range(rows) if zlib.crc32(array[row]) != crcs[row]]
        if wrong:
            shown = ", ".join(map(str, wrong[:10])) + (" ..." if len(wrong) > 10 else "")
            raise DamagedCache(f"the pixels of {len(wrong)} row(s) fail their checksum ({shown})")
    return CachedImages(torch.from_numpy(array), problems, data, built=False, aspects=aspects)


def reuse_cache(data: Path, meta: Path, size: int, verify: bool) -> CachedImages | None:
    """The cache if it is there and whole; None (after discarding it) when it is damaged."""
    if not (meta.is_file() and data.is_file()):
        return None
    try:
        return open_cache(data, meta, size, verify)
    except DamagedCache as damage:
        log.warning("the image cache %s is damaged: %s; discarding and rebuilding it", data, damage)
        for path in (meta, data):  # the index first: without it the array is never trusted
            path.unlink(missing_ok=True)
        return None


class DecodedOnRead:
    """Images decoded from their files each time one is read (data.cache=false): what the
    loader workers do every epoch instead of reading a cache."""

    def __init__(self, paths: Sequence[Path | None], size: int, max_pixels: int):
        self.paths, self.size, self.max_pixels = list(paths), size, max_pixels
        self.shape = (len(self.paths), 3, size, size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> torch.Tensor:
        path = self.paths[row]
        if path is None:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        try:
            return torch.from_numpy(
                np.ascontiguousarray(load_whole(source_file(path), self.size, self.max_pixels)[0])
            )
        except ImageProblem as problem:
            raise UserError(
                f"{problem.reason}: {problem.detail} (data.cache=false decodes images while "
                "training, so this was not found before; run `mmtrain validate` to check them all)"
            ) from None


def decoded_on_read(
    paths: Sequence[Path | None], size: int, max_pixels: int, scale: float = 1.0
) -> CachedImages:
    """`paths` decoded (whole, at `size` x `scale`) when read, with only their headers
    checked now (cheap: no pixels)."""

    def header(path: Path | None) -> tuple[tuple[str, str] | None, float]:
        return (None, 1.0) if path is None else image_header(path, max_pixels)

    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        found = list(pool.map(header, paths))
    log.info("data.cache=false: %d images are decoded by the loader every epoch", len(paths))
    images = DecodedOnRead(paths, max(size, round(size * scale)), max_pixels)
    aspects = torch.tensor([aspect for _, aspect in found], dtype=torch.float64)
    problems = [problem for problem, _ in found]
    return CachedImages(images, problems, Path(), built=False, aspects=aspects)  # type: ignore[arg-type]
