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
from mmtrain.runlog import RunLogFile, resume_command, start_run_log, write_file, write_json

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
    address. Ranks other than 0 write no .hydra folder and no train.log. Tasks that `srun`
    started without torchrun first take torchrun's variables from SLURM's (`adopt_slurm`).
    """
    if not any(a.startswith(("-m", "--multirun")) for a in args):
        adopt_slurm()
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
        overrides += ["hydra/job_logging=disabled"]
    return overrides


# Hydra plugins by the override that selects them: (their module, the extra installing it).
PLUGINS = {
    "hydra/launcher=submitit": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "sweep"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
}


def require_plugins(args: list[str]) -> None:
    """Refuse a launcher or sweeper whose Hydra plugin is missing, with its install command."""
    from importlib.util import find_spec

    for arg in args:
        for selector, (module, extra) in PLUGINS.items():
            if arg.lstrip("+").startswith(selector) and find_spec(module) is None:
                name = module.split(".")[1].replace("_", "-")
                raise UserError(f"{arg} needs the {name} plugin: pip install 'mmtrain[{extra}]'")


def adopt_slurm() -> None:
    """torchrun's variables from SLURM's for one of several `srun` tasks (env:// as usual)."""
    from mmtrain.distributed import from_slurm

    os.environ.update(from_slurm(os.environ))


# The .hydra folder's name the user asked for (hydra.output_subdir), for `_write_hydra_files`.
OUTPUT_SUBDIR_ENV = "MMTRAIN_OUTPUT_SUBDIR"
_started = time.time()


def defer_run_files(args: list[str]) -> tuple[list[str], list[str]]:
    """`args` without hydra.output_subdir, and the overrides that turn Hydra's own writes into the run directory turned off: its .hydra folder
    would overwrite a run that then turns out to hold the directory's lock. mmtrain writes
    the folder itself once the lock is held (`claim`)."""
    global _started
    _started = time.time()
    kept = [a for a in args if not a.startswith("hydra.output_subdir=")]
    asked = [a.split("=", 1)[1] for a in args if a.startswith("hydra.output_subdir=")]
    os.environ[OUTPUT_SUBDIR_ENV] = asked[-1] if asked else ".hydra"
    return kept, ["hydra.output_subdir=null"]


def start(spec: RunSpec, cfg: Any, run_dir: Path) -> float:
    """Train `spec` (composed as `cfg`) into `run_dir`, from the Hydra app: take the
    directory's lock, then claim it (see `claim`), then train in this process or in
    trainer.nproc_per_node workers. Under torchrun, rank 0 does the same inside `fit`."""
    from hydra.core.hydra_config import HydraConfig

    from mmtrain.recipe import EXPLICIT_KEYS_ENV, fit

    overrides = HydraConfig.get().overrides.task
    keys = [str(o).split("=", 1)[0].lstrip("+~") for o in overrides if "=" in str(o)]
    os.environ[EXPLICIT_KEYS_ENV] = ",".join(keys)

    def claimed() -> None:
        claim(spec, cfg, run_dir)

    if launched():
        return fit(spec, run_dir, claimed)
    with RunLock(run_dir):
        claimed()
        os.environ[LOCK_HELD_ENV] = str(run_dir)
        try:
            if spec.trainer.nproc_per_node > 1:
                return launch(spec, run_dir)
            return fit(spec, run_dir)
        finally:
            os.environ.pop(LOCK_HELD_ENV, None)


def claim(spec: RunSpec, cfg: Any, run_dir: Path) -> None:
    """The first writes into `run_dir`, its lock held: refuse (or clear, with
    trainer.overwrite) another run's files, then the .hydra folder and train.log."""
    from mmtrain.guard import claim as claim_directory

    claim_directory(run_dir, spec.trainer.resume, spec.trainer.overwrite)
    _write_hydra_files(cfg, run_dir)
    start_run_log()


def _write_hydra_files(cfg: Any, run_dir: Path) -> None:
    """config.yaml, hydra.yaml and overrides.yaml, as Hydra writes them, into the folder
    hydra.output_subdir names (none when it is null)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    subdir = os.environ.get(OUTPUT_SUBDIR_ENV, ".hydra")
    if subdir in ("null", "None", "~", ""):
        return
    hydra_cfg = OmegaConf.create(OmegaConf.to_container(HydraConfig.instance().cfg))
    with open_dict(hydra_cfg):
        hydra_cfg.hydra.output_subdir = subdir
    folder = Path(run_dir) / subdir
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (
        ("config.yaml", cfg),
        ("hydra.yaml", hydra_cfg),
        ("overrides.yaml", hydra_cfg.hydra.overrides.task),
    ):
        write_file(folder / name, OmegaConf.to_yaml(content))


def record_refused_job(cfg: Any, run_dir: Path, error: BaseException) -> None:
    """A sweep job refused before it started (its config, say) still gets its .hydra folder
    and a failed summary.json, so that `mmtrain report` lists it with its overrides: only in
    a job folder this command just made, which holds nothing else."""
    run_dir = Path(run_dir)
    try:
        if any(run_dir.iterdir()) or run_dir.stat().st_mtime < _started - 1:
            return
        with RunLock(run_dir):
            _write_hydra_files(cfg, run_dir)
            write_json(run_dir / "summary.json", {"status": "failed", "error": str(error)})
    except (OSError, UserError):
        pass  # the error itself is what the sweep reports


def remove_if_unused(run_dir: Path) -> None:
    """Remove `run_dir`, and the folders above it inside the working directory, when this
    command created them and left them empty (a config refused before the run started
    leaves no outputs/DATE/TIME behind)."""
    folder, cwd = Path(run_dir).absolute(), Path.cwd()
    while folder != cwd and (folder == Path(run_dir).absolute() or folder.is_relative_to(cwd)):
        try:
            if folder.stat().st_mtime < _started - 1 or any(folder.iterdir()):
                return
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def free_port() -> int:
    """A TCP port nobody listens on, for the elastic launcher's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(config: dict[str, Any], run_dir: str) -> float | dict[str, str]:
    """One elastic-launcher worker: rank 0 logs into the job's train.log; all ranks train."""
    import torch

    from mmtrain.guard import SIGNALS
    from mmtrain.recipe import fit
    from mmtrain.spec import parse

    # Share the cores between the workers, as torchrun does: oversubscribed OpenMP threads
    # spin and slow every process down many times over.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    if int(os.environ.get("RANK", 0)) == 0:
        handler = RunLogFile(str(Path(run_dir) / "train.log"), start=True)
        handler.setFormatter(
            logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
        )
        logging.getLogger().addHandler(handler)
        logging.getLogger().setLevel(logging.INFO)
    else:
        logging.getLogger().setLevel(logging.WARNING)
    for sig in SIGNALS:  # until the loop takes over: stop at once
        signal.signal(sig, _interrupt)
    sys.unraisablehook = _unraisable
    try:
        return fit(parse(config), Path(run_dir))
    except UserError as error:  # reported by the parent, without the launcher's traceback
        return {"error": str(error)}
    except Interrupted as error:
        # The signal reached the launcher too, which then reads no result: it waits for
        # this process to end (up to 30 s, torch elastic's shutdown timeout), and a returned
        # worker would sit in torch's queue until then. The checkpoint and summary are
        # written: end now, as the signal asked.
        logging.shutdown()
        os._exit(128 + signal.Signals[error.signal_name].value)
    finally:
        # This worker's part is done (its checkpoint and summary are written): a signal now,
        # such as the launcher's SIGTERM when another worker died, ends it quietly instead
        # of raising wherever it lands (a traceback from interpreter shutdown).
        for sig in SIGNALS:
            signal.signal(sig, _leave)


def _interrupt(signum: int, frame: Any) -> None:
    from mmtrain.guard import StopSignal

    if StopSignal.stopped_at is not None:  # the run stopped on a signal and is ending
        if time.monotonic() - StopSignal.stopped_at < StopSignal.REPEAT_S:
            return  # the same signal again (see StopSignal)
        logging.shutdown()  # a second one: end now, quietly (the last checkpoint is whole)
        os._exit(128 + signum)
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
    # The caller (`start`) holds the run directory's lock for the workers.
    started = time.time()
    try:
        results = elastic_launch(config, _worker)(spec.config, str(run_dir))
    except SignalException as error:
        # The workers got the signal too, finished their step and saved; the launcher
        # forwarded it and waited for them.
        name = signal.Signals(error.sigval).name
        raise Interrupted(name, interrupted_message(name, run_dir)) from None
    except ChildFailedError as error:
        codes = {failure.exitcode for failure in error.failures.values()}
        from mmtrain.guard import SIGNALS

        stopped = {128 + sig for sig in SIGNALS}
        if codes <= stopped:  # the workers stopped on a signal, saved and left (see _worker)
            name = signal.Signals(max(codes) - 128).name
            raise Interrupted(name, interrupted_message(name, run_dir)) from None
        failed = ", ".join(
            f"rank {rank} ({_how(failure)})" for rank, failure in sorted(error.failures.items())
        )
        message = (
            f"A training process of this job stopped unexpectedly: {failed}. The last checkpoint "
            f"({_newest(run_dir) or 'none yet'}) is whole; resume with: {resume_command(run_dir)}"
        )
        summarise_failure(run_dir, message, since=started)
        raise UserError(message) from None
    for result in sorted(
        results.values(), key=lambda r: "interrupted" not in r if isinstance(r, dict) else True
    ):
        if isinstance(result, dict) and "interrupted" in result:
            raise Interrupted(result["interrupted"], result["error"])
        if isinstance(result, dict) and "error" in result:
            raise UserError(result["error"])
    return results[0]


def interrupted_message(name: str, run_dir: Path) -> str:
    """What a signal to the job left: the checkpoint its workers saved, or that none exists
    (the signal came while they were starting)."""
    summary, newest = _read_summary(run_dir), _newest(run_dir)
    if summary.get("status") == "interrupted" and newest is not None:
        return (
            f"Interrupted by {name} at step {summary.get('steps', '?')}; the checkpoint {newest} "
            f"is saved. Resume with: {resume_command(run_dir)}"
        )
    if newest is not None:
        return (
            f"Interrupted by {name} before its workers saved; the last checkpoint ({newest}) is "
            f"whole. Resume with: {resume_command(run_dir)}"
        )
    return f"Interrupted by {name} while the workers were starting; no checkpoint was written, nothing to resume."


def summarise_failure(run_dir: Path, message: str, since: float) -> None:
    """Write summary.json for a job whose rank 0 died before writing one (killed, say):
    status failed, the message, the newest checkpoint."""
    summary = Path(run_dir) / "summary.json"
    if summary.is_file() and summary.stat().st_mtime >= since:
        return  # rank 0 wrote it
    newest = _newest(run_dir)
    try:
        write_json(
            summary,
            {
                "status": "failed",
                "error": message,
                "last_checkpoint": str(newest) if newest else None,
            },
        )
    except (OSError, UserError) as problem:
        log.warning("could not write %s: %s", summary, problem)


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
