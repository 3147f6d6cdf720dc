"""What keeps a run safe around the loop: signals turned into a flag the loop checks, one
run per directory, the checkpoint a resume starts from, and telling a lost rank from a bug.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmtrain import checkpoint as ckpt
from mmtrain import distributed
from mmtrain.errors import Interrupted, UserError
from mmtrain.runlock import LOCK_HELD_ENV, RunLock

log = logging.getLogger("mmtrain")


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step and each validation
    batch.

    A cluster, `timeout` and a terminal signal the whole process group, and a launcher
    (torchrun, trainer.nproc_per_node) forwards the signal once more: repeats within
    `REPEAT_S` seconds count as one. A signal after that stops at once, without saving (the
    last checkpoint stays whole).
    """

    REPEAT_S = 5.0

    def __init__(self):
        self.received: str | None = None
        self.at = 0.0
        self.previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:
            if time.monotonic() - self.at < self.REPEAT_S:
                return
            raise Interrupted(
                signal.Signals(signum).name,
                "Stopped at once by a second signal, without saving; the last checkpoint is whole.",
            )
        self.received, self.at = signal.Signals(signum).name, time.monotonic()
        log.warning("%s received: finishing this step, then saving a checkpoint", self.received)

    def everywhere(self, device: torch.device) -> bool:
        """Whether a signal reached any rank (a collective under DDP: call on every rank)."""
        if distributed.world_size() > 1 and distributed.any_rank(bool(self.received), device):
            self.received = self.received or "SIGTERM"
        return bool(self.received)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@contextmanager
def locked(run_dir: Path, device: torch.device) -> Iterator[None]:
    """Hold the run directory's lock (rank 0) for the run; a second run into the directory is
    refused on every rank. Then clear what a killed run left in checkpoints/."""
    main = distributed.is_main()
    lock, refused = RunLock(run_dir), None
    # A launching process (trainer.nproc_per_node) holds the lock for its workers.
    take = main and os.environ.get(LOCK_HELD_ENV) != str(run_dir)
    if main:
        _writable(run_dir / "checkpoints")
    if take:
        try:
            lock.__enter__()
        except UserError as error:
            refused = error
    if distributed.any_rank(refused is not None, device):
        raise refused or UserError(f"Rank 0 could not take the lock of {run_dir}; see its message.")
    try:
        if main:
            ckpt.remove_stale_temporaries(run_dir / "checkpoints")
        yield
    finally:
        if take:
            lock.__exit__()


def checkpoint_to_resume(
    resume: str | None, run_dir: Path
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its contents (None, None for a fresh run). With
    `auto`, the newest one in the run directory that loads: a damaged last.pt is skipped,
    with a line, for the newest step_N.pt."""
    if resume in (None, ""):
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise UserError(
                f"trainer.resume={resume}: no such checkpoint file. Give a .pt path, or auto with hydra.run.dir=THE_RUN_DIR."
            )
        return path, ckpt.load(path)
    folder = run_dir / "checkpoints"
    candidates = ckpt.resume_candidates(folder)
    if not candidates:
        log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", folder)
        return None, None
    for path in candidates:
        try:
            return path, ckpt.load(path)
        except ckpt.Damaged as error:
            log.warning("trainer.resume=auto: skipping %s: %s", path, error)
    raise UserError(
        f"trainer.resume=auto: no checkpoint in {folder} could be read ({', '.join(p.name for p in candidates)}; "
        "see the lines above). Move them away to start this run afresh, or give one with trainer.resume=PATH."
    )


def peer_failure(error: RuntimeError) -> bool:
    """Whether a collective failed because another rank of the job is gone."""
    text = str(error).lower()
    return isinstance(error, torch.distributed.DistError) or any(
        word in text
        for word in ("connection reset", "connection closed", "broken pipe", "gloo", "nccl")
    )


def _writable(folder: Path) -> Path:
    """Create `folder` and prove it takes files, before any training time is spent."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"Cannot write to the run directory {folder.parent} ({error.strerror or error}). "
            "Choose a writable place with hydra.run.dir=DIR (or hydra.sweep.dir=DIR for -m)."
        ) from None
    return folder
