"""Building the decoded-image cache: every image of a manifest decoded and resized once.

`cached_images` returns the cache of one manifest at one resolution (`mmtrain.data.cached`
says what its files hold and opens them), building it when there is none or it is damaged:
the images are decoded whole into a square of L = the model's size x data.cache_scale by
worker processes or threads. The loader cuts the model's input from each whole image at
load time (`geometry`): the processor's centre square, or training's random_resized_crop
box anywhere in the picture.

The key hashes the manifest's bytes, each image's resolved path, size and mtime, the
resolution and the decoding settings: change any of them and the next run builds a new
cache. Both files are written to temporary names and renamed into place (the .json last,
so its presence means the .npy is complete); a lock file makes concurrent sweep jobs wait
for the one that is building instead of decoding the same images twice. SIGTERM/SIGINT
during a build stop it, remove its temporary files and exit with 143/130; temporaries left
by a killed process are removed at the next start.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from mmtrain.data.cached import (
    FORMAT,
    CachedImages,
    DecodedOnRead,
    cache_key,
    decoded_on_read,
    open_cache,
    reuse_cache,
)
from mmtrain.data.images import ImageProblem, decode_chunks, load_whole, source_file
from mmtrain.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no lock; the atomic renames still keep the cache whole
    fcntl = None

log = logging.getLogger("mmtrain")
_CHUNK = 64  # rows per task of a worker process
_TEMP = ".tmp"  # temporary files are named .KEY.PID.tmp.npy / .json


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


def remove_stale_temporaries(cache_dir: Path) -> None:
    """Remove temporary files of builds whose process is gone (killed with SIGKILL, or a
    machine that went down); a live build's files are left alone."""
    for path in cache_dir.glob(f".*{_TEMP}.*"):
        pid = path.name.split(".")[2] if path.name.count(".") >= 4 else ""
        if pid.isdigit() and _alive(int(pid)):
            continue
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        log.info("removed %s (%s bytes), left by a cache build that was killed", path, f"{size:,}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class CacheBuildInterrupted(Exception):
    """SIGTERM or SIGINT arrived during a cache build."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def _interruptible() -> Iterator[None]:
    """Turn SIGTERM/SIGINT into `CacheBuildInterrupted` while a build runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: object) -> None:
        raise CacheBuildInterrupted(signum)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _progress(total: int) -> tuple[object, object]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("[bold]caching images"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:.0f} images/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # standard output is a command's result (validate)
        disable=not log.isEnabledFor(logging.INFO),
        transient=False,
    )
    return bar, bar.add_task("cache", total=total, rate=0.0)


def _decode_into(
    array_path: Path, paths: Sequence[Path | None], size: int, max_pixels: int, workers: int
) -> tuple[list[tuple[str, str] | None], list[int], list[float]]:
    """Decode every path whole into the array file; (problems, crc32s, aspects) per row.
    `workers` > 0: that many worker processes; 0: threads of this process."""
    names = [p if p is None or isinstance(p, bytes) else str(p) for p in paths]
    chunks = [(first, names[first : first + _CHUNK]) for first in range(0, len(names), _CHUNK)]
    results: list[list[tuple[tuple[str, str] | None, int]]] = []
    bar, task = _progress(len(paths))
    started, done = time.perf_counter(), 0
    with bar:
        if workers > 0:
            for chunk in _in_processes(array_path, chunks, size, max_pixels, workers):
                results.append(chunk)
                done += len(chunk[1])
                bar.update(task, completed=done, rate=done / (time.perf_counter() - started))
            results.sort(key=lambda chunk: chunk[0])
            results = [chunk[1] for chunk in results]
        else:
            array = np.load(array_path, mmap_mode="r+")

            def one(row: int) -> tuple[tuple[str, str] | None, int, float]:
                problem, aspect = None, 1.0
                if paths[row] is not None:
                    try:
                        array[row], aspect = load_whole(source_file(paths[row]), size, max_pixels)
                    except ImageProblem as error:
                        problem = (error.reason, error.detail)
                return problem, zlib.crc32(array[row]), aspect

            # PIL releases the GIL while it decodes and resizes: threads decode in parallel.
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                for first, chunk in chunks:
                    results.append(list(pool.map(one, range(first, first + len(chunk)))))
                    done += len(chunk)
                    rate = done / (time.perf_counter() - started)
                    bar.update(task, completed=done, rate=rate)
            array.flush()
            del array
    flat = [item for chunk in results for item in chunk]
    return [p for p, _, _ in flat], [c for _, c, _ in flat], [a for _, _, a in flat]


def _in_processes(
    array_path: Path,
    chunks: list[tuple[int, list[str | None]]],
    size: int,
    max_pixels: int,
    workers: int,
) -> Iterator[tuple[int, list[tuple[tuple[str, str] | None, int]]]]:
    """(first row, per row (problem, crc32)) of each chunk, decoded by `workers` processes
    that each take every workers-th chunk. On any exit (an interrupt too) every worker is
    killed and reaped before this returns, so no process outlives the build."""
    # spawn: a fresh interpreter that imports only PIL and numpy (no torch, no threads to
    # copy), so workers start fast and safely.
    context = multiprocessing.get_context("spawn")
    processes, pipes = [], []
    try:
        for worker in range(min(workers, len(chunks))):
            reader, writer = context.Pipe(duplex=False)
            mine = chunks[worker::workers]
            process = context.Process(
                target=decode_chunks,
                args=(writer, str(array_path), mine, max_pixels),
                daemon=True,
            )
            process.start()
            writer.close()
            processes.append(process)
            pipes.append(reader)
        waiting = dict(zip(pipes, processes, strict=True))
        received = 0
        while received < len(chunks):
            for ready in multiprocessing.connection.wait(list(waiting)):
                try:
                    yield ready.recv()
                    received += 1
                except EOFError:  # the worker ended; fine only if it sent all its chunks
                    process = waiting.pop(ready)
                    process.join()
                    if process.exitcode != 0:
                        raise RuntimeError(
                            f"a cache worker process died (exit code {process.exitcode}); "
                            "out of memory? Lower data.cache_workers."
                        ) from None
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join()


def _check_space(cache_dir: Path, needed: int, rows: int, size: int) -> None:
    free = shutil.disk_usage(cache_dir).free
    log.info(
        "the image cache of %d rows at %d px takes %s on disk (%s free in %s)",
        rows, size, _gb(needed), _gb(free), cache_dir,
    )  # fmt: skip
    if needed > free:
        raise UserError(
            f"The image cache needs {_gb(needed)} but {cache_dir} has {_gb(free)} free. Free "
            "space, point data.cache_dir at a larger disk, or set data.cache=false (images "
            "are then decoded by the loader workers every epoch)."
        )


def _gb(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def _writable(cache_dir: Path) -> None:
    """Create `cache_dir` and prove a file can be written there; a UserError if not."""
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


def _write(
    data: Path, meta: Path, paths: Sequence[Path | None], size: int, max_pixels: int, workers: int
) -> None:
    """Decode `paths` into temporary files and rename them into place as `data` and `meta`
    (the index last); on SIGTERM/SIGINT remove the temporaries and exit with 128 + signal."""
    shape = (len(paths), 3, size, size)
    key, cache_dir = data.stem, data.parent
    temp_data = cache_dir / f".{key}.{os.getpid()}{_TEMP}.npy"
    temp_meta = cache_dir / f".{key}.{os.getpid()}{_TEMP}.json"
    try:
        with _interruptible():
            array = np.lib.format.open_memmap(temp_data, mode="w+", dtype=np.uint8, shape=shape)
            array.flush()
            del array
            problems, crcs, aspects = _decode_into(temp_data, paths, size, max_pixels, workers)
            record = {
                "format": FORMAT,
                "rows": len(paths),
                "shape": list(shape),
                "bytes": temp_data.stat().st_size,
                "size": size,
                "max_image_pixels": max_pixels,
                "problems": problems,
                "crc32": crcs,
                "aspect": aspects,
                "first_image": str(next((p for p in paths if isinstance(p, Path)), "")),
            }
            temp_meta.write_text(json.dumps(record))
            for temp in (temp_data, temp_meta):
                os.chmod(temp, 0o644)  # readable by the other users of a shared cache
            os.replace(temp_data, data)
            os.replace(temp_meta, meta)
    except CacheBuildInterrupted as stop:
        log.error(
            "%s received while building the image cache: stopped; its temporary files are "
            "removed. Nothing was trained.", stop,
        )  # fmt: skip
        raise SystemExit(128 + stop.signum) from None
    finally:
        for temp in (temp_data, temp_meta):
            temp.unlink(missing_ok=True)


def cached_images(
    paths: Sequence[Path | None],
    manifest_bytes: bytes,
    cache_dir: Path,
    size: int,
    max_pixels: int,
    workers: int | None = 0,
    verify: bool = False,
    scale: float = 1.0,
) -> CachedImages:
    """The decoded images of `paths` (None: a row without an image, left as zeros), from
    the cache in `cache_dir` when it is up to date and whole, else decoded now by `workers`
    processes (0: threads of this process; None: chosen by the number of images) and
    cached. `verify` checks every row's checksum of a cache that is reused. Images are kept
    whole at `size` x `scale`."""
    size = max(size, round(size * scale))
    if workers is None:  # automatic: processes pay off beyond a few hundred images
        workers = 0 if len(paths) < 256 else min(8, os.cpu_count() or 1)
    key = cache_key(manifest_bytes, paths, size, max_pixels)
    data, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    found = reuse_cache(data, meta, size, verify)
    if found is not None:
        return found
    _writable(cache_dir)
    with _locked(cache_dir / f"{key}.lock"):
        found = reuse_cache(data, meta, size, verify)  # another job built it while we waited
        if found is not None:
            return found
        remove_stale_temporaries(cache_dir)
        _check_space(cache_dir, len(paths) * 3 * size * size, len(paths), size)
        log.info(
            "decoding %d images at %d px into the cache %s with %s (once; later runs reuse it)",
            len(paths), size, data, f"{workers} worker processes" if workers else "threads",
        )  # fmt: skip
        started = time.perf_counter()
        _write(data, meta, paths, size, max_pixels, workers)
        seconds = time.perf_counter() - started
        log.info(
            "  cached %d images in %.1f s (%.0f images/s)",
            len(paths), seconds, len(paths) / max(seconds, 1e-9),
        )  # fmt: skip
    cached = open_cache(data, meta, size, verify=False)
    cached.built = True
    return cached


def decoded_images(
    sources: Sequence[Path | bytes | None],
    key: bytes,
    cache_dir: Path,
    size: int,
    max_pixels: int,
    options: dict[str, Any],
) -> CachedImages | DecodedOnRead:
    """The images of `sources` as `cache_options` say: from the decoded cache (built once,
    keyed by `key` and the sources, reused after), or, with data.cache=false, decoded by the
    loader on every read."""
    if options["enabled"]:
        return cached_images(
            sources, key, cache_dir, size, max_pixels,
            options["workers"], options["verify"], options["scale"],
        )  # fmt: skip
    return decoded_on_read(sources, size, max_pixels, options["scale"])


def cache_options(cache: bool, workers: int | None, scale: float, verify: bool) -> dict[str, Any]:
    """`data.cache`, `data.cache_workers` and `data.cache_scale` (checked by the sources'
    signatures) as the options `cached_images` takes; `verify` checks every cached pixel."""
    return {"enabled": cache, "workers": workers, "verify": verify, "scale": float(scale)}
