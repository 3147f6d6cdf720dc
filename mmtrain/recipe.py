"""The training recipe: set a run up, train it, write what it ended with.

`fit` is torchtune's setup()/train() split: `mmtrain.assemble` builds every object of the
run from its spec, a checkpoint is restored if the run resumes, `mmtrain.loop.train_loop`
steps it, and `finish` writes summary.json and the curves and tells the trackers how the
run ended.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch

from mmtrain import assemble, distributed, loggers, sharding
from mmtrain import checkpoint as ckpt
from mmtrain.data.source import load_class_names
from mmtrain.devices import resolve_device, resolve_precision, seed_everything
from mmtrain.errors import Interrupted, UserError
from mmtrain.guard import (
    checkpoint_to_resume,
    hold_signals,
    locked,
    peer_failure,
    refuse_ignored_changes,
)
from mmtrain.loop import Outputs, Throughput, TrainState, train_loop
from mmtrain.releases import upgrade
from mmtrain.run import Run
from mmtrain.runlog import MetricsLog, plot_curves, resume_command, write_json
from mmtrain.spec import RunSpec

log = logging.getLogger("mmtrain")


def fit(spec: RunSpec, run_dir: Path, claim: Callable[[], None] | None = None) -> float:
    """Train as `spec` says, writing everything into `run_dir`; return the best monitored
    value. Under torchrun (or trainer.nproc_per_node) every rank runs this; only rank 0
    writes. `claim`: rank 0's first writes, once it holds the directory's lock."""
    started = time.perf_counter()
    trainer, run_dir = spec.trainer, Path(run_dir)
    _worker_deaths_where_data_is_read()
    device = resolve_device(trainer.device)
    with distributed.process_group(device), locked(run_dir, device, claim), ExitStack() as stack:
        main = distributed.is_main()
        sharded = trainer.strategy == "fsdp"
        resume_from, saved = checkpoint_to_resume(trainer.resume, run_dir, sharded)
        state = TrainState()
        if saved is not None:
            ckpt.check_compatible(upgrade(saved["config"]), spec.config, resume_from)
            refuse_ignored_changes(
                upgrade(saved["config"]), spec.config, resume_from, explicit_keys()
            )
            state = TrainState.from_checkpoint(saved, resume_from)
        # The same seed on every rank, so dropout noise stays in step across ranks.
        seed_everything(trainer.seed)
        world = distributed.world_size()
        log.info(
            "run directory: %s (device %s, precision %s, %d process%s, process group: %s)",
            run_dir, device, resolve_precision(trainer.precision, device), world,
            "es" if world > 1 else "", distributed.backend(),
        )  # fmt: skip
        if main and device.type == "cpu":
            cpu_threads_note(world)
        # A resumed run keeps its label mapping (labels.json), on every rank.
        class_names = load_class_names(run_dir) if saved is not None else None
        run = assemble.training_run(spec, run_dir if main else None, device, class_names)
        stack.callback(run.close)
        sinks = assemble.trackers(spec, run_dir, saved is not None, run.in_force()) if main else []
        outputs = Outputs(
            run_dir, MetricsLog(run_dir, enabled=main, sinks=sinks), spec.config, main
        )
        # Whatever escapes, the trackers' runs end as failed or interrupted, not left open.
        stack.push(lambda kind, error, trace: outputs.metrics.close(error) if error else None)
        if saved is not None:
            restore = sharding.restore if sharded else ckpt.restore
            restore(saved, run.model, run.optimizer, run.scheduler, run.scaler, resume_from)
            outputs.metrics.truncate_after(state.step)
            log.info(
                "resumed from %s at step %d (epoch %d, batch %d)",
                resume_from, state.step, state.epoch, state.batch,
            )  # fmt: skip
            del saved
        try:
            status, stopped_by, speed = train_loop(run, state, outputs)
            if sharded and status in ("completed", "stopped_early"):  # the weights in one file
                outputs.save("last.pt", run, state, whole=True)
        except UserError as error:  # a checkpoint that could not be written
            hold_signals()
            finish(run, state, outputs, "failed", None, Throughput(), started, str(error))
            raise
        except (RuntimeError, ConnectionError, EOFError) as error:
            message = _lost_process(error, world, outputs, _reads_in_workers(run))
            if message is None:
                raise
            hold_signals()
            finish(run, state, outputs, "failed", None, Throughput(), started, message)
            raise UserError(message) from None
        return finish(run, state, outputs, status, stopped_by, speed, started)


def cpu_threads_note(world: int) -> None:
    """Log torch's thread count; on a CPU shared with other processes (a load average above
    the cores, or more threads than cores), say how to give this run its share: threads
    that outnumber their cores spin and wait, and can cost up to 10x."""
    cores, threads = os.cpu_count() or 1, torch.get_num_threads() * world
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    log.info(
        "torch threads: %d per process on %d cores (load average %.1f)",
        threads // world,
        cores,
        load,
    )
    share = max(1, (cores - min(int(load), cores - 1)) // world)
    if (threads > cores or load > cores) and threads // world > share:
        log.warning(
            "the CPU is shared (load average %.1f, %d threads on %d cores): oversubscribed threads "
            "can make every step up to 10x slower; give this run its share of the cores with "
            "OMP_NUM_THREADS, e.g. OMP_NUM_THREADS=%d mmtrain train ...",
            load, threads, cores, share,
        )  # fmt: skip


# The keys the command line set (see mmtrain.launch.start), for every process of the run.
EXPLICIT_KEYS_ENV = "MMTRAIN_EXPLICIT_KEYS"


def explicit_keys() -> list[str]:
    """The config keys and groups the user's overrides set (optimizer.lr, optimizer)."""
    return [key for key in os.environ.get(EXPLICIT_KEYS_ENV, "").split(",") if key]


def _worker_deaths_where_data_is_read() -> None:
    """Keep torch from installing its SIGCHLD handler, which raises a loader worker's death
    wherever the main process happens to be (in the middle of a checkpoint write, which then
    reads as a disk error). The DataLoader still finds a dead worker within seconds where it
    waits for its batch, and the run ends there with its own message (`_lost_process`)."""
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True


def _reads_in_workers(run: Run) -> bool:
    return any(loader.num_workers > 0 for loader in (run.train_loader, run.val_loader))


def _lost_process(error: Exception, world: int, out: Outputs, workers: bool) -> str | None:
    """The message for a run that lost a process (another rank of the job, or a data loader
    worker killed, e.g. by the out-of-memory killer); None for any other error. A worker
    killed while its batch is being received can surface as the broken connection itself
    (ConnectionResetError, EOFError) before torch sees the worker gone."""
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else repr(error)
    if "DataLoader worker" in reason or (
        workers and isinstance(error, (ConnectionError, EOFError))
    ):
        who = "A data loader worker process of this run stopped unexpectedly"
    elif world > 1 and peer_failure(error):
        who = "Another process of this job stopped unexpectedly"
    else:
        return None
    return (
        f"{who} ({reason}), so the run stops. The last checkpoint "
        f"({ckpt.newest(out.checkpoints) or 'none yet'}) is whole; resume with: "
        f"{resume_command(out.run_dir)}"
    )


def finish(
    run: Run,
    state: TrainState,
    out: Outputs,
    status: str,
    stopped_by: str | None,
    speed: Throughput,
    started: float,
    error: str | None = None,
) -> float:
    """Write summary.json and curves.png; raise for an interrupted run or one that failed
    in the loop (the caller raises `error`, the failure it passes)."""
    # "final" holds the metrics of best.pt, the weights eval, predict and export use;
    # "last" those of the last validation, when it was another one.
    final: dict[str, float] = {}
    last: dict[str, float] = {}
    for event in out.metrics.events:
        if any(key.startswith("val/") for key in event):
            last = {k: v for k, v in event.items() if k not in ("step", "epoch")}
            if event["step"] == state.best_step or state.best_step is None:
                final = last
    best = state.best if state.best is not None and math.isfinite(state.best) else None
    best = round(best, 6) if best is not None else None
    samples_per_s = speed.rate()
    summary = {
        "status": status,
        "best": {"metric": run.monitor, "value": best, "step": state.best_step},
        "final": final,
        **({"last": last} if last != final else {}),
        "steps": state.step,
        "epochs": state.epoch,
        "samples_per_s": round(samples_per_s, 1) if math.isfinite(samples_per_s) else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "bad_samples": run.bad_samples(),
        "nonfinite_steps_skipped": state.skipped,
    }
    if error:
        summary["error"] = error
    if out.main:
        _pictures(out, state.step)
        if out.metrics.sinks:  # "ok", or "failed: why" (the run went on without it)
            summary["trackers"] = loggers.states(out.metrics.sinks)
        try:
            write_json(out.run_dir / "summary.json", summary)
        except OSError as problem:  # e.g. the disk that just filled up
            log.warning("could not write summary.json: %s", problem.strerror or problem)
    out.metrics.finish(status, summary)
    if error:
        return math.nan
    if status == "interrupted":
        raise Interrupted(
            stopped_by or "SIGTERM",
            f"Interrupted by {stopped_by} at step {state.step}; the checkpoint {ckpt.newest(out.checkpoints)} is saved. "
            f"Resume with: {resume_command(out.run_dir)}",
        )
    if status == "failed":
        raise UserError(
            f"Training stopped at step {state.step} on non-finite numbers; see {out.run_dir / 'train.log'}."
        )
    shown = f"{best:.4f}" if best is not None else "none"
    log.info(
        "%s: best %s %s at step %s; summary in %s",
        status, run.monitor, shown, state.best_step, out.run_dir / "summary.json",
    )  # fmt: skip
    return best if best is not None else math.nan


def _pictures(out: Outputs, step: int) -> None:
    """Draw curves.png one last time and give the run's pictures to the trackers."""
    curves = out.run_dir / "curves.png"
    try:
        if out.metrics.events:
            plot_curves(out.metrics.events, curves)
    except OSError as problem:  # e.g. the disk that just filled up
        log.warning("could not write curves.png: %s", problem.strerror or problem)
    if curves.is_file():
        for sink in out.metrics.sinks:
            sink.picture("curves", curves, step)
