"""What logging to TensorBoard at every step costs mmtrain's loop, in alternating blocks.

One run is built once (`mmtrain.assemble.training_run`, conf/ composed with Hydra,
trainer.log_every_n_steps=1) and stepped by mmtrain's real `train_loop` in blocks of N
optimizer steps, alternating two outputs of the same loop (ABBA order, so a steady drift of
the machine cancels):

- files: metrics.jsonl alone (what every run writes), in one temporary run directory;
- tensorboard: the same plus the `tensorboard` logger (`mmtrain.loggers`, a SummaryWriter
  into RUN_DIR/tensorboard) receiving every step's train/loss, train/lr, samples/s, epoch.

A block is timed by common.StepClock from the end of its first optimizer step to the end of
its last: N - 1 steps, each with its batch, forward, backward, optimizer step and the logging
of the step before it, nothing of the validation after the block. Each round gives one ratio,
tensorboard samples/s over files samples/s; the overhead is 1 - the median ratio.

The cost is also timed directly: `MetricsLog.log` of one step's metrics, with and without the
TensorBoard sink, --calls times each, against the median step time of the blocks.

    python benchmarks/tracking.py                  # CPU, small model, 1 thread
    python benchmarks/tracking.py --blocks 30 --block-steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import StepClock, compose_cfg, quiet, set_threads, spread

from mmtrain import assemble, loggers
from mmtrain.devices import seed_everything
from mmtrain.loop import Outputs, TrainState, train_loop
from mmtrain.runlog import MetricsLog
from mmtrain.spec import parse


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--block-steps", type=int, default=8, help="optimizer steps per block")
    parser.add_argument("--blocks", type=int, default=16, help="rounds: one block of each")
    parser.add_argument("--warmup-steps", type=int, default=8)
    parser.add_argument("--calls", type=int, default=2000, help="direct MetricsLog.log calls")
    args = parser.parse_args()
    if min(args.block_steps, args.warmup_steps) < 2:
        parser.error("--block-steps and --warmup-steps must be at least 2 (a block times 2..N)")
    return args


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    quiet()
    steps = 2 * (args.warmup_steps + args.blocks * args.block_steps)
    cfg = compose_cfg(
        [
            "trainer.device=cpu",
            "trainer.max_epochs=1",
            f"trainer.max_steps={steps}",
            "trainer.log_every_n_steps=1",
            f"data.batch_size={args.batch_size}",
            f"data.train_size={steps * args.batch_size}",
            f"data.val_size={args.batch_size}",
            "data.test_size=0",
        ]
    )
    spec = parse(cfg)
    seed_everything(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="mmtrain-tracking-") as tmp:
        run = assemble.training_run(spec, None, torch.device("cpu"), None)
        config = spec.config
        state = TrainState()
        outs = {}
        for name in ("files", "tensorboard"):
            run_dir = Path(tmp) / name
            run_dir.mkdir()
            info = loggers.RunInfo.of(run_dir, config, False, ["train/loss"])
            sinks = [loggers.tensorboard(info)] if name == "tensorboard" else []
            outs[name] = Outputs(run_dir, MetricsLog(run_dir, sinks=sinks), config, main=False)

        def block(name: str, n: int) -> float:
            run.max_steps = state.step + n
            with StepClock(run.device, warmup=1, steps=n) as clock:
                train_loop(run, state, outs[name])
            return clock.samples_per_s(args.batch_size)

        for name in outs:
            block(name, args.warmup_steps)
        speed: dict[str, list[float]] = {name: [] for name in outs}
        ratios = []
        for index in range(args.blocks):
            order = ["files", "tensorboard"] if index % 2 == 0 else ["tensorboard", "files"]
            for name in order:
                speed[name].append(block(name, args.block_steps))
            ratios.append(speed["tensorboard"][-1] / speed["files"][-1])
            print(
                f"round {index + 1:2d}: samples/s files {speed['files'][-1]:7.1f}  "
                f"tensorboard {speed['tensorboard'][-1]:7.1f}  ratio {ratios[-1]:.3f}",
                flush=True,
            )

        # The direct cost of one step's logging call, without and with the sink.
        event = {"train/loss": 1.2345, "train/lr": 1e-3, "train/samples_per_s": 900.0}
        per_call = {}
        for name in ("files", "tensorboard", "files", "tensorboard"):
            metrics = outs[name].metrics
            start = time.perf_counter()
            for i in range(args.calls):
                metrics.log(10_000 + i, 0, event)
            per_call.setdefault(name, []).append((time.perf_counter() - start) / args.calls)
        for out in outs.values():
            out.metrics.finish("completed", {"status": "completed"})

    step_s = args.batch_size / statistics.median(speed["files"])
    sink_s = statistics.median(per_call["tensorboard"]) - statistics.median(per_call["files"])
    ratio = spread(ratios)
    load_after = os.getloadavg()
    print(
        f"\ntorch {torch.__version__} on the CPU, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} CPUs, load {load_before[0]:.2f} -> {load_after[0]:.2f}; "
        f"small model, batch {args.batch_size}, {args.blocks} rounds of {args.block_steps} steps\n"
        f"median samples/s: files {statistics.median(speed['files']):.1f}, "
        f"tensorboard {statistics.median(speed['tensorboard']):.1f}\n"
        f"ratio tensorboard/files: median {ratio['median']:.4f} "
        f"[IQR {ratio['q1']:.4f}-{ratio['q3']:.4f}, min {ratio['min']:.4f}, max {ratio['max']:.4f}]"
        f" -> overhead {100 * (1 - ratio['median']):.2f}% of step time\n"
        f"direct: MetricsLog.log {1e6 * statistics.median(per_call['files']):.0f} us alone, "
        f"+{1e6 * sink_s:.0f} us with TensorBoard, per step of {1e3 * step_s:.1f} ms "
        f"= {100 * sink_s / step_s:.3f}% of step time"
    )


if __name__ == "__main__":
    sys.exit(main())
