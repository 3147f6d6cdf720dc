"""Training speed of mmtrain's loop against a plain PyTorch loop, in short alternating blocks.

What is measured, in one process, with torch's CPU threads fixed first (--threads, default 1
on the CPU):

- mmtrain: one run built once with `mmtrain.assemble.training_run` from conf/ composed with
  Hydra (checked by `mmtrain.spec.parse`),
  stepped by mmtrain's real loop `mmtrain.loop.train_loop(run, state, out)`: one TrainState
  and one Outputs (metrics.jsonl and checkpoints in a temporary directory) across calls;
  before each call `run.max_steps = state.step + N`, so a call is one block of N optimizer
  steps. mmtrain validates (one batch: data.val_size = batch size), logs and saves
  last.pt/best.pt after the last step of each block, outside the timed steps.
- plain: the seed's loop, written by hand: forward, cross-entropy, backward, AdamW step,
  zero_grad, over a persistent iterator of a standard shuffled DataLoader on the same
  training split and collate that the run built, with a copy of the run's model taken
  before any step (the same initial weights), the same batch size, precision (autocast for
  bf16) and AdamW kernel (fused on CUDA, as mmtrain picks) and torch.compile if asked.

Both loops do the same augmentation: with --augment on (the default, as `mmtrain train`
runs) each batch goes through the run's image augmentation on the device (the default
random_resized_crop) in the plain loop too; with --augment off neither augments
(data/augment=none). The augmentation's own cost is timed apart, on one batch on the device,
and reported on its own line (ms per batch, and its share of a plain step).

Both compute the same loss: model.contrastive_weight=0 (plain cross-entropy) and
trainer.grad_clip=null (the plain loop does not clip; mmtrain still computes the gradient
norm for its finite check, which is its own cost and is timed). data.train_size holds every
step of the run, so no epoch ends inside a block.

After --warmup-steps untimed steps of each loop, --blocks rounds each run one block of
--block-steps steps of both loops, in the order plain, mmtrain in even rounds and mmtrain,
plain in odd rounds (ABBA: a steady drift in the machine's speed cancels; --order random
draws each round's order from --seed). A block is timed by a global optimizer post-step
hook (common.StepClock), from the end of its first optimizer step to the end of its last:
N - 1 steps, each with its batch fetch, forward, backward, optimizer step and what the loop
does between steps, and nothing of the block's set-up or of the validation after it. On
CUDA the two boundary steps synchronize the device. Each round gives one ratio, mmtrain
samples/s over plain samples/s; the result is the median of these per-round ratios with
their min, max and interquartile range, beside each loop's median samples/s. On the CPU the
same is reported per second of process CPU time (work done, not time spent waiting for a
core). mmtrain's own `train/samples_per_s` (metrics.jsonl, one interval per block, its first
step included) is shown beside, and each loop's median peak memory per block (CUDA: peak
allocated; CPU: the process's peak RSS; both count every loop's model, which all stay
resident).

On CUDA (or with --variants) also the plain-loop reference rows of benchmarks/RESULTS.md, model step only
on synthetic tensors already on the device, each row adding one change to the one before:
fp32 eager (the seed's loop), tf32, bf16 autocast, bf16 + fused AdamW + SDPA, + torch.compile
(--variant-steps steps after --variant-warmup, --variant-repeats times each). On CUDA a third
loop joins the rounds: "plain + float(loss) each step", the host-device sync that mmtrain's
loop makes every step.

The start-up of the command is measured by benchmarks/startup.py.

    python benchmarks/throughput.py                      # CPU, small model, 1 thread
    python benchmarks/throughput.py --device cuda --model vit-b32 --batch-size 256 \\
        --precision bf16 --blocks 10 --no-checkpoints --json gpu.json
    python benchmarks/throughput.py --model vit-b32 --count-flops   # GFLOP per sample only
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from common import (
    MODELS,
    ClipVocab,
    PeakMemory,
    StepClock,
    compose_cfg,
    quiet,
    set_threads,
    spread,
    synthetic_batch,
)
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from mmtrain import assemble, registry
from mmtrain.data.loader import PairDataset
from mmtrain.devices import seed_everything
from mmtrain.loop import Outputs, TrainState, train_loop
from mmtrain.models.backbone import backbone_spec
from mmtrain.run import Run
from mmtrain.runlog import MetricsLog
from mmtrain.spec import LOADING_KEYS, parse, plain

# name, attention, autocast dtype, fused AdamW, tf32, torch.compile
VARIANTS = [
    ("fp32 eager (the seed's loop)", "eager", None, False, False, False),
    ("+ tf32", "eager", None, False, True, False),
    ("+ bf16 autocast", "eager", torch.bfloat16, False, True, False),
    ("+ fused AdamW + SDPA", "sdpa", torch.bfloat16, True, True, False),
    ("+ torch.compile", "sdpa", torch.bfloat16, True, True, True),
]
PLAIN, MMTRAIN, SYNCED = "plain", "mmtrain", "plain + float(loss) each step"
LABELS = {PLAIN: "P", MMTRAIN: "M", SYNCED: "S"}
KEYS = ("images", "input_ids", "attention_mask", "labels")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads, set before anything else (default: 1 on the CPU, torch's on CUDA)",
    )
    parser.add_argument("--model", choices=tuple(MODELS), default="small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--compile", action="store_true", help="torch.compile in both loops")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, both loops")
    parser.add_argument("--block-steps", type=int, default=5, help="optimizer steps per block")
    parser.add_argument("--blocks", type=int, default=20, help="rounds: one block of each loop")
    parser.add_argument(
        "--warmup-steps", type=int, default=10, help="untimed steps of each loop first"
    )
    parser.add_argument(
        "--augment",
        choices=("on", "off"),
        default="on",
        help="the run's image augmentation in both loops (on: the default crop) or in neither",
    )
    parser.add_argument("--order", choices=("abba", "random"), default="abba")
    parser.add_argument("--seed", type=int, default=0, help="--order random's seed")
    parser.add_argument(
        "--checkpoints",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mmtrain saves last.pt/best.pt after each block, as a run would (untimed)",
    )
    parser.add_argument("--text-len", type=int, default=77, help="tokens in synthetic batches")
    parser.add_argument(
        "--variants",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the reference plain-loop rows (RESULTS.md) (default: on with CUDA only)",
    )
    parser.add_argument("--variant-steps", type=int, default=30)
    parser.add_argument("--variant-warmup", type=int, default=10)
    parser.add_argument("--variant-repeats", type=int, default=2)
    parser.add_argument(
        "--count-flops",
        action="store_true",
        help="only count the FLOP of one training sample (vit-b32: synthetic, --text-len)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    if args.block_steps < 2:
        parser.error("--block-steps must be at least 2 (a block times its steps 2..N)")
    if args.variant_steps <= args.variant_warmup + 1:
        parser.error("--variant-steps must exceed --variant-warmup + 1")
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.variants is None:
        args.variants = args.device == "cuda"
    return args


def run_overrides(args: argparse.Namespace) -> list[str]:
    """One epoch holding every step of the run, a one-batch validation, the plain loop's loss."""
    steps = args.warmup_steps + args.blocks * args.block_steps
    return [
        *MODELS[args.model],
        f"trainer.device={args.device}",
        f"trainer.precision={args.precision}",
        f"trainer.compile={str(args.compile).lower()}",
        "trainer.max_epochs=1",
        f"trainer.max_steps={steps}",
        f"trainer.log_every_n_steps={steps}",  # mmtrain logs at each block's end anyway
        "model.contrastive_weight=0",
        "trainer.grad_clip=null",
        f"scheduler.warmup_steps={steps // 4}",  # the learning rate does not change speed
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.num_workers}",
        f"data.train_size={steps * args.batch_size}",
        f"data.val_size={args.batch_size}",
        "data.test_size=0",
        *([] if args.augment == "on" else ["data/augment=none"]),
    ]


def train_step(model, batch, optimizer, dtype, device, sync_loss=False) -> None:
    """The seed's step: forward, cross-entropy, backward, AdamW, zero_grad."""
    with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
        logits = model(
            images=batch["images"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
        )["logits"]
    loss = F.cross_entropy(logits.float(), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if sync_loss:
        float(loss)  # what a loop that logs every step's loss pays: a host-device sync


def adamw(model: torch.nn.Module, cfg: Any, lr: float, fused: bool) -> torch.optim.AdamW:
    """AdamW with the config's decay and betas at `lr`, the rate mmtrain's optimizer took
    (optimizer.lr may be `auto`, which the run resolves from its batch)."""
    o = cfg.optimizer
    return torch.optim.AdamW(
        model.parameters(),
        lr=lr,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        fused=fused or None,
    )


class PlainLoop:
    """The seed's loop on a copy of the run's initial model, stepping N batches per call from
    one persistent iterator over a shuffled DataLoader of the run's training split."""

    def __init__(self, run: Run, cfg: Any, args: argparse.Namespace, sync_loss: bool = False):
        self.device, self.sync_loss = run.device, sync_loss
        self.augment, self.steps = run.augment, 0  # the run's; no entries with --augment off
        self.model = copy.deepcopy(run.model).train()  # before any step: the initial weights
        lr = run.optimizer.defaults["lr"]
        self.optimizer = adamw(self.model, cfg, lr, fused=run.device.type == "cuda")
        self.step_model = torch.compile(self.model) if args.compile else self.model
        self.dtype = torch.bfloat16 if args.precision == "bf16" else None
        built = run.train_loader  # the run's training split and collate
        self.loader = DataLoader(
            PairDataset(built.dataset.split, whole=built.dataset.whole),
            batch_size=args.batch_size,
            shuffle=True,
            collate_fn=built.collate_fn,
            num_workers=args.num_workers,
            pin_memory=run.device.type == "cuda",
            drop_last=True,
            generator=torch.Generator().manual_seed(0),
        )
        self.batches = iter(self.loader)

    def __call__(self, steps: int) -> None:
        for _ in range(steps):
            try:
                batch = next(self.batches)
            except StopIteration:
                self.batches = iter(self.loader)
                batch = next(self.batches)
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            batch = self.augment(batch, (self.steps, 0, 0))  # keyed as mmtrain's loop keys it
            self.steps += 1
            batch = {k: batch[k] for k in KEYS}
            train_step(
                self.step_model, batch, self.optimizer, self.dtype, self.device, self.sync_loss
            )


class MmtrainLoop:
    """mmtrain's `train_loop` on the built run, N steps per call, one state across calls."""

    def __init__(self, run: Run, config: dict[str, Any], run_dir: Path, checkpoints: bool):
        self.run, self.state = run, TrainState()
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        # main=False only skips the checkpoint files; metrics.jsonl is still written.
        self.out = Outputs(run_dir, MetricsLog(run_dir), config, main=checkpoints)

    def __call__(self, steps: int) -> None:
        self.run.max_steps = self.state.step + steps
        status, stopped_by, _ = train_loop(self.run, self.state, self.out)
        if status != "completed" or self.state.step != self.run.max_steps:
            raise SystemExit(
                f"mmtrain's loop stopped: {status} ({stopped_by}) at {self.state.step}"
            )

    def reported(self) -> list[float]:
        """mmtrain's own train/samples_per_s, one per timed block."""
        return [e["train/samples_per_s"] for e in self.out.metrics.events if "train/loss" in e]


def time_block(step_block: Callable[[int], None], args, device, memory) -> dict[str, float]:
    """One block of --block-steps steps: samples/s from its first step's end to its last's."""
    gc.collect()  # each block starts without the garbage of the one before
    memory.reset()
    with StepClock(device, 1, args.block_steps) as clock:
        step_block(args.block_steps)
    if len(clock.times) != args.block_steps:
        raise RuntimeError(f"{len(clock.times)} optimizer steps in a block of {args.block_steps}")
    result = {"samples_per_s": clock.samples_per_s(args.batch_size)}
    if device.type == "cpu":
        result["samples_per_cpu_s"] = clock.samples_per_s(args.batch_size, cpu=True)
    result["peak_mib"] = memory.peak_mib()
    return result


def augment_cost(
    plain_loop: PlainLoop, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """The run's image augmentation alone on one training batch on the device: ms per batch
    (--blocks x --block-steps calls after 2 untimed ones); empty when it is off."""
    augment = plain_loop.augment
    names = [name for name, _, _ in augment.entries]
    if not names:
        return {}
    batch = next(iter(plain_loop.loader))
    batch = {k: v.to(device) for k, v in batch.items() if k in ("images", "aspects")}
    times = []
    for index in range(2 + args.blocks * args.block_steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        augment(batch, (index, 0, 0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"entries": names, "ms_per_batch": spread([t * 1e3 for t in times[2:]])}


def variant_model(cfg, tokenizer) -> tuple[torch.nn.Module, Any]:
    model_cfg = plain(cfg.model)
    model_cfg["num_classes"] = 2
    for key in LOADING_KEYS:  # the spec's keys, not the factory's
        model_cfg.pop(key, None)
    spec = backbone_spec(None, model_cfg["backbone_config"])
    seed_everything(cfg.trainer.seed)
    return registry.build("model", model_cfg, tokenizer=tokenizer, spec=spec), spec


def variant_loop(variant, cfg, tokenizer, lr, args, device, memory) -> dict:
    """One reference row: the model step alone on synthetic tensors already on the device."""
    name, attention, dtype, fused, tf32, compiled = variant
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    model, spec = variant_model(cfg, tokenizer)
    model.clip.set_attn_implementation(attention)
    model.to(device).train()
    optimizer = adamw(model, cfg, lr, fused=fused)
    step_model = torch.compile(model) if compiled else model
    batch = synthetic_batch(
        args.batch_size, spec.image_size, args.text_len, len(tokenizer), tokenizer.eos_token_id,
        device,
    )  # fmt: skip
    memory.reset()
    with StepClock(device, args.variant_warmup, args.variant_steps) as clock:
        for _ in range(args.variant_steps):
            train_step(step_model, batch, optimizer, dtype, device)
    result = {
        "samples_per_s": clock.samples_per_s(args.batch_size),
        "peak_mib": memory.peak_mib(),
    }
    torch.set_float32_matmul_precision("highest")
    del model, optimizer, step_model, batch
    _free(device)
    return result


def flops_per_sample(cfg, tokenizer, args, device) -> float:
    """Counted FLOP of one training sample's forward and backward (synthetic, --text-len)."""
    model, spec = variant_model(cfg, tokenizer)
    model.clip.set_attn_implementation("eager")  # FlopCounterMode misses CPU flash attention
    model.to(device).train()
    batch = synthetic_batch(
        2, spec.image_size, args.text_len, len(tokenizer), tokenizer.eos_token_id, device
    )
    with FlopCounterMode(display=False) as counter:
        logits = model(
            images=batch["images"],
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
        )["logits"]
        F.cross_entropy(logits, batch["labels"]).backward()
    del model
    _free(device)
    return counter.get_total_flops() / 2


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def round_orders(names: list[str], args: argparse.Namespace) -> list[list[str]]:
    """Each round's order of the loops: ABBA, or shuffled from --seed."""
    rng = random.Random(args.seed)
    orders = []
    for index in range(args.blocks):
        if args.order == "abba":
            orders.append(names if index % 2 == 0 else names[::-1])
        else:
            orders.append(rng.sample(names, len(names)))
    return orders


def count_flops_only(args, cfg, device) -> None:
    if args.model == "vit-b32":
        tokenizer, digits = ClipVocab(), 2
    else:
        seed_everything(cfg.trainer.seed)
        tokenizer, digits = assemble.parts(parse(cfg), None).tokenizer, 4
    gflop = flops_per_sample(cfg, tokenizer, args, device) / 1e9
    print(
        f"{args.model}, {args.text_len} text tokens: {gflop:.{digits}f} GFLOP per training sample"
    )


def main() -> None:
    args = parse_args()
    set_threads(args.threads)  # before any torch work
    quiet()
    device = torch.device(args.device)
    memory = PeakMemory(device)
    cfg = compose_cfg(run_overrides(args))
    spec = parse(cfg)
    shape = backbone_spec(None, plain(cfg.model.backbone_config))
    args.text_len = min(args.text_len, shape.max_text_length)
    if args.count_flops:
        count_flops_only(args, cfg, device)
        return

    load_before = os.getloadavg()
    seed_everything(spec.trainer.seed)
    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-") as tmp:
        run = assemble.training_run(spec, None, device, None)
        loops: dict[str, Callable[[int], None]] = {PLAIN: PlainLoop(run, cfg, args)}
        if device.type == "cuda":
            loops[SYNCED] = PlainLoop(run, cfg, args, sync_loss=True)
        mmtrain = loops[MMTRAIN] = MmtrainLoop(run, spec.config, Path(tmp), args.checkpoints)
        params = sum(p.numel() for p in run.model.parameters())
        device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(
            f"device {device_name} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} {load_before[1]:.2f} "
            f"{load_before[2]:.2f}); model {args.model} ({params / 1e6:.2f} M parameters), "
            f"batch {args.batch_size}, precision {args.precision}, compile {args.compile}, augment {args.augment}; "
            f"{args.blocks} rounds ({args.order}) of one {args.block_steps}-step block per loop "
            f"after {args.warmup_steps} warm-up steps each",
            flush=True,
        )
        for step_block in loops.values():
            if args.warmup_steps:
                step_block(args.warmup_steps)
        names = list(loops)
        blocks: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        orders = round_orders(names, args)
        for index, order in enumerate(orders):
            for name in order:
                blocks[name].append(time_block(loops[name], args, device, memory))
            shown = "  ".join(f"{n} {blocks[n][-1]['samples_per_s']:7.1f}" for n in names)
            ratio = blocks[MMTRAIN][-1]["samples_per_s"] / blocks[PLAIN][-1]["samples_per_s"]
            print(
                f"round {index + 1:2d} ({''.join(LABELS[n] for n in order)}): "
                f"samples/s {shown}  ratio {ratio:.3f}",
                flush=True,
            )
        reported = mmtrain.reported()[-args.blocks :]
        augment = augment_cost(loops[PLAIN], args, device)
    load_after = os.getloadavg()

    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "device": device_name,
        "parameters": params,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "rounds": args.blocks,
        "orders": orders,
        "timed_steps_per_block": args.block_steps - 1,
        "loops": {
            name: {key: spread([b[key] for b in runs]) for key in runs[0]}
            for name, runs in blocks.items()
        },
        "mmtrain_reported_samples_per_s": spread(reported),
        "augment": args.augment,
    }
    if augment:  # its share of a plain step: ms per batch over a plain step's ms
        step_ms = 1e3 * args.batch_size / results["loops"][PLAIN]["samples_per_s"]["median"]
        results["augment_cost"] = {
            **augment,
            "share_of_plain_step": augment["ms_per_batch"]["median"] / step_ms,
        }
    for key in ("samples_per_s", "samples_per_cpu_s"):
        if key not in blocks[PLAIN][0]:
            continue
        for name in names:
            if name == PLAIN:
                continue
            per_round = [
                other[key] / base[key]
                for base, other in zip(blocks[PLAIN], blocks[name], strict=True)
            ]
            medians = {n: results["loops"][n][key]["median"] for n in (PLAIN, name)}
            results.setdefault(f"ratio_{key}", {})[name] = {
                "per_round": spread(per_round),
                "of_medians": medians[name] / medians[PLAIN],
            }

    if args.variants:
        tokenizer = (
            ClipVocab() if args.model == "vit-b32" else run.train_loader.collate_fn.tokenizer
        )
        lr = run.optimizer.defaults["lr"]
        del run, loops, mmtrain
        _free(device)
        rows = {variant[0]: [] for variant in VARIANTS}
        for _ in range(args.variant_repeats):
            for variant in VARIANTS:
                rows[variant[0]].append(
                    variant_loop(variant, cfg, tokenizer, lr, args, device, memory)
                )
        flops = flops_per_sample(cfg, tokenizer, args, device)
        results["variants"] = {
            "gflop_per_sample": flops / 1e9,
            "text_len": args.text_len,
            "rows": {
                name: {
                    **{key: spread([r[key] for r in runs]) for key in runs[0]},
                    "tflop_per_s": statistics.median(r["samples_per_s"] for r in runs)
                    * flops
                    / 1e12,
                }
                for name, runs in rows.items()
            },
        }
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    cpu = args.device == "cpu"
    print(
        f"\n{results['rounds']} blocks per loop, {args.block_steps} steps each, "
        f"timed over steps 2-{args.block_steps}; samples/s per block, median [min, max] IQR"
        + (", and per CPU-second" if cpu else "")
        + ":"
    )
    for name, figures in results["loops"].items():
        s = figures["samples_per_s"]
        line = (
            f"  {name:32s} {s['median']:9.1f} [{s['min']:.1f}, {s['max']:.1f}] IQR {s['iqr']:.1f}"
        )
        if cpu:
            c = figures["samples_per_cpu_s"]
            line += f"   CPU-s {c['median']:9.1f} [{c['min']:.1f}, {c['max']:.1f}]"
        print(f"{line}   peak {figures['peak_mib']['median']:.0f} MiB")
    cost = results.get("augment_cost")
    if cost:
        ms = cost["ms_per_batch"]
        print(
            f"  augmentation alone ({', '.join(cost['entries'])}; in both loops above): "
            f"{ms['median']:.3f} ms per batch [{ms['min']:.3f}, {ms['max']:.3f}], "
            f"{100 * cost['share_of_plain_step']:.1f}% of a plain step"
        )
    else:
        print("  augmentation: off in both loops (--augment off)")
    r = results["mmtrain_reported_samples_per_s"]
    print(
        f"  mmtrain's own train/samples_per_s (metrics.jsonl, each block's {args.block_steps} "
        f"steps): median {r['median']:.1f} [{r['min']:.1f}, {r['max']:.1f}]"
    )
    for key, label in (("samples_per_s", "wall time"), ("samples_per_cpu_s", "CPU time")):
        for name, ratio in results.get(f"ratio_{key}", {}).items():
            per = ratio["per_round"]
            print(
                f"  {name} / plain ({label}): per-round ratio median {per['median']:.3f} "
                f"[min {per['min']:.3f}, max {per['max']:.3f}; IQR {per['q1']:.3f}-{per['q3']:.3f}"
                f" = {per['iqr']:.3f}] over {per['n']} rounds; ratio of medians "
                f"{ratio['of_medians']:.3f}"
            )
    if "variants" in results:
        v = results["variants"]
        print(
            f"\nplain loop, model step only, synthetic tensors on the device, "
            f"{v['text_len']} text tokens, {v['gflop_per_sample']:.3g} GFLOP per sample:"
        )
        for name, figures in v["rows"].items():
            s = figures["samples_per_s"]
            print(
                f"  {name:32s} {s['median']:9.1f} [{s['min']:.1f}, {s['max']:.1f}]"
                f"  {figures['tflop_per_s']:.3g} TFLOP/s  peak {figures['peak_mib']['median']:.0f}"
            )
    before, after = results["load_average_before"], results["load_average_after"]
    print(
        "load average (1, 5, 15 min): before "
        + " ".join(f"{x:.2f}" for x in before)
        + ", after "
        + " ".join(f"{x:.2f}" for x in after)
    )


if __name__ == "__main__":
    main()
