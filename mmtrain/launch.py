"""Starting the processes of a data-parallel job; the command layer calls this, the loop
never does.

Two ways in, one training code path:
- `torchrun --nproc_per_node=N -m mmtrain train ...` starts N processes that each run the
  Hydra app; `shared_run_dir` makes them agree on one run directory before Hydra starts
  (rank 0 picks it).
- `mmtrain train trainer.nproc_per_node=N` (also per multirun job) starts N workers for the
  job through torch's elastic launcher (`launch`), all writing into the job's one directory.
Either way `mmtrain.recipe.fit` runs once per rank.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmtrain.errors import Interrupted, UserError
from mmtrain.runlock import LOCK_HELD_ENV, RunLock
from mmtrain.runlog import resume_command

if TYPE_CHECKING:  # the spec imports every component: not needed to start workers
    from mmtrain.spec import RunSpec

log = logging.getLogger("mmtrain")


def launched() -> bool:
    """Whether this process was started by torchrun or the elastic launcher."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def shared_run_dir(args: list[str]) -> list[str]:
    """Hydra overrides that give every torchrun rank the same run directory.

    Hydra names a run directory by the time it starts, which differs between ranks; rank 0
    picks the name and the others receive it through a TCP store on torchrun's master
    address. Ranks other than 0 write no .hydra folder and no train.log.
    """
    if not launched() or any(a.startswith(("-m", "--multirun")) for a in args):
        return []
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", 0))
    overrides = []
    if not any(a.startswith("hydra.run.dir=") for a in args):
        store = dist.TCPStore(
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ.get("MASTER_PORT", 29500)) + 1,
            int(os.environ["WORLD_SIZE"]),
            is_master=rank == 0,
            timeout=timedelta(seconds=120),
        )
        if rank == 0:
            store.set("run_dir", datetime.now().strftime("outputs/%Y-%m-%d/%H-%M-%S"))
        overrides.append(f"hydra.run.dir={store.get('run_dir').decode()}")
        # Rank 0 hosts the store: it may close it only once every rank has read the name.
        store.add("read", 1)
        deadline = time.monotonic() + 120
        while rank == 0 and store.add("read", 0) < int(os.environ["WORLD_SIZE"]):
            if time.monotonic() > deadline:
                raise UserError("The other ranks did not read the run directory's name in 120 s.")
            time.sleep(0.01)
    if rank != 0:
        overrides += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return overrides


def free_port() -> int:
    """A TCP port nobody listens on, for the elastic launcher's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(config: dict[str, Any], run_dir: str) -> float | dict[str, str]:
    """One elastic-launcher worker: rank 0 logs into the job's train.log; all ranks train."""
    import torch

    from mmtrain.recipe import fit
    from mmtrain.spec import parse

    # Share the cores between the workers, as torchrun does: oversubscribed OpenMP threads
    # spin and slow every process down many times over.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if int(os.environ.get("RANK", 0)) == 0:
        handler = logging.FileHandler(Path(run_dir) / "train.log")
        handler.setFormatter(
            logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
        )
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    else:
        logging.getLogger().setLevel(logging.WARNING)
    for sig in (signal.SIGTERM, signal.SIGINT):  # until the loop takes over: stop at once
        signal.signal(sig, _interrupt)
    sys.unraisablehook = _unraisable
    try:
        return fit(parse(config), Path(run_dir))
    except UserError as error:  # reported by the parent, without the launcher's traceback
        return {"error": str(error)}
    except Interrupted as error:
        return {"interrupted": error.signal_name, "error": str(error)}
    finally:
        # This worker's part is done (its checkpoint and summary are written): a signal now,
        # such as the launcher's SIGTERM when another worker died, ends it quietly instead
        # of raising wherever it lands (a traceback from interpreter shutdown).
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _leave)


def _interrupt(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    raise Interrupted(name, f"Interrupted by {name} before training started; nothing is lost.")


def _leave(signum: int, frame: Any) -> None:
    os._exit(128 + signum)


def _unraisable(unraisable: Any) -> None:
    """Drop an Interrupted that a signal raised inside a finalizer, where it cannot stop
    anything (the launcher's SIGTERM while the job winds down after another worker died):
    the worker is ending anyway, and the traceback would only look like a crash."""
    if not isinstance(unraisable.exc_value, Interrupted):
        sys.__unraisablehook__(unraisable)


def launch(spec: RunSpec, run_dir: Path) -> float:
    """Run `fit` in trainer.nproc_per_node worker processes on this machine; return rank 0's
    result."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = spec.trainer.nproc_per_node
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"mmtrain-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
    )
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    log.info("starting %d workers for this job (trainer.nproc_per_node=%d)", nproc, nproc)
    # The launcher logs a worker's end with its own traceback; mmtrain says it in one line.
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    # This process holds the run directory's lock for its workers (see mmtrain.loop).
    with RunLock(run_dir):
        os.environ[LOCK_HELD_ENV] = str(run_dir)
        try:
            results = elastic_launch(config, _worker)(spec.config, str(run_dir))
        except SignalException as error:
            # The workers got the signal too, finished their step and saved; the launcher
            # forwarded it and waited for them.
            name = signal.Signals(error.sigval).name
            summary = _read_summary(run_dir)
            raise Interrupted(
                name,
                f"Interrupted by {name} at step {summary.get('steps', '?')}; the checkpoint "
                f"{run_dir / 'checkpoints' / 'last.pt'} is saved. Resume with: "
                f"{resume_command(run_dir)}",
            ) from None
        except ChildFailedError as error:
            failed = ", ".join(
                f"rank {rank} ({_how(failure)})" for rank, failure in sorted(error.failures.items())
            )
            raise UserError(
                f"A training process of this job stopped unexpectedly: {failed}. The last checkpoint "
                f"({_newest(run_dir) or 'none yet'}) is whole; resume with: {resume_command(run_dir)}"
            ) from None
        finally:
            os.environ.pop(LOCK_HELD_ENV, None)
    for result in sorted(
        results.values(), key=lambda r: "interrupted" not in r if isinstance(r, dict) else True
    ):
        if isinstance(result, dict) and "interrupted" in result:
            raise Interrupted(result["interrupted"], result["error"])
        if isinstance(result, dict) and "error" in result:
            raise UserError(result["error"])
    return results[0]


def _how(failure: Any) -> str:
    """How a worker process ended, in words (killed by which signal, or its exit code)."""
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    return f"exit code {failure.exitcode}"


def _read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def _newest(run_dir: Path) -> Path | None:
    from mmtrain.checkpoint import newest

    return newest(run_dir / "checkpoints")
