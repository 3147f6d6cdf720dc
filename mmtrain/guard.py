"""What keeps a run safe around the loop: signals turned into a flag the loop checks, one
run per directory, the checkpoint a resume starts from, and telling a lost rank from a bug.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mmtrain import checkpoint as ckpt
from mmtrain import distributed
from mmtrain.errors import Interrupted, UserError
from mmtrain.runlock import LOCK_HELD_ENV, RunLock

log = logging.getLogger("mmtrain")


# The signals that stop training with a checkpoint: a terminal, `kill`, a scheduler's
# SIGTERM, and the SIGUSR1 that SLURM sends ahead of a preemption (`--signal=USR1@90`).
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignal:
    """Turns SIGTERM/SIGINT/SIGUSR1 (SLURM's warning before preemption) into a flag the loop checks after each step and each validation
    batch.

    A cluster, `timeout` and a terminal signal the whole process group, and a launcher
    (torchrun, trainer.nproc_per_node) forwards the signal once more: repeats within
    `REPEAT_S` seconds count as one. A signal after that stops at once, without saving (the
    last checkpoint stays whole).
    """

    REPEAT_S = 5.0
    stopped_at: float | None = None  # when a signal first stopped this process's training

    def __init__(self):
        self.received: str | None = None
        self.at = 0.0
        self.previous = {}

    def __enter__(self) -> StopSignal:
        for sig in SIGNALS:
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
        StopSignal.stopped_at = self.at
        log.warning("%s received: finishing this step, then saving a checkpoint", self.received)

    def everywhere(self, device: torch.device) -> bool:
        """Whether a signal reached any rank (a collective under DDP: call on every rank)."""
        if distributed.world_size() > 1 and distributed.any_rank(bool(self.received), device):
            self.received = self.received or "SIGTERM"
        return bool(self.received)

    def __exit__(self, kind: type[BaseException] | None, *exc: Any) -> None:
        if kind is not None and not issubclass(kind, (Interrupted, KeyboardInterrupt)):
            hold_signals()  # the run is failing (a lost process, a full disk)
            return
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def hold_signals() -> None:
    """Ignore SIGTERM/SIGINT/SIGUSR1 from now until the process ends: the run is failing and
    writes its summary. When a process or node is lost, the launchers signal the ranks left
    (torchrun's agent does when it loses its rendezvous), and that signal must not cut the
    record short or replace its message; the run ends with its error right after, as the
    signal asked."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def locked(
    run_dir: Path, device: torch.device, claim: Callable[[], None] | None = None
) -> Iterator[None]:
    """Hold the run directory's lock (rank 0) for the run; a second run into the directory is
    refused on every rank. `claim` runs on rank 0 once the lock is held (the first writes
    into the directory: see `mmtrain.launch`). Then clear what a killed run left in
    checkpoints/."""
    main = distributed.is_main()
    lock, refused = RunLock(run_dir), None
    # The process that started this one (the Hydra app, or the launcher of
    # trainer.nproc_per_node) holds the lock and has claimed the directory.
    take = main and os.environ.get(LOCK_HELD_ENV) != str(run_dir)
    if take:
        try:
            lock.__enter__()
            if claim is not None:
                claim()
        except UserError as error:
            lock.__exit__()
            refused = error
    if main and refused is None:
        try:
            _writable(run_dir / "checkpoints")
        except UserError as error:
            refused = error
    if distributed.any_rank(refused is not None, device):
        if take:
            lock.__exit__()
        raise refused or UserError(f"Rank 0 could not take the lock of {run_dir}; see its message.")
    try:
        if main:
            ckpt.remove_stale_temporaries(run_dir / "checkpoints")
        yield
    finally:
        if take:
            lock.__exit__()


# A run directory holds a run when it has any of these.
RUN_MARKERS = ("metrics.jsonl", "summary.json", "checkpoints", ".hydra", "train.log")


def claim(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Make `run_dir` this run's (its lock held): a fresh run into a directory that holds
    another run is refused, unless the user resumes that run or asks to overwrite it, which
    clears its files first. Two runs' metrics and checkpoints never mix."""
    run_dir = Path(run_dir)
    found = [name for name in RUN_MARKERS if _has(run_dir / name)]
    if not found or resume == "auto":
        return
    if resume and Path(resume).resolve().is_relative_to(run_dir.resolve()):
        return  # resuming a checkpoint of this very run
    if not overwrite:
        raise UserError(
            f"The run directory {run_dir} already holds a run ({', '.join(found)}). Resume it "
            f"with `mmtrain resume {run_dir}` (or trainer.resume=auto), clear it with "
            "trainer.overwrite=true, or train into another directory (hydra.run.dir=DIR)."
        )
    log.warning("trainer.overwrite=true: clearing the run in %s first", run_dir)
    for entry in run_dir.iterdir():
        if entry.name == ".lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _has(path: Path) -> bool:
    return any(path.iterdir()) if path.is_dir() else path.exists()


def checkpoint_to_resume(
    resume: str | None, run_dir: Path, sharded: bool = False
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its contents (None, None for a fresh run). With
    `auto`, the newest one in the run directory that loads: a damaged last.pt is skipped,
    with a line, for the newest step_N.pt. `sharded`: the run is trainer.strategy=fsdp, which
    resumes from sharded checkpoints (NAME.dcp folders) only, as ddp from single files."""
    if resume in (None, ""):
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not (path.is_file() or (path / ckpt.STATE_FILE).is_file()):
            raise UserError(
                f"trainer.resume={resume}: no such checkpoint file. Give a .pt path (a .dcp "
                "folder under trainer.strategy=fsdp), or auto with hydra.run.dir=THE_RUN_DIR."
            )
        return path, _of_strategy(ckpt.load(path), path, sharded)
    folder = run_dir / "checkpoints"
    # The other kind's, when there are none of this one's: refused with their strategy.
    candidates = ckpt.resume_candidates(folder, sharded) or ckpt.resume_candidates(folder)
    if not candidates:
        log.info("trainer.resume=auto: no checkpoint in %s, starting fresh", folder)
        return None, None
    for path in candidates:
        try:
            return path, _of_strategy(ckpt.load(path), path, sharded)
        except ckpt.Damaged as error:
            log.warning("trainer.resume=auto: skipping %s: %s", path, error)
    raise UserError(
        f"trainer.resume=auto: no checkpoint in {folder} could be read ({', '.join(p.name for p in candidates)}; "
        "see the lines above). Move them away to start this run afresh, or give one with trainer.resume=PATH."
    )


def _of_strategy(saved: dict[str, Any], path: Path, sharded: bool) -> dict[str, Any]:
    """`saved`, when a run of trainer.strategy=fsdp (`sharded`) or ddp can resume from it."""
    kind = saved.get("format")
    if kind == "consolidated":
        raise UserError(
            f"Cannot resume from {path}: it holds the weights only (the single file that "
            "trainer.strategy=fsdp writes for eval, predict and export). Resume the run from its "
            "sharded checkpoint (trainer.resume=auto, or checkpoints/last.dcp) with trainer.strategy=fsdp."
        )
    if (kind == ckpt.SHARDED) != sharded:
        written, now = ("fsdp", "ddp") if kind == ckpt.SHARDED else ("ddp", "fsdp")
        raise UserError(
            f"Cannot resume from {path}: it was written by trainer.strategy={written}, and this "
            f"run is trainer.strategy={now}. Resume with trainer.strategy={written}."
        )
    return saved


# What a resume restores from its checkpoint rather than from the config: a change there
# would be recorded in the run's config but never used.
RESTORED = ("optimizer.", "scheduler.", "trainer.seed", "trainer.accumulate_grad_batches")


def refuse_ignored_changes(
    saved: dict[str, Any], current: dict[str, Any], path: Path, explicit: list[str]
) -> None:
    """Refuse a resume whose command line changes what the checkpoint restores (the
    optimizer and its learning rate, the schedule, the seed, the accumulation), naming each
    key. `explicit`: the keys (or groups) the user set; a default that changed since the
    checkpoint was written only gets a line saying that the checkpoint's value is in force."""
    old, new = _flat(saved), _flat(current)
    changed = sorted(
        key
        for key in old.keys() | new.keys()
        if key.startswith(RESTORED) and old.get(key) != new.get(key)
    )
    asked = [k for k in changed if any(k == e or k.startswith(f"{e}.") for e in explicit)]
    for key in sorted(set(changed) - set(asked)):
        log.info(
            "resuming with the checkpoint's %s=%r (the default is now %r)",
            key,
            old.get(key),
            new.get(key),
        )
    if asked:
        details = "; ".join(
            f"{k}={old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in asked
        )
        raise UserError(
            f"Cannot resume from {path} with {', '.join(asked)} changed ({details}): a resume "
            "restores these from the checkpoint, so the change would be recorded but not used. "
            "Resume with the run's own values, or start a new run (trainer.resume=null in "
            "another directory) to use the new ones."
        )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


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
