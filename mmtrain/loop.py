"""The training loop, read top to bottom, and the state it keeps.

`fit` builds a run (`mmtrain.build.build_run`), restores a checkpoint if asked, runs
`train_loop` and writes the summary. One optimizer step of `train_loop`: forward
`accumulate_grad_batches` micro-batches under autocast, backward, unscale, clip, check the
gradients are finite, step the optimizer and the schedule. Then, as plain `if` blocks: log,
validate, checkpoint, stop early, honour SIGTERM/SIGINT.

A signal (to the main process or, as clusters and terminals send it, to the whole process
group) ends the run within one step plus a save: a validation in progress is abandoned and
done first when the run resumes, so the resumed run is the one that was never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import ExitStack, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mmtrain import checkpoint as ckpt
from mmtrain import distributed
from mmtrain.build import (
    Run,
    build_loggers,
    build_run,
    resolve_device,
    resolve_precision,
    seed_everything,
)
from mmtrain.config import trainer_config, upgrade
from mmtrain.data.source import load_class_names
from mmtrain.errors import Interrupted, UserError
from mmtrain.guard import StopSignal, checkpoint_to_resume, locked, peer_failure
from mmtrain.models.feature_cache import accumulated_backward
from mmtrain.runlog import MetricsLog, plot_curves, progress_bar, resume_command, write_json

log = logging.getLogger("mmtrain")


@dataclass
class TrainState:
    """Where a run is; saved in every checkpoint (as its `data` entry) so a resumed run
    continues exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch: int = 0  # batches of this epoch already read (this rank's)
    best: float | None = None  # best value of the monitored metric so far
    best_step: int | None = None
    stale: int = 0  # evaluations since the best one (early stopping)
    skipped: int = 0  # steps skipped on non-finite numbers
    loss_sum: float = 0.0  # training loss since the last log line
    loss_n: int = 0
    validating: bool = False  # a signal abandoned the validation of this step

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], path: Path) -> TrainState:
        """The state in a checkpoint, or a UserError saying why this release cannot use it."""
        data = saved.get("data")
        names = [field.name for field in dataclasses.fields(cls)]
        if not isinstance(data, dict) or not {"step", "epoch", "batch"} <= set(data):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise UserError(
                f"Cannot resume from {path}: it holds no training position this release of "
                f"mmtrain reads (its 'data' entry is {found}; expected the keys {', '.join(names)}). "
                "It was not written by `mmtrain train`, or by a release with another format; "
                "start a new run, or resume with the release that wrote it."
            )
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise UserError(
                f"Cannot resume from {path}: its training position has keys this release of "
                f"mmtrain does not know ({', '.join(unknown)}); it was written by a newer release. "
                "Resume with that release, or start a new run."
            )
        return cls(**data)


@dataclass
class Throughput:
    """Samples and seconds of training steps only, counted over the same steps: the time
    spent validating or saving is in neither."""

    samples: int = 0
    seconds: float = 0.0

    def add(self, samples: int, seconds: float) -> None:
        self.samples, self.seconds = self.samples + samples, self.seconds + seconds

    def rate(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan


@dataclass
class Outputs:
    """Where a run writes: its directory, metrics.jsonl and checkpoints (rank 0 only)."""

    run_dir: Path
    metrics: MetricsLog
    config: dict[str, Any]  # the resolved config, saved in every checkpoint
    main: bool

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self, name: str, run: Run, state: TrainState) -> None:
        """Write checkpoints/NAME atomically (rank 0)."""
        if self.main:
            snapshot = ckpt.snapshot(
                run.model, run.optimizer, run.scheduler, run.scaler,
                dataclasses.asdict(state), self.config,
            )  # fmt: skip
            ckpt.save_atomic(snapshot, self.checkpoints / name)


def evaluate(
    model: torch.nn.Module,
    metrics: Any,
    batches: Any,
    device: torch.device,
    autocast: Any,
    stop: StopSignal | None = None,
) -> dict[str, float] | None:
    """Validation metrics (`val/...`) of `model` over every batch of `batches` (synced over
    ranks by the metrics object); None when a `stop` signal abandoned the pass on any rank."""
    model.eval()
    try:
        with torch.no_grad():
            # Checked before the batches' iterator starts its worker processes, too.
            for batch in [] if stop is not None and stop.received else batches:
                # Checked on this rank alone: ranks may hold one batch more or less.
                if stop is not None and stop.received:
                    break
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast():
                    metrics.update(model(**batch), batch)
    finally:
        model.train()
    if stop is not None and stop.everywhere(device):
        return None
    return {f"val/{name}": value for name, value in metrics.compute().items()}


def fit(cfg: DictConfig, run_dir: Path) -> float:
    """Train as `cfg` says, writing everything into `run_dir`; return the best monitored value.

    Under torchrun (or trainer.nproc_per_node) every rank runs this; only rank 0 writes.
    """
    started = time.perf_counter()
    trainer, run_dir = trainer_config(cfg), Path(run_dir)
    device = resolve_device(trainer.device)
    with distributed.process_group(device), locked(run_dir, device), ExitStack() as stack:
        main = distributed.is_main()
        config = OmegaConf.to_container(cfg, resolve=True)
        resume_from, saved = checkpoint_to_resume(trainer.resume, run_dir)
        state = TrainState()
        if saved is not None:
            ckpt.check_compatible(upgrade(saved["config"]), config, resume_from)
            state = TrainState.from_checkpoint(saved, resume_from)
        # The same seed on every rank, so dropout noise stays in step across ranks.
        seed_everything(trainer.seed)
        world = distributed.world_size()
        log.info(
            "run directory: %s (device %s, precision %s, %d process%s, process group: %s)",
            run_dir, device, resolve_precision(trainer.precision, device), world,
            "es" if world > 1 else "", distributed.backend(),
        )  # fmt: skip
        # A resumed run keeps its label mapping (labels.json), on every rank.
        class_names = load_class_names(run_dir) if saved is not None else None
        run = build_run(cfg, run_dir if main else None, device, class_names)
        stack.callback(run.close)
        sinks = build_loggers(cfg, run, run_dir, saved is not None) if main else []
        outputs = Outputs(run_dir, MetricsLog(run_dir, enabled=main, sinks=sinks), config, main)
        # Whatever escapes, the trackers' runs end as failed or interrupted, not left open.
        stack.push(lambda kind, error, trace: outputs.metrics.close(error) if error else None)
        if saved is not None:
            ckpt.restore(saved, run.model, run.optimizer, run.scheduler, run.scaler)
            outputs.metrics.truncate_after(state.step)
            log.info(
                "resumed from %s at step %d (epoch %d, batch %d)",
                resume_from, state.step, state.epoch, state.batch,
            )  # fmt: skip
            del saved
        try:
            status, stopped_by, speed = train_loop(run, state, outputs)
        except UserError as error:  # a checkpoint that could not be written
            _finish(run, state, outputs, "failed", None, Throughput(), started, str(error))
            raise
        except RuntimeError as error:
            if world == 1 or not peer_failure(error):
                raise
            reason = str(error).strip().splitlines()[0][:200]
            message = (
                f"Another process of this job stopped unexpectedly ({reason}), so this one stops too. "
                f"The last checkpoint ({ckpt.newest(outputs.checkpoints) or 'none yet'}) is whole; "
                f"resume with: {resume_command(run_dir)}"
            )
            _finish(run, state, outputs, "failed", None, Throughput(), started, message)
            raise UserError(message) from None
        return _finish(run, state, outputs, status, stopped_by, speed, started)


def train_loop(run: Run, state: TrainState, out: Outputs) -> tuple[str, str | None, Throughput]:
    """Step until max_steps, an early stop, a non-finite stop or a signal; return the status,
    the signal (if any) and the training throughput."""
    t, world, rank = run.trainer, distributed.world_size(), distributed.rank()
    accumulate, batch_size = t.accumulate_grad_batches, run.parts.loader.batch_size
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    # Contrastive models score accumulated micro-batches against each other's negatives.
    whole_batch, pending = accumulate > 1 and getattr(run.model, "accumulates_features", False), []
    status, total, interval = "completed", Throughput(), Throughput()
    log.info(
        "training %d steps (%d per epoch), monitoring %s (%s)",
        run.max_steps, run.steps_per_epoch, run.monitor, run.mode,
    )  # fmt: skip
    run.model.train()
    bar = progress_bar(log.isEnabledFor(logging.INFO), run.max_steps, state.step)
    with StopSignal() as stop, bar:
        # Validation first: the starting point (val_before_training), or the validation a
        # signal abandoned, which a resumed run does as the run never stopped did it.
        first = t.val_before_training and state.step == 0 and state.best is None
        if (state.validating or first) and _validate(run, state, out, stop):
            status = "stopped_early" if _no_progress(run, state) else status
        while state.step < run.max_steps and status == "completed" and not stop.received:
            # The epoch's order depends on (seed, epoch) alone; skip what was already read.
            run.train_loader.sampler.set_epoch(state.epoch, start=state.batch * batch_size)
            batches_in_epoch = state.batch + len(run.train_loader)
            step_start, step_loss, micro_batches, step_samples = time.perf_counter(), 0.0, 0, 0
            for batch in run.train_loader:
                batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
                # Keyed by the batch's place in the run: its step, its micro-batch within the
                # step, and the rank, so no two batches draw the same augmentation noise.
                batch = run.parts.augment(batch, (state.step, micro_batches, rank))
                micro_batches, state.batch = micro_batches + 1, state.batch + 1
                end_of_epoch = state.batch == batches_in_epoch
                stepping = micro_batches == accumulate or end_of_epoch
                if whole_batch:  # one contrastive loss over every micro-batch's embeddings
                    pending.append(batch)
                    if stepping:  # logged as the mean over micro-batches: the whole batch's loss
                        loss = accumulated_backward(
                            run.model, run.step_model, pending, run.autocast, run.scaler
                        )
                        step_loss, pending = loss * micro_batches, []
                else:
                    # Under DDP, gradients are all-reduced only on the micro-batch that steps.
                    no_sync = nullcontext() if stepping or world == 1 else run.step_model.no_sync()
                    with run.autocast(), no_sync:
                        loss = run.step_model(**batch)["loss"]
                        run.scaler.scale(loss / accumulate).backward()
                    step_loss = step_loss + loss.detach()
                step_samples += len(batch["images"]) * world  # global samples, for samples/s
                if not stepping:
                    continue

                # One optimizer step over the accumulated micro-batches.
                run.scaler.unscale_(run.optimizer)
                grad_norm = _grad_norm(trainable, t.grad_clip)
                step_loss = float(step_loss) / micro_batches
                # Gradients are the same on every rank after the all-reduce, so deciding on
                # them keeps the ranks in step; a lone rank's loss is not.
                finite = bool(torch.isfinite(grad_norm)) and (world > 1 or math.isfinite(step_loss))
                if finite or run.scaler.is_enabled():  # the fp16 scaler skips inf steps itself
                    run.scaler.step(run.optimizer)
                    state.loss_sum, state.loss_n = state.loss_sum + step_loss, state.loss_n + 1
                elif t.on_nonfinite == "stop":
                    status = "failed"
                    log.error(
                        "Non-finite loss or gradients at step %d (batch indices %s); the last good checkpoint is %s. "
                        "Lower optimizer.lr, set trainer.grad_clip, or set trainer.on_nonfinite=skip.",
                        state.step + 1, batch["index"].tolist(), ckpt.newest(out.checkpoints) or "none (none was written yet)",
                    )  # fmt: skip
                    break
                else:
                    state.skipped += 1
                    log.warning(
                        "skipped step %d: non-finite loss or gradients (%d skipped so far)",
                        state.step + 1, state.skipped,
                    )  # fmt: skip
                run.scaler.update()
                run.optimizer.zero_grad(set_to_none=True)
                run.scheduler.step()
                state.step += 1
                seconds = time.perf_counter() - step_start
                total.add(step_samples, seconds)
                interval.add(step_samples, seconds)

                if state.step % t.log_every_n_steps == 0 or state.step == run.max_steps:
                    _log_train(run, state, out, interval.rate(), bar)
                    interval = Throughput()
                if end_of_epoch:
                    state.epoch, state.batch = state.epoch + 1, 0
                if (
                    end_of_epoch
                    or state.step == run.max_steps
                    or (t.val_every_n_steps and state.step % t.val_every_n_steps == 0)
                ) and not _validate(run, state, out, stop):
                    break  # abandoned for a signal: saved below, redone on resume
                if t.checkpoint.every_n_steps and state.step % t.checkpoint.every_n_steps == 0:
                    out.save(f"step_{state.step}.pt", run, state)
                    out.save("last.pt", run, state)
                    if out.main:
                        ckpt.prune(out.checkpoints, t.checkpoint.keep_last)
                if _no_progress(run, state):
                    status = "stopped_early"
                if (
                    stop.everywhere(run.device)
                    or state.step >= run.max_steps
                    or status != "completed"
                ):
                    break
                step_start, step_loss, micro_batches, step_samples = time.perf_counter(), 0.0, 0, 0
        if stop.received and status == "completed":
            status = "interrupted"
            out.save("last.pt", run, state)
    return status, stop.received, total


def _validate(run: Run, state: TrainState, out: Outputs, stop: StopSignal) -> bool:
    """Evaluate, log, keep best.pt when the monitored metric improved, and save last.pt;
    False when a signal abandoned the evaluation (the state then says it is still due)."""
    # The unwrapped model: evaluation needs no gradient sync between ranks.
    model, state.validating = run.model, True
    metrics = evaluate(model, run.val_metrics(), run.val_loader, run.device, run.autocast, stop)
    if metrics is None:
        log.warning("validation of step %d abandoned; it is done first on resume", state.step)
        return False
    state.validating = False
    out.metrics.log(state.step, state.epoch, metrics)
    if out.main:  # redrawn now, so the curves can be watched while the run trains
        with suppress(OSError):  # a full disk is reported by the checkpoint save below
            plot_curves(out.metrics.events, out.run_dir / "curves.png")
    log.info(
        "step %d validation: %s",
        state.step,
        "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
    )
    run.watch.update(metrics, state.step)
    value = metrics[run.monitor]
    better = state.best is None or (value > state.best if run.mode == "max" else value < state.best)
    if better:
        state.best, state.best_step, state.stale = value, state.step, 0
        out.save("best.pt", run, state)
    else:
        state.stale += 1
    out.save("last.pt", run, state)
    return True


def _no_progress(run: Run, state: TrainState) -> bool:
    """Whether early stopping ends the run: no improvement in `patience` evaluations."""
    patience = run.trainer.early_stopping.patience
    if patience and state.stale >= patience:
        log.info("early stopping: %s did not improve in %d evaluations", run.monitor, state.stale)
        return True
    return False


def _grad_norm(params: list[torch.nn.Parameter], clip: float | None) -> torch.Tensor:
    """The gradients' total norm (for the finite check), clipping them to `clip` if set."""
    if clip:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    # Without clipping, measuring alone skips a multiply of every gradient by 1.0.
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _log_train(run: Run, state: TrainState, out: Outputs, speed: float, bar: Any) -> None:
    """Log the mean training loss since the last log (over all ranks), lr and speed."""
    loss = state.loss_sum / state.loss_n if state.loss_n else math.nan
    loss = distributed.mean(loss, run.device)
    lr = run.scheduler.get_last_lr()[0]
    out.metrics.log(
        state.step, state.epoch, {"train/loss": loss, "train/lr": lr, "train/samples_per_s": speed}
    )
    log.info(
        "step %d/%d  loss %.4f  lr %.2e  %.0f samples/s", state.step, run.max_steps, loss, lr, speed
    )
    bar.update(bar.task_ids[0], completed=state.step, loss=loss, lr=lr, speed=speed)
    state.loss_sum, state.loss_n = 0.0, 0


def _finish(
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
        "bad_samples": run.parts.bad_samples,
        "nonfinite_steps_skipped": state.skipped,
    }
    if error:
        summary["error"] = error
    if out.main:
        try:
            write_json(out.run_dir / "summary.json", summary)
            if out.metrics.events:
                plot_curves(out.metrics.events, out.run_dir / "curves.png")
        except OSError as problem:  # e.g. the disk that just filled up
            log.warning(
                "could not write summary.json or curves.png: %s", problem.strerror or problem
            )
    out.metrics.finish(status, summary)
    if error:
        return math.nan
    if status == "interrupted":
        raise Interrupted(
            stopped_by or "SIGTERM",
            f"Interrupted by {stopped_by} at step {state.step}; the checkpoint {out.checkpoints / 'last.pt'} is saved. "
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
