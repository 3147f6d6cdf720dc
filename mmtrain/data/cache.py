"""A decoded-image cache: every image of a manifest, decoded and resized once, memory-mapped.

The cache of one manifest at one resolution is a pair of files in the cache folder:

    KEY.npy    uint8 [N, 3, S, S], one image per manifest row (zeros where it failed)
    KEY.json   per row, null or the [reason, detail] of its image problem; sizes; source

KEY hashes the manifest's bytes, each image's resolved path, size and mtime, the resolution
and the decoding settings: change any of them and the next run builds a new cache. Both
files are written to temporary names and renamed into place (the .json last, so its
presence means the .npy is complete); a lock file makes concurrent sweep jobs wait for the
one that is building instead of decoding the same images twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmtrain.data.images import ImageProblem, load_image
from mmtrain.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no lock; the atomic renames still keep the cache whole
    fcntl = None

log = logging.getLogger("mmtrain")
FORMAT = 1  # bump when the decoding changes, so old caches are not reused
_CHUNK = 1024


@dataclass
class CachedImages:
    """The images of every row (memory-mapped) and, per row, None or (reason, detail)."""

    images: torch.Tensor
    problems: list[tuple[str, str] | None]
    path: Path
    built: bool  # True when this call decoded the images, False when it reused a cache


def cache_key(
    manifest_bytes: bytes, paths: Sequence[Path | None], size: int, max_pixels: int
) -> str:
    """A hash of everything the cached pixels depend on."""
    digest = hashlib.sha256(f"mmtrain-cache-{FORMAT}:{size}:{max_pixels}:".encode())
    digest.update(hashlib.sha256(manifest_bytes).digest())
    for path in paths:
        try:
            stat = os.stat(path) if path is not None else None
        except OSError:
            stat = None
        signature = f"{stat.st_size}:{stat.st_mtime_ns}" if stat else "missing"
        digest.update(f"\n{path}\0{signature}".encode())
    return digest.hexdigest()[:32]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open(data: Path, meta: Path) -> CachedImages:
    problems = [tuple(p) if p else None for p in json.loads(meta.read_text())["problems"]]
    # Copy-on-write: a writable view (torch wants one) that never changes the file.
    array = np.load(data, mmap_mode="c")
    return CachedImages(torch.from_numpy(array), problems, data, built=False)


def _decode_into(
    out: np.ndarray, paths: Sequence[Path | None], size: int, max_pixels: int, threads: int
) -> list[tuple[str, str] | None]:
    def one(row: int) -> tuple[str, str] | None:
        if paths[row] is None:
            return None
        try:
            out[row] = load_image(paths[row], size, max_pixels)
        except ImageProblem as problem:
            return problem.reason, problem.detail
        return None

    problems: list[tuple[str, str] | None] = []
    started, reported = time.perf_counter(), time.perf_counter()
    # PIL releases the GIL while it decodes and resizes, so threads decode in parallel.
    with ThreadPoolExecutor(threads) as pool:
        for first in range(0, len(paths), _CHUNK):
            problems += pool.map(one, range(first, min(first + _CHUNK, len(paths))))
            if time.perf_counter() - reported > 10:
                reported = time.perf_counter()
                rate = len(problems) / (reported - started)
                log.info("  decoded %d/%d images (%.0f/s)", len(problems), len(paths), rate)
    return problems


def cached_images(
    paths: Sequence[Path | None],
    manifest_bytes: bytes,
    cache_dir: Path,
    size: int,
    max_pixels: int,
    threads: int | None = None,
) -> CachedImages:
    """The decoded images of `paths` (None: a row without an image, left as zeros), from
    the cache in `cache_dir` when it is up to date, else decoded now and cached."""
    key = cache_key(manifest_bytes, paths, size, max_pixels)
    data, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if meta.is_file() and data.is_file():
        return _open(data, meta)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".probe-"):
            pass
    except OSError as error:
        raise UserError(
            f"Cannot write the decoded-image cache in {cache_dir} ({error.strerror}). "
            "Set data.cache_dir to a writable folder (it is shared by every run and sweep job "
            "that reads this data)."
        ) from None
    with _locked(cache_dir / f"{key}.lock"):
        if meta.is_file() and data.is_file():  # another job built it while we waited
            return _open(data, meta)
        log.info(
            "decoding %d images at %d px into the cache %s (once; later runs reuse it)",
            len(paths),
            size,
            data,
        )
        started = time.perf_counter()
        handle, temp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}-", suffix=".npy")
        os.close(handle)
        try:
            array = np.lib.format.open_memmap(
                temp, mode="w+", dtype=np.uint8, shape=(len(paths), 3, size, size)
            )
            problems = _decode_into(
                array, paths, size, max_pixels, threads or min(16, os.cpu_count() or 1)
            )
            array.flush()
            del array
            os.chmod(temp, 0o644)  # mkstemp's 0600 would hide the cache from other users
            os.replace(temp, data)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
        record = {
            "format": FORMAT,
            "rows": len(paths),
            "size": size,
            "max_image_pixels": max_pixels,
            "problems": problems,
            "first_image": str(next((p for p in paths if p is not None), "")),
        }
        handle, temp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}-", suffix=".json")
        with os.fdopen(handle, "w") as out:
            json.dump(record, out)
        os.chmod(temp, 0o644)
        os.replace(temp, meta)
        log.info("  cached %d images in %.1f s", len(paths), time.perf_counter() - started)
    cached = _open(data, meta)
    cached.built = True
    return cached
