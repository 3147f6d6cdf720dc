"""The training loop: one function, read top to bottom.

Each optimizer step: forward `accumulate_grad_batches` micro-batches under autocast,
backward, unscale, clip, check the gradients are finite, step the optimizer and schedule.
Then, as plain `if` blocks: log, validate, checkpoint, stop early, honour SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from mmtrain import checkpoint as ckpt
from mmtrain import distributed, registry
from mmtrain.config import plain
from mmtrain.errors import UserError
from mmtrain.runlog import MetricsLog, plot_curves, progress_bar, write_json
from mmtrain.setup import (
    build_parts,
    loader,
    resolve_device,
    resolve_precision,
    seed_everything,
    total_steps,
)

log = logging.getLogger("mmtrain")
AUTOCAST = {"bf16": torch.bfloat16, "16": torch.float16}


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.received: str | None = None
        self.previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then saving a checkpoint", self.received)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def evaluate(
    model: torch.nn.Module, metrics: Any, batches: Any, device: torch.device, autocast: Any
) -> dict[str, float]:
    """Validation metrics (`val/...`) of `model` over every batch of `batches` (synced over
    ranks by the metrics object)."""
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast():
                metrics.update(model(**batch), batch)
    model.train()
    return {f"val/{name}": value for name, value in metrics.compute().items()}


def fit(cfg: DictConfig, run_dir: Path) -> float:
    """Train as `cfg` says, writing everything into `run_dir`; return the best monitored value.

    Under torchrun (or trainer.nproc_per_node) every rank runs this; only rank 0 writes.
    """
    device = resolve_device(cfg.trainer.device)
    if cfg.trainer.nproc_per_node > 1 and not distributed.launched():
        return distributed.launch(cfg, Path(run_dir), cfg.trainer.nproc_per_node)
    with distributed.process_group(device):
        return _fit(cfg, Path(run_dir), device)


def _fit(cfg: DictConfig, run_dir: Path, device: torch.device) -> float:
    started = time.perf_counter()
    t, main = cfg.trainer, distributed.is_main()
    precision = resolve_precision(t.precision, device)
    checkpoints = _writable(run_dir / "checkpoints")
    config = OmegaConf.to_container(cfg, resolve=True)
    resume_from = _resume_path(t.resume, run_dir)
    saved = ckpt.load(resume_from) if resume_from else None
    if saved is not None:
        ckpt.check_compatible(saved["config"], config, resume_from)
    seed_everything(t.seed)  # the same on every rank: dropout noise stays in step across ranks
    world, rank = distributed.world_size(), distributed.rank()
    log.info(
        "run directory: %s (device %s, precision %s, %d process%s)",
        run_dir,
        device,
        precision,
        world,
        "es" if world > 1 else "",
    )

    parts = build_parts(cfg, run_dir if main else None)
    model = parts.model.to(device)
    pin = device.type == "cuda"
    train_loader = loader(parts, cfg, "train", train=True, pin_memory=pin)
    val_loader = loader(parts, cfg, "val", train=False, pin_memory=pin)
    steps_per_epoch, max_steps = total_steps(cfg, len(train_loader))
    optimizer = registry.build("optimizer", plain(cfg.optimizer), model=model)
    scheduler = registry.build(
        "scheduler", plain(cfg.scheduler), optimizer=optimizer, total_steps=max_steps
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16")
    step_model, autocast = _wrap(model, t.compile, precision, device, world)
    monitor = t.checkpoint.monitor or model.monitor[0]
    mode = model.monitor[1] if t.checkpoint.mode == "auto" else t.checkpoint.mode
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)

    # The loop's own state; saved in every checkpoint so a resumed run continues exactly.
    state = dict(
        step=0,
        epoch=0,
        batch=0,
        best=None,
        best_step=None,
        stale=0,
        skipped=0,
        loss_sum=0.0,
        loss_n=0,
    )
    metrics_log = MetricsLog(run_dir, enabled=main)
    if saved is not None:
        state = ckpt.restore(saved, model, optimizer, scheduler, scaler)
        metrics_log.truncate_after(state["step"])
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)",
            resume_from,
            state["step"],
            state["epoch"],
            state["batch"],
        )
        del saved

    def save(name: str) -> None:
        if main:
            snapshot = ckpt.snapshot(model, optimizer, scheduler, scaler, state, config)
            ckpt.save_atomic(snapshot, checkpoints / name)

    def validate() -> None:
        # The unwrapped model: evaluation needs no gradient sync between ranks.
        metrics = evaluate(model, model.metrics(device), val_loader, device, autocast)
        metrics_log.log(state["step"], state["epoch"], metrics)
        log.info(
            "step %d validation: %s",
            state["step"],
            "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
        )
        if monitor not in metrics:
            raise UserError(
                f"trainer.checkpoint.monitor={monitor!r} is not a validation metric; choose one of: {', '.join(metrics)}."
            )
        if state["best"] is None or better(metrics[monitor], state["best"]):
            state.update(best=metrics[monitor], best_step=state["step"], stale=0)
            save("best.pt")
        else:
            state["stale"] += 1
        save("last.pt")

    accumulate, batch_size = t.accumulate_grad_batches, cfg.data.batch_size
    trainable = [p for p in model.parameters() if p.requires_grad]
    status, samples, train_time = "completed", 0, 0.0
    log.info(
        "training %d steps (%d per epoch), monitoring %s (%s)",
        max_steps,
        steps_per_epoch,
        monitor,
        mode,
    )
    model.train()
    with (
        StopSignal() as stop,
        progress_bar(log.isEnabledFor(logging.INFO), max_steps, state["step"]) as bar,
    ):
        interval_samples, interval_start = 0, time.perf_counter()
        while state["step"] < max_steps and status == "completed" and not stop.received:
            # The epoch's order depends on (seed, epoch) alone; skip what was already read.
            train_loader.sampler.set_epoch(state["epoch"], start=state["batch"] * batch_size)
            batches_in_epoch = state["batch"] + len(train_loader)
            step_start, step_loss, micro_batches = time.perf_counter(), 0.0, 0
            for batch in train_loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                # Keyed by the batch's place in the run: its step, its micro-batch within the
                # step, and the rank, so no two batches draw the same augmentation noise.
                batch = parts.augment(batch, (state["step"], micro_batches, rank))
                micro_batches, state["batch"] = micro_batches + 1, state["batch"] + 1
                end_of_epoch = state["batch"] == batches_in_epoch
                stepping = micro_batches == accumulate or end_of_epoch
                # Under DDP, gradients are all-reduced only on the micro-batch that steps.
                with autocast(), nullcontext() if stepping or world == 1 else step_model.no_sync():
                    loss = step_model(**batch)["loss"]
                    scaler.scale(loss / accumulate).backward()
                step_loss = step_loss + loss.detach()
                samples += len(batch["images"]) * world  # global samples, for samples/s
                interval_samples += len(batch["images"]) * world
                if not stepping:
                    continue

                # One optimizer step over the accumulated micro-batches.
                scaler.unscale_(optimizer)
                grad_norm = _grad_norm(trainable, t.grad_clip)
                step_loss = float(step_loss) / micro_batches
                # Gradients are the same on every rank after the all-reduce, so deciding on
                # them keeps the ranks in step; a lone rank's loss is not.
                finite = bool(torch.isfinite(grad_norm)) and (world > 1 or math.isfinite(step_loss))
                if finite or scaler.is_enabled():  # the fp16 scaler skips inf steps itself
                    scaler.step(optimizer)
                    state.update(loss_sum=state["loss_sum"] + step_loss, loss_n=state["loss_n"] + 1)
                elif t.on_nonfinite == "stop":
                    status = "failed"
                    log.error(
                        "Non-finite loss or gradients at step %d (batch indices %s); the last good checkpoint is %s. "
                        "Lower optimizer.lr, set trainer.grad_clip, or set trainer.on_nonfinite=skip.",
                        state["step"] + 1, batch["index"].tolist(), ckpt.newest(checkpoints) or "none (none was written yet)",
                    )  # fmt: skip
                    break
                else:
                    state["skipped"] += 1
                    log.warning(
                        "skipped step %d: non-finite loss or gradients (%d skipped so far)",
                        state["step"] + 1,
                        state["skipped"],
                    )
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["step"] += 1
                train_time += time.perf_counter() - step_start

                if state["step"] % t.log_every_n_steps == 0 or state["step"] == max_steps:
                    speed = interval_samples / max(time.perf_counter() - interval_start, 1e-9)
                    _log_train(
                        state,
                        max_steps,
                        scheduler.get_last_lr()[0],
                        speed,
                        metrics_log,
                        bar,
                        device,
                    )
                    interval_samples, interval_start = 0, time.perf_counter()
                if end_of_epoch:
                    state.update(epoch=state["epoch"] + 1, batch=0)
                if (
                    end_of_epoch
                    or state["step"] == max_steps
                    or (t.val_every_n_steps and state["step"] % t.val_every_n_steps == 0)
                ):
                    validate()
                    interval_start = time.perf_counter()  # validation time is not training speed
                if t.checkpoint.every_n_steps and state["step"] % t.checkpoint.every_n_steps == 0:
                    save(f"step_{state['step']}.pt")
                    save("last.pt")
                    ckpt.prune(checkpoints, t.checkpoint.keep_last)
                if t.early_stopping.patience and state["stale"] >= t.early_stopping.patience:
                    status = "stopped_early"
                    log.info(
                        "early stopping: %s did not improve in %d evaluations",
                        monitor,
                        state["stale"],
                    )
                if world > 1 and distributed.any_rank(bool(stop.received), device):
                    stop.received = stop.received or "SIGTERM"  # it reached another rank
                if stop.received or state["step"] >= max_steps or status != "completed":
                    break
                step_start, step_loss, micro_batches = time.perf_counter(), 0.0, 0
        if stop.received and status == "completed":
            status = "interrupted"
            save("last.pt")

    speed = samples / train_time if train_time else None
    return _finish(
        run_dir,
        metrics_log,
        state,
        status,
        monitor,
        speed,
        started,
        stop.received,
        parts.bad_samples,
    )


def _grad_norm(params: list[torch.nn.Parameter], clip: float | None) -> torch.Tensor:
    """The gradients' total norm (for the finite check), clipping them to `clip` if set."""
    if clip:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    # Without clipping, measuring alone skips a multiply of every gradient by 1.0.
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _wrap(
    model: torch.nn.Module, compile: bool, precision: str, device: torch.device, world: int
) -> tuple[torch.nn.Module, Any]:
    """The module the loop calls (DDP across ranks, compiled if asked) and its autocast."""
    step_model = model
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        unused = getattr(model, "has_unused_parameters", True)
        step_model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
    step_model = torch.compile(step_model) if compile else step_model
    dtype = AUTOCAST.get(precision)
    return step_model, (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


def _log_train(
    state: dict,
    max_steps: int,
    lr: float,
    speed: float,
    metrics_log: MetricsLog,
    bar: Any,
    device: torch.device,
) -> None:
    """Log the mean training loss since the last log (over all ranks), lr and speed."""
    loss = state["loss_sum"] / state["loss_n"] if state["loss_n"] else math.nan
    loss = distributed.mean(loss, device)
    metrics_log.log(
        state["step"],
        state["epoch"],
        {"train/loss": loss, "train/lr": lr, "train/samples_per_s": speed},
    )
    log.info(
        "step %d/%d  loss %.4f  lr %.2e  %.0f samples/s", state["step"], max_steps, loss, lr, speed
    )
    bar.update(bar.task_ids[0], completed=state["step"], loss=loss, lr=lr, speed=speed)
    state.update(loss_sum=0.0, loss_n=0)


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


def _resume_path(resume: Any, run_dir: Path) -> Path | None:
    if resume in (None, False, ""):
        return None
    if resume == "auto":
        found = ckpt.newest(run_dir / "checkpoints")
        if found is None:
            log.info(
                "trainer.resume=auto: no checkpoint in %s, starting fresh", run_dir / "checkpoints"
            )
        return found
    path = Path(str(resume))
    if not path.is_file():
        raise UserError(
            f"trainer.resume={resume}: no such checkpoint file. Give a .pt path, or auto with hydra.run.dir=THE_RUN_DIR."
        )
    return path


def _finish(
    run_dir: Path,
    metrics_log: MetricsLog,
    state: dict,
    status: str,
    monitor: str,
    speed: float | None,
    started: float,
    signal_name: str | None,
    bad_samples: dict[str, Any],
) -> float:
    final: dict[str, float] = {}
    for event in metrics_log.events:
        if any(key.startswith("val/") for key in event):
            final = {k: v for k, v in event.items() if k not in ("step", "epoch")}
    best = state["best"] if state["best"] is not None and math.isfinite(state["best"]) else None
    best = round(best, 6) if best is not None else None
    summary = {
        "status": status,
        "best": {"metric": monitor, "value": best, "step": state["best_step"]},
        "final": final,
        "steps": state["step"],
        "epochs": state["epoch"],
        "samples_per_s": round(speed, 1) if speed else None,
        "wall_s": round(time.perf_counter() - started, 1),
        "bad_samples": bad_samples,
        "nonfinite_steps_skipped": state["skipped"],
    }
    if distributed.is_main():
        write_json(run_dir / "summary.json", summary)
        if metrics_log.events:
            plot_curves(metrics_log.events, run_dir / "curves.png")
    if status == "interrupted":
        raise UserError(
            f"Interrupted by {signal_name} at step {state['step']}; the checkpoint {run_dir / 'checkpoints' / 'last.pt'} is saved. "
            f"Resume with: mmtrain train trainer.resume=auto hydra.run.dir={run_dir} (and the same overrides)."
        )
    if status == "failed":
        raise UserError(
            f"Training stopped at step {state['step']} on non-finite numbers; see {run_dir / 'train.log'}."
        )
    shown = f"{best:.4f}" if best is not None else "none"
    log.info(
        "%s: best %s %s at step %s; summary in %s",
        status,
        monitor,
        shown,
        state["best_step"],
        run_dir / "summary.json",
    )
    return best if best is not None else math.nan
