"""One run per directory, and nothing written through a link planted in one.

The lock is an `flock` on the run directory itself (opened O_DIRECTORY), so the kernel
releases it when its holder dies, however it dies, and no file anyone can delete guards it.
`RUN_DIR/.lock` only names the holder (pid, host, start time, command) for the refusal to
quote; a lock left by a killed run is taken over with a line that says so. A process forked
while the lock is held (a loader worker) closes its copy at once: only the process that
took the lock holds it, so a requeue right after a `kill -9` finds the directory free.

A run directory holding a link out of it is refused (`refuse_links`); every file mmtrain
writes there goes through `mmtrain.runlog.write_file` / `open_append`, which never follow one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from mmtrain.errors import UserError

log = logging.getLogger("mmtrain")

# The descriptors of the locks this process holds; a forked child closes them (see above).
_held: set[int] = set()


def _close_in_child() -> None:
    for fd in _held:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """Hold `run_dir`'s lock for the duration of a `with` block."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        refuse_links(self.run_dir)
        fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _read_holder(self.path) or "unknown"
            raise UserError(
                f"The run directory {self.run_dir} is in use by another run ({holder}). "
                "Wait for it to end, or train into another directory (hydra.run.dir=DIR)."
            ) from None
        _held.add(fd)
        self.fd = fd
        previous = _read_holder(self.path)
        if previous:
            log.info("taking over the lock of a run that is no longer running (%s)", previous)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(["mmtrain", *sys.argv[1:]])[:300]
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {started}: {command}"
        # A new file renamed into place: a link planted as .lock is replaced, not followed.
        fd, tmp = tempfile.mkstemp(dir=self.run_dir, prefix=".lock.", suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            handle.write(holder)
        os.replace(tmp, self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it
            _held.discard(self.fd)
            os.close(self.fd)
            self.fd = None


def _read_holder(path: Path) -> str:
    """The holder line in `path`, read without following a link ('' when there is none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return ""
    try:
        return os.read(fd, 4096).decode(errors="replace").strip()
    finally:
        os.close(fd)


# The folders of a run directory whose files mmtrain itself writes; a tracker's own folder
# (wandb/, tensorboard/) is the tracker's business (W&B links its logs out of the run).
OWN_FOLDERS = (".", ".hydra", "checkpoints", "tokenizer")


def refuse_links(run_dir: Path) -> None:
    """Refuse a run directory holding a symbolic link, where mmtrain writes, that leads out
    of it: mmtrain would write through it to wherever it points."""
    root = Path(run_dir)
    if not root.is_dir():
        return
    inside = root.resolve()
    for folder in OWN_FOLDERS:
        if not (root / folder).is_dir() or (root / folder).is_symlink():
            continue
        for path in (root / folder).iterdir():
            if path.is_symlink() and not path.resolve().is_relative_to(inside):
                raise UserError(
                    f"{path} is a symbolic link (to {os.readlink(path)}); mmtrain does not write "
                    "through links in a run directory. Remove it, or use another run directory."
                )


# Set by a process that holds a run directory's lock for the workers it starts.
LOCK_HELD_ENV = "MMTRAIN_RUN_LOCK_HELD"
