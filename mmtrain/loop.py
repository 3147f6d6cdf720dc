"""The training loop, read top to bottom, and the state it keeps.

`train_loop` steps a `Run`, the flat set of objects `mmtrain.assemble` builds, until its
budget, an early stop, a non-finite stop or a signal. One optimizer step: forward
`accumulate_grad_batches` micro-batches under autocast, backward, unscale, clip, check the
gradients are finite, step the optimizer and the schedule. Then, as plain `if` blocks: log,
validate, checkpoint, stop early, honour SIGTERM/SIGINT. (`mmtrain.recipe` sets a run up,
calls this, and writes its summary.)

A signal (to the main process or, as clusters and terminals send it, to the whole process
group) ends the run within one step plus a save: a validation in progress is abandoned and
done first when the run resumes, so the resumed run is the one that was never stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmtrain import checkpoint as ckpt
from mmtrain import distributed, sharding
from mmtrain.errors import UserError
from mmtrain.evaluation import evaluate, reference_metrics
from mmtrain.guard import StopSignal
from mmtrain.models.feature_cache import accumulated_backward
from mmtrain.run import Run
from mmtrain.runlog import MetricsLog, plot_curves, progress_bar
from mmtrain.spec import budget

log = logging.getLogger("mmtrain")
# At most this many epoch-end validations a run (`validation_gap`).
EPOCH_END_VALIDATIONS = 50


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
    parts_sum: dict[str, float] = field(default_factory=dict)  # the loss's parts (loss_ce, ...)
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

    def reset(self) -> None:
        self.samples, self.seconds = 0, 0.0


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

    def save(self, name: str, run: Run, state: TrainState, whole: bool = False) -> None:
        """Write checkpoints/NAME atomically (rank 0). A sharded model's (fsdp; every rank
        takes part): best.pt, or NAME with `whole`, holds the weights gathered into one file
        (for eval, predict and export); the others are folders NAME.dcp of shards."""
        if not sharding.is_sharded(run.model):
            if self.main:
                snapshot = ckpt.snapshot(
                    run.model, run.optimizer, run.scheduler, run.scaler,
                    dataclasses.asdict(state), self.config,
                )  # fmt: skip
                ckpt.save_atomic(snapshot, self.checkpoints / name)
            return
        rest = ckpt.snapshot(
            None, None, run.scheduler, run.scaler, dataclasses.asdict(state), self.config
        )
        if name != "best.pt" and not whole:
            path = self.checkpoints / name
            sharding.save(path.with_suffix(ckpt.SHARDED), run.model, run.optimizer, rest)
            return
        weights = sharding.full_weights(run.model)
        if self.main:
            whole_file = {**rest, "model": weights, "format": "consolidated"}
            ckpt.save_atomic(whole_file, self.checkpoints / name)


@dataclass
class _Step:
    """The optimizer step being accumulated from micro-batches."""

    start: float = field(default_factory=lambda: time.perf_counter())
    loss: Any = 0.0  # summed over micro-batches
    parts: dict[str, Any] = field(default_factory=dict)  # the model's loss_* outputs, summed
    micro_batches: int = 0
    samples: int = 0  # global samples, for samples/s
    pending: list[dict[str, torch.Tensor]] = field(default_factory=list)


def train_loop(run: Run, state: TrainState, out: Outputs) -> tuple[str, str | None, Throughput]:
    """Step until max_steps, an early stop, a non-finite stop or a signal; return the status,
    the signal (if any) and the training throughput."""
    status, total = "completed", Throughput()
    chosen = budget(run.trainer, len(run.train_loader))
    log.info(
        "training %d step%s (%d per epoch)%s, monitoring %s (%s)",
        run.max_steps, "" if run.max_steps == 1 else "s", run.steps_per_epoch,
        f": {chosen.reason}" if chosen.total == run.max_steps else "", run.monitor, run.mode,
    )  # fmt: skip
    gap = validation_gap(run.max_steps)
    if gap > run.steps_per_epoch:
        log.info(
            "validating (and saving last.pt, redrawing curves.png) at the first epoch end of "
            "every %d steps, not after each of the %d-step epochs: at most %d such validations "
            "a run, plus the last step's%s",
            gap, run.steps_per_epoch, EPOCH_END_VALIDATIONS,
            f" and every {run.trainer.val_every_n_steps} steps (trainer.val_every_n_steps)"
            if run.trainer.val_every_n_steps else "",
        )  # fmt: skip
    run.model.train()
    bar = progress_bar(log.isEnabledFor(logging.INFO), run.max_steps, state.step)
    with StopSignal() as stop, bar:
        # Validation first: the starting point (val_before_training), or the validation a
        # signal abandoned, which a resumed run does as the run never stopped did it.
        first = run.trainer.val_before_training and state.step == 0 and state.best is None
        if (state.validating or first) and _validate(run, state, out, stop):
            status = "stopped_early" if _no_progress(run, state) else status
        interval = Throughput()
        while state.step < run.max_steps and status == "completed" and not stop.received:
            status = _epoch(run, state, out, stop, (bar, total, interval))
        if stop.received and status == "completed":
            status = "interrupted"
            out.save("last.pt", run, state)
    return status, stop.received, total


def _epoch(run: Run, state: TrainState, out: Outputs, stop: StopSignal, meters: tuple) -> str:
    """Train from the state's place in the current epoch to its end, or until the run must
    stop; return the status."""
    t, world, rank = run.trainer, distributed.world_size(), distributed.rank()
    bar, total, interval = meters
    # The epoch's order depends on (seed, epoch) alone; skip what was already read.
    run.train_loader.sampler.set_epoch(state.epoch, start=state.batch * run.batch_size)
    batches_in_epoch = state.batch + len(run.train_loader)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    step, status = _Step(), "completed"
    for batch in run.train_loader:
        batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
        # Keyed by the batch's place in the run: its step, its micro-batch within the
        # step, and the rank, so no two batches draw the same augmentation noise.
        batch = run.augment(batch, (state.step, step.micro_batches, rank))
        step.micro_batches, state.batch = step.micro_batches + 1, state.batch + 1
        end_of_epoch = state.batch == batches_in_epoch
        stepping = step.micro_batches == t.accumulate_grad_batches or end_of_epoch
        _backward(run, batch, step, stepping)
        step.samples += len(batch["images"]) * world
        if not stepping:
            continue
        if not _optimizer_step(run, state, out, step, trainable, batch):
            return "failed"
        seconds = time.perf_counter() - step.start
        total.add(step.samples, seconds)
        interval.add(step.samples, seconds)

        if state.step % t.log_every_n_steps == 0 or state.step == run.max_steps:
            _log_train(run, state, out, interval.rate(), bar)
            interval.reset()
        if end_of_epoch:
            state.epoch, state.batch = state.epoch + 1, 0
        if (
            (end_of_epoch and epoch_end_validates(state.step, run.steps_per_epoch, run.max_steps))
            or state.step == run.max_steps
            or (t.val_every_n_steps and state.step % t.val_every_n_steps == 0)
        ) and not _validate(run, state, out, stop):
            return status  # abandoned for a signal: saved by train_loop, redone on resume
        if t.checkpoint.every_n_steps and state.step % t.checkpoint.every_n_steps == 0:
            out.save(f"step_{state.step}.pt", run, state)
            out.save("last.pt", run, state)
            if out.main:
                ckpt.prune(out.checkpoints, t.checkpoint.keep_last)
        if _no_progress(run, state):
            status = "stopped_early"
        if stop.everywhere(run.device) or state.step >= run.max_steps or status != "completed":
            return status
        step = _Step()
    return status


def validation_gap(max_steps: int) -> int:
    """The fewest steps between two epoch-end validations: one each epoch, unless a run has
    more than `EPOCH_END_VALIDATIONS` epochs (tiny data), then one every `max_steps /
    EPOCH_END_VALIDATIONS` steps, so that 2,000 one-step epochs do not cost 2,000
    validations, checkpoints and plots."""
    return max(1, math.ceil(max_steps / EPOCH_END_VALIDATIONS))


def epoch_end_validates(step: int, steps_per_epoch: int, max_steps: int) -> bool:
    """Whether the epoch that ended at `step` crossed a multiple of `validation_gap`: a
    function of the step alone, so a resumed run validates where the one never stopped did."""
    gap = validation_gap(max_steps)
    return step // gap > max(step - steps_per_epoch, 0) // gap


def _backward(run: Run, batch: dict[str, torch.Tensor], step: _Step, stepping: bool) -> None:
    """Forward and backward of one micro-batch, adding its loss to `step`."""
    accumulate = run.trainer.accumulate_grad_batches
    if accumulate > 1 and run.traits.accumulates_features:
        # One contrastive loss over every micro-batch's embeddings, once all are read;
        # logged as the mean over micro-batches: the whole batch's loss.
        step.pending.append(batch)
        if stepping:
            loss = accumulated_backward(
                run.model, run.step_model, step.pending, run.autocast, run.scaler
            )
            step.loss, step.pending = loss * step.micro_batches, []
        return
    # Under DDP, gradients are all-reduced only on the micro-batch that steps; fsdp
    # reduce-scatters each micro-batch's into the shards.
    sync = stepping or distributed.world_size() == 1 or sharding.is_sharded(run.model)
    with run.autocast(), nullcontext() if sync else run.step_model.no_sync():
        output = run.step_model(**batch)
        loss = output["loss"]
        run.scaler.scale(loss / accumulate).backward()
    step.loss = step.loss + loss.detach()
    for name in (key for key in output if key.startswith("loss_")):
        step.parts[name] = step.parts.get(name, 0.0) + output[name].detach()


def _optimizer_step(
    run: Run,
    state: TrainState,
    out: Outputs,
    step: _Step,
    trainable: list[nn.Parameter],
    batch: dict[str, torch.Tensor],
) -> bool:
    """One optimizer step over the accumulated micro-batches; False when non-finite numbers
    stop the run (trainer.on_nonfinite=stop)."""
    t, world = run.trainer, distributed.world_size()
    run.scaler.unscale_(run.optimizer)
    if sharding.is_sharded(run.model):
        grad_norm = sharding.grad_norm(trainable, t.grad_clip)
    else:
        grad_norm = _grad_norm(trainable, t.grad_clip)
    step_loss = float(step.loss) / step.micro_batches
    # Gradients are the same on every rank after the all-reduce, so deciding on them keeps
    # the ranks in step; a lone rank's loss is not.
    finite = bool(torch.isfinite(grad_norm)) and (world > 1 or math.isfinite(step_loss))
    if finite or run.scaler.is_enabled():  # the fp16 scaler skips inf steps itself
        run.scaler.step(run.optimizer)
        state.loss_sum, state.loss_n = state.loss_sum + step_loss, state.loss_n + 1
        if step.parts:  # read in one transfer from the device
            values = torch.stack([torch.as_tensor(v) for v in step.parts.values()]).tolist()
            for name, value in zip(step.parts, values, strict=True):
                total = state.parts_sum.get(name, 0.0)
                state.parts_sum[name] = total + value / step.micro_batches
    elif t.on_nonfinite == "stop":
        log.error(
            "Non-finite loss or gradients at step %d (batch indices %s); the last good checkpoint is %s. "
            "Lower optimizer.lr, set trainer.grad_clip, or set trainer.on_nonfinite=skip.",
            state.step + 1, batch["index"].tolist(), ckpt.newest(out.checkpoints) or "none (none was written yet)",
        )  # fmt: skip
        return False
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
    return True


def _validate(run: Run, state: TrainState, out: Outputs, stop: StopSignal) -> bool:
    """Evaluate, log, keep best.pt when the monitored metric improved, and save last.pt;
    False when a signal abandoned the evaluation (the state then says it is still due)."""
    # The unwrapped model: evaluation needs no gradient sync between ranks.
    state.validating = True
    metrics = evaluate(run.model, run.val_metrics(), run.val_loader, run.device, run.autocast, stop)
    if metrics is not None and run.references:  # zeroshot.reference: forgetting, as it happens
        more = reference_metrics(run.model, run.references, run.device, run.autocast, stop)
        metrics = None if more is None else metrics | more
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
    # The loss's parts (clip_fusion: train/loss_ce, train/loss_contrastive), as train/loss.
    parts = {
        f"train/{name}": distributed.mean(total / state.loss_n, run.device)
        for name, total in sorted(state.parts_sum.items())
        if state.loss_n
    }
    out.metrics.log(
        state.step,
        state.epoch,
        {"train/loss": loss, **parts, "train/lr": lr, "train/samples_per_s": speed},
    )
    log.info(
        "step %d/%d  loss %.4f  lr %.2e  %.0f samples/s", state.step, run.max_steps, loss, lr, speed
    )
    bar.update(bar.task_ids[0], completed=state.step, loss=loss, lr=lr, speed=speed)
    state.loss_sum, state.loss_n, state.parts_sum = 0.0, 0, {}
