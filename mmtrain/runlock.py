"""One run per directory: a lock file that a second run into the same directory finds taken.

The lock is an `flock` on `RUN_DIR/.lock`, so the kernel releases it when its holder dies,
however it dies: a lock left by a killed run is taken over (with a line that says so). The
file names its holder (pid, host, start time, command), which the refusal quotes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import sys
import time
from pathlib import Path

from mmtrain.errors import UserError

log = logging.getLogger("mmtrain")


class RunLock:
    """Hold `run_dir`'s lock for the duration of a `with` block."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(
                    f"The run directory {self.run_dir} is in use by another run ({holder}). "
                    "Wait for it to end, or train into another directory (hydra.run.dir=DIR)."
                ) from None
            # The holder before us may have removed the file between our open and our lock:
            # then this lock guards nothing, so try again with the file that is there now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            log.info("taking over the lock of a run that is no longer running (%s)", previous)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        command = " ".join(["mmtrain", *sys.argv[1:]])[:300]
        holder = f"pid {os.getpid()} on {socket.gethostname()}, since {started}: {command}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: see __enter__
            os.close(self.fd)
            self.fd = None


# Set by a process that holds a run directory's lock for the workers it starts.
LOCK_HELD_ENV = "MMTRAIN_RUN_LOCK_HELD"
