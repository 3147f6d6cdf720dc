"""Where a training step of mmtrain's default model goes, and what mmtrain itself adds.

1. torch.profiler over a few optimizer steps of `mmtrain.recipe.fit` (the default config,
   logging to train.log and the console as `mmtrain train` does): the top operators by
   total and by self CPU time. The profiler steps at each optimizer step (a global
   post-step hook), so one profiled step is one whole iteration of the loop.
2. The per-step cost of each piece of the loop that is mmtrain's own (outside the model's
   forward and backward and the optimizer), timed alone on the same objects (model, batch,
   optimizer, schedule, metrics log, progress bar), against the plain step it wraps.

    python benchmarks/profile_step.py [--threads 1] [--steps 20] [--trace trace.json]
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import rich
import torch
from common import compose_cfg
from rich.console import Console
from rich.logging import RichHandler
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

from mmtrain import assemble
from mmtrain.data import augment as aug
from mmtrain.devices import resolve_device, seed_everything
from mmtrain.recipe import fit
from mmtrain.runlog import MetricsLog, progress_bar
from mmtrain.spec import parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="profiled optimizer steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rows", type=int, default=20, help="operators shown per table")
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace of the steps")
    parser.add_argument(
        "--bar-seconds", type=float, default=3.0,
        help="seconds the progress bar's refresh thread is watched, per refresh rate",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="more config overrides (KEY=VALUE)")
    return parser.parse_args()


def grad_norm(params: list[torch.nn.Parameter], clip: float | None) -> torch.Tensor:
    """The loop's gradient norm (mmtrain.loop, for its finite check): the total norm,
    clipping to `clip` if set; without clipping, measured alone."""
    if clip:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def cli_logging(run_dir: Path, console: Console) -> None:
    """Root logger as conf/hydra/job_logging/mmtrain.yaml sets it: rich console + train.log."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file = logging.FileHandler(run_dir / "train.log")
    file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    shown = RichHandler(console=console, show_path=False, markup=False, log_time_format="[%X]")
    root.addHandler(shown)
    root.addHandler(file)
    root.setLevel(logging.INFO)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def profile_fit(args: argparse.Namespace, overrides: list[str]) -> None:
    wait, warmup = 3, 2
    steps = wait + warmup + args.steps
    cfg = compose_cfg(
        [
            *overrides,
            f"trainer.max_steps={steps}",
            f"data.train_size={steps * args.batch_size}",  # one epoch: no validation inside
            f"data.val_size={args.batch_size}",
            "data.test_size=0",
        ]
    )
    spec = parse(cfg)
    with tempfile.TemporaryDirectory(prefix="mmtrain-profile-") as tmp:
        cli_logging(Path(tmp), Console(stderr=True))
        with profile(
            activities=[ProfilerActivity.CPU]
            + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []),
            schedule=schedule(wait=wait, warmup=warmup, active=args.steps),
        ) as prof:
            handle = register_optimizer_step_post_hook(lambda *_: prof.step())
            try:
                fit(spec, Path(tmp))
            finally:
                handle.remove()
        logging.getLogger().handlers.clear()
    events = prof.key_averages()
    print(f"\n== torch.profiler: {args.steps} steps of mmtrain.recipe.fit, by total CPU time ==")
    print(events.table(sort_by="cpu_time_total", row_limit=args.rows))
    print(f"== the same {args.steps} steps, by self CPU time ==")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


def cost_us(fn: Callable[[], object], number: int, repeat: int = 7) -> float:
    """Microseconds per call: the fastest of `repeat` runs (others' jobs only add time)."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best * 1e6


def bar_refresh_cpu(refresh_per_second: float | None = None, seconds: float = 3.0) -> float:
    """CPU seconds per second that mmtrain's started progress bar uses on a terminal (its
    refresh thread; the loop sleeps meanwhile), at rich's default or the given refresh rate."""
    rich.reconfigure(file=open(os.devnull, "w"), force_terminal=True, width=120)  # noqa: SIM115
    idle = time.process_time()
    time.sleep(seconds)
    idle = time.process_time() - idle
    bar = progress_bar(True, 1000, 0)
    if refresh_per_second:
        bar.live.refresh_per_second = refresh_per_second
    with bar:
        bar.update(bar.task_ids[0], completed=10, loss=0.5, lr=1e-3, speed=700.0)
        used = time.process_time()
        time.sleep(seconds)
        used = time.process_time() - used
    rich.reconfigure()
    return (used - idle) / seconds


def own_costs(args: argparse.Namespace, overrides: list[str]) -> None:
    """Time each piece of mmtrain's per-step work alone, on the objects fit builds
    (`mmtrain.assemble.training_run`)."""
    spec = parse(compose_cfg(overrides))
    t = spec.trainer
    device = resolve_device(t.device)
    seed_everything(t.seed)
    run = assemble.training_run(spec, None, device, None)
    model, optimizer, scheduler, scaler = run.model, run.optimizer, run.scheduler, run.scaler
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    loaded = {k: v.to(device) for k, v in next(iter(run.train_loader)).items()}
    # What the model is fed, as in the loop: the loaded batch augmented on the device.
    batch = run.augment(loaded, (0, 0, 0))
    augmenting = ", ".join(name for name, *_ in spec.augment[aug.IMAGE]) or "no augmentation on"

    def plain_step() -> None:  # what the plain loop does per step, with the same loss
        loss = model(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_us = cost_us(plain_step, number=5)
    loss = model(**batch)["loss"]
    loss.backward()  # gradients in place, as when the loop clips them
    norm = grad_norm(trainable, None)
    step_loss = loss.detach()

    with tempfile.TemporaryDirectory(prefix="mmtrain-costs-") as tmp:
        cli_logging(Path(tmp), Console(file=io.StringIO(), force_terminal=True, width=120))
        log = logging.getLogger("mmtrain")
        metrics_log = MetricsLog(Path(tmp))
        train_loader = run.train_loader
        batches = iter(train_loader)

        def next_batch() -> None:
            nonlocal batches
            try:
                next(batches)
            except StopIteration:
                batches = iter(train_loader)

        every = t.log_every_n_steps
        with progress_bar(True, 10**6, 0) as bar:

            def log_event() -> None:
                metrics_log.log(
                    1, 0, {"train/loss": 0.5, "train/lr": 1e-3, "train/samples_per_s": 700.0}
                )
                log.info("step %d/%d  loss %.4f  lr %.2e  %.0f samples/s", 1, 940, 0.5, 1e-3, 700.0)
                bar.update(bar.task_ids[0], completed=1, loss=0.5, lr=1e-3, speed=700.0)

            pieces = {
                f"batch to device: dict comprehension over {len(loaded)} tensors": lambda: {
                    k: v.to(device, non_blocking=True) for k, v in loaded.items()
                },
                f"augment hook ({augmenting})": lambda: run.augment(loaded, (1, 0, 0)),
                "scaler.scale(loss / accumulate) (scaler off)": lambda: scaler.scale(loss / 1),
                "step_loss + loss.detach()": lambda: 0.0 + loss.detach(),
                "scaler.unscale_ + scaler.update (scaler off)": lambda: (
                    scaler.unscale_(optimizer),
                    scaler.update(),
                ),
                f"grad_norm(trainable, {t.grad_clip}) (trainer.grad_clip={t.grad_clip})": lambda: (
                    grad_norm(trainable, t.grad_clip)
                ),
                "float(step_loss) + isfinite(loss, grad_norm)": lambda: (
                    math.isfinite(float(step_loss) / 1) and bool(torch.isfinite(norm))
                ),
                "scheduler.step()": scheduler.step,
                f"metrics.jsonl + log.info + bar.update, 1 in {every} steps": log_event,
            }
            costs = {name: cost_us(fn, number=200) for name, fn in pieces.items()}
            costs[f"metrics.jsonl + log.info + bar.update, 1 in {every} steps"] /= every
        extra = {
            "clip_grad_norm_(max_norm=1.0): the loop's norm at grad_clip=1.0": cost_us(
                lambda: torch.nn.utils.clip_grad_norm_(trainable, 1.0), number=200
            ),
            "get_total_norm(grads): the loop's norm at grad_clip=null": cost_us(
                lambda: torch.nn.utils.get_total_norm([p.grad for p in trainable]), number=200
            ),
            "next batch from mmtrain's train loader (same in the plain loop)": cost_us(
                next_batch, number=20
            ),
        }
        logging.getLogger().handlers.clear()
    bar_cpu = bar_refresh_cpu(seconds=args.bar_seconds)
    bar_cpu_1hz = bar_refresh_cpu(refresh_per_second=1, seconds=args.bar_seconds)

    print(
        f"\n== mmtrain's own per-step work, timed alone (fastest of 7), "
        f"against the plain step (forward, backward, AdamW, zero_grad): {step_us / 1e3:.2f} ms =="
    )
    for name, us in costs.items():
        print(f"  {name:62s} {us:9.1f} us  {100 * us / step_us:6.2f} %")
    total = sum(costs.values())
    print(
        f"  {f'sum (grad_clip={t.grad_clip})':62s} {total:9.1f} us  {100 * total / step_us:6.2f} %"
    )
    print("  for comparison:")
    for name, us in extra.items():
        print(f"  {name:62s} {us:9.1f} us  {100 * us / step_us:6.2f} %")
    print(
        f"  progress bar on a terminal, its refresh thread: {1e3 * bar_cpu:.1f} ms of CPU per "
        f"second ({100 * bar_cpu:.2f} % of a core); at refresh_per_second=1: "
        f"{1e3 * bar_cpu_1hz:.1f} ms ({100 * bar_cpu_1hz:.2f} %)"
    )


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()}",
        flush=True,
    )
    overrides = [f"data.batch_size={args.batch_size}", *args.overrides]
    profile_fit(args, overrides)
    own_costs(args, overrides)


if __name__ == "__main__":
    main()
