"""Training speed of mmtrain's loop against a plain PyTorch loop on the same model and data.

In one process, alternating (plain, mmtrain, plain, mmtrain, ...) for --repeats rounds:

- plain: a hand-written loop, the seed's: forward, cross-entropy, backward, AdamW step,
  zero_grad, over the same data (mmtrain's dataset and collate in a standard shuffled
  DataLoader), with the same model (mmtrain's factory, the same initial weights), batch
  size, precision (autocast for bf16) and AdamW kernel (fused on CUDA, as mmtrain picks).
- mmtrain: `mmtrain.loop.fit` on conf/ composed with Hydra, into a temporary run directory,
  logging quiet (which also turns the progress bar off).

Both loops compute the same loss: the benchmark sets model.contrastive_weight=0 (plain
cross-entropy) and trainer.grad_clip=null (the plain loop does not clip). Both are timed by
one clock, a global optimizer post-step hook: steady-state samples/s counts the steps after
--warmup. mmtrain's own per-interval `train/samples_per_s` (metrics.jsonl) is shown beside.

Then the start-up of the `mmtrain train` command: from spawning it to its first
metrics.jsonl line (trainer.log_every_n_steps=1), with the phases read from train.log.

On CUDA (or with --variants) also the plain-loop rows of DESIGN.md section 8, model step only
on synthetic tensors already on the device, each row adding one change to the one before:
fp32 eager (the seed's loop), tf32, bf16 autocast, bf16 + fused AdamW + SDPA, + torch.compile.

    python benchmarks/throughput.py --threads 1          # CPU, the default small model
    python benchmarks/throughput.py --device cuda --model vit-b32 --batch-size 256 \
        --precision bf16 --steps 30 --warmup 10 --repeats 2 --startup-repeats 1
    python benchmarks/throughput.py --model vit-b32 --count-flops   # GFLOP per sample only

On a CPU that other jobs share, use --threads 1: two torch threads spin-waiting for a
descheduled partner ran 15-30x slower there (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import datetime
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
    synthetic_batch,
)
from torch.nn import functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from mmtrain import registry
from mmtrain.config import plain, validate
from mmtrain.data.loader import PairDataset
from mmtrain.loop import fit
from mmtrain.models.backbone import backbone_spec
from mmtrain.setup import build_parts, seed_everything

# name, attention, autocast dtype, fused AdamW, tf32, torch.compile
VARIANTS = [
    ("fp32 eager (the seed's loop)", "eager", None, False, False, False),
    ("+ tf32", "eager", None, False, True, False),
    ("+ bf16 autocast", "eager", torch.bfloat16, False, True, False),
    ("+ fused AdamW + SDPA", "sdpa", torch.bfloat16, True, True, False),
    ("+ torch.compile", "sdpa", torch.bfloat16, True, True, True),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=tuple(MODELS), default="small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the speed")
    parser.add_argument("--compile", action="store_true", help="torch.compile in both loops")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of plain, mmtrain, ...")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, both loops")
    parser.add_argument("--log-every", type=int, default=10, help="mmtrain's log interval")
    parser.add_argument("--startup-repeats", type=int, default=3, help="0 skips the start-up test")
    parser.add_argument("--text-len", type=int, default=77, help="tokens in synthetic batches")
    parser.add_argument(
        "--variants",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the section 8 plain-loop rows (default: on with CUDA only)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads, start-up test too (default: torch's)"
    )
    parser.add_argument(
        "--count-flops",
        action="store_true",
        help="only count the FLOP of one training sample (vit-b32: synthetic, --text-len)",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    if args.steps <= args.warmup + 1:
        parser.error("--steps must exceed --warmup + 1")
    if args.variants is None:
        args.variants = args.device == "cuda"
    return args


def model_overrides(args: argparse.Namespace) -> list[str]:
    """What both loops and the start-up test share: model, device, precision, compile."""
    return [
        *MODELS[args.model],
        f"trainer.device={args.device}",
        f"trainer.precision={args.precision}",
        f"trainer.compile={str(args.compile).lower()}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.num_workers}",
    ]


def run_overrides(args: argparse.Namespace) -> list[str]:
    """One epoch of exactly --steps batches, a one-batch validation, the plain loop's loss."""
    return [
        *model_overrides(args),
        "model.contrastive_weight=0",
        "trainer.grad_clip=null",
        f"trainer.max_steps={args.steps}",
        f"trainer.log_every_n_steps={args.log_every}",
        f"scheduler.warmup_steps={args.steps // 4}",  # the learning rate does not change speed
        f"data.train_size={args.steps * args.batch_size}",
        f"data.val_size={args.batch_size}",
        "data.test_size=0",
    ]


def speeds(clock: StepClock, args: argparse.Namespace, device: torch.device) -> dict:
    """Steady-state samples per second of wall time, and on CPU per second of CPU time."""
    result = {"samples_per_s": clock.samples_per_s(args.batch_size)}
    if device.type == "cpu":
        result["samples_per_cpu_s"] = clock.samples_per_s(args.batch_size, cpu=True)
    return result


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


def adamw(model: torch.nn.Module, cfg: Any, fused: bool) -> torch.optim.AdamW:
    o = cfg.optimizer
    return torch.optim.AdamW(
        model.parameters(),
        lr=o.lr,
        weight_decay=o.weight_decay,
        betas=tuple(o.betas),
        fused=fused or None,
    )


def plain_loop(parts, init_state, cfg, args, device, memory, sync_loss=False) -> dict:
    """The plain loop over the same data, timed from a fresh copy of the initial weights."""
    model = parts.model
    model.load_state_dict(init_state)
    model.to(device).train()
    optimizer = adamw(model, cfg, fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    loader = DataLoader(
        PairDataset(parts.splits["train"]),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=parts.train_collate,
        num_workers=args.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        generator=torch.Generator().manual_seed(0),
    )
    keys = ("images", "input_ids", "attention_mask", "labels")
    memory.reset()
    with StepClock(device, args.warmup, args.steps) as clock:
        for batch in itertools.islice(loader, args.steps):
            batch = {k: batch[k].to(device, non_blocking=True) for k in keys}
            train_step(step_model, batch, optimizer, dtype, device, sync_loss)
    result = {**speeds(clock, args, device), "peak_mib": memory.peak_mib()}
    del optimizer, step_model
    model.to("cpu")
    _free(device)
    return result


def mmtrain_loop(cfg, args, device, memory) -> dict:
    """mmtrain.loop.fit into a temporary run directory, timed by the same clock."""
    with tempfile.TemporaryDirectory(prefix="mmtrain-bench-") as tmp:
        memory.reset()
        with StepClock(device, args.warmup, args.steps) as clock:
            fit(cfg, Path(tmp))
        peak = memory.peak_mib()
        events = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").open()]
    reported = [
        e["train/samples_per_s"]
        for e in events
        if "train/samples_per_s" in e and e["step"] - args.log_every >= args.warmup
    ]
    _free(device)
    return {
        **speeds(clock, args, device),
        "reported_samples_per_s": statistics.median(reported) if reported else float("nan"),
        "fit_to_first_step_s": clock.first_step_s(),
        "peak_mib": peak,
    }


def variant_model(cfg, tokenizer) -> tuple[torch.nn.Module, Any]:
    model_cfg = plain(cfg.model)
    model_cfg["num_classes"] = 2
    spec = backbone_spec(None, model_cfg["backbone_config"])
    seed_everything(cfg.trainer.seed)
    return registry.build("model", model_cfg, tokenizer=tokenizer, spec=spec), spec


def variant_loop(variant, cfg, tokenizer, args, device, memory) -> dict:
    """One section 8 row: the model step alone on synthetic tensors already on the device."""
    name, attention, dtype, fused, tf32, compiled = variant
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    model, spec = variant_model(cfg, tokenizer)
    model.clip.set_attn_implementation(attention)
    model.to(device).train()
    optimizer = adamw(model, cfg, fused=fused)
    step_model = torch.compile(model) if compiled else model
    batch = synthetic_batch(
        args.batch_size,
        spec.image_size,
        args.text_len,
        len(tokenizer),
        tokenizer.eos_token_id,
        device,
    )
    memory.reset()
    with StepClock(device, args.warmup, args.steps) as clock:
        for _ in range(args.steps):
            train_step(step_model, batch, optimizer, dtype, device)
    result = {**speeds(clock, args, device), "peak_mib": memory.peak_mib()}
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
        2,
        spec.image_size,
        args.text_len,
        len(tokenizer),
        tokenizer.eos_token_id,
        device,
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


LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]*\]\[\w+\] (.*)$")
PHASES = {"building data": "data", "building model": "model", "training ": "loop"}


def startup(args) -> dict:
    """Seconds from spawning `mmtrain train` to its first metrics.jsonl line, and phases."""
    exe = Path(sys.executable).with_name("mmtrain")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "mmtrain"]
    with tempfile.TemporaryDirectory(prefix="mmtrain-startup-") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = [
            *model_overrides(args),
            "trainer.log_every_n_steps=1",
            "trainer.max_steps=2",
            f"hydra.run.dir={run_dir}",
        ]
        metrics = run_dir / "metrics.jsonl"
        with open(Path(tmp) / "console.txt", "w") as console:
            spawned = time.time()
            env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
            process = subprocess.Popen(
                [*command, "train", *overrides], stdout=console, stderr=console, env=env
            )
            first = None
            while first is None and process.poll() is None:
                if metrics.exists() and "\n" in metrics.read_text():
                    first = time.time() - spawned
                else:
                    time.sleep(0.01)
            code = process.wait(timeout=600)
        if first is None or code != 0:
            raise RuntimeError(
                f"mmtrain train failed (exit {code}):\n{(Path(tmp) / 'console.txt').read_text()[-3000:]}"
            )
        marks = {"first log line": None}
        for line in (run_dir / "train.log").read_text().splitlines():
            match = LOG_LINE.match(line)
            if not match:
                continue
            at = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - spawned
            marks["first log line"] = marks["first log line"] or at
            for prefix, phase in PHASES.items():
                if match[2].startswith(prefix) and phase not in marks:
                    marks[phase] = at
    return {
        "first_step_s": first,
        "imports_and_config_s": marks["first log line"],
        "data_s": marks["model"] - marks["data"],
        "model_and_optimizer_s": marks["loop"] - marks["model"],
        "first_step_after_setup_s": first - marks["loop"],
    }


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summary(values: list[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "all": [round(v, 2) for v in values],
    }


def summarize(runs: list[dict]) -> dict:
    """Each figure of a loop's runs, summarized over the repeats."""
    return {key: summary([run[key] for run in runs]) for key in runs[0]}


def main() -> None:
    args = parse_args()
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    memory = PeakMemory(device)
    cfg = compose_cfg(run_overrides(args))
    validate(cfg)
    spec = backbone_spec(None, plain(cfg.model.backbone_config))
    args.text_len = min(args.text_len, spec.max_text_length)
    if args.count_flops and args.model == "vit-b32":
        gflop = flops_per_sample(cfg, ClipVocab(), args, device) / 1e9
        print(f"{args.model}, {args.text_len} text tokens: {gflop:.2f} GFLOP per training sample")
        return
    seed_everything(cfg.trainer.seed)
    parts = build_parts(cfg, None)  # the data and model fit builds, for the plain loop
    if args.count_flops:
        gflop = flops_per_sample(cfg, parts.tokenizer, args, device) / 1e9
        print(f"{args.model}, {args.text_len} text tokens: {gflop:.4f} GFLOP per training sample")
        return
    init_state = copy.deepcopy(parts.model.state_dict())
    params = sum(p.numel() for p in parts.model.parameters())
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    results["load_average_before"] = os.getloadavg()
    print(
        f"device {device_name} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}); "
        f"model {args.model} ({params / 1e6:.2f} M parameters), batch {args.batch_size}, "
        f"precision {args.precision}, compile {args.compile}, {args.steps} steps "
        f"({args.warmup} warm-up), {args.repeats} repeats",
        flush=True,
    )

    loops = {"plain": [], "mmtrain": []}
    if device.type == "cuda":
        loops["plain + float(loss) each step"] = []
    variants = {variant[0]: [] for variant in VARIANTS} if args.variants else {}
    tokenizer = ClipVocab() if args.model == "vit-b32" else parts.tokenizer
    for repeat in range(args.repeats):
        loops["plain"].append(plain_loop(parts, init_state, cfg, args, device, memory))
        if "plain + float(loss) each step" in loops:
            loops["plain + float(loss) each step"].append(
                plain_loop(parts, init_state, cfg, args, device, memory, sync_loss=True)
            )
        loops["mmtrain"].append(mmtrain_loop(cfg, args, device, memory))
        for variant in VARIANTS if args.variants else ():
            variants[variant[0]].append(variant_loop(variant, cfg, tokenizer, args, device, memory))
        shown = "  ".join(f"{k} {v[-1]['samples_per_s']:.1f}" for k, v in loops.items())
        print(f"repeat {repeat + 1}: samples/s  {shown}", flush=True)

    results["device"], results["parameters"] = device_name, params
    results["loops"] = {name: summarize(runs) for name, runs in loops.items()}
    for key in ("samples_per_s", "samples_per_cpu_s"):
        if key in loops["plain"][0]:
            pairs = zip(loops["plain"], loops["mmtrain"], strict=True)
            results[f"ratio_{key}"] = {
                "of_medians": results["loops"]["mmtrain"][key]["median"]
                / results["loops"]["plain"][key]["median"],
                "per_repeat": summary([m[key] / p[key] for p, m in pairs]),
            }
    if variants:
        flops = flops_per_sample(cfg, tokenizer, args, device)
        results["variants"] = {
            "gflop_per_sample": flops / 1e9,
            "text_len": args.text_len,
            "rows": {
                name: {
                    **summarize(runs),
                    "tflop_per_s": statistics.median(r["samples_per_s"] for r in runs)
                    * flops
                    / 1e12,
                }
                for name, runs in variants.items()
            },
        }
    if args.startup_repeats:
        runs = [startup(args) for _ in range(args.startup_repeats)]
        results["startup"] = {key: summary([r[key] for r in runs]) for key in runs[0]}

    cpu = device.type == "cpu"
    print(
        "\nsteady state, samples/s (median [min, max])"
        + (", samples per CPU-second (median)" if cpu else "")
        + ", peak memory (MiB, median):"
    )
    for name, figures in results["loops"].items():
        s = figures["samples_per_s"]
        print(
            f"  {name:32s} {s['median']:9.1f} [{s['min']:.1f}, {s['max']:.1f}]"
            + (f"  {figures['samples_per_cpu_s']['median']:8.1f}" if cpu else "")
            + f"  peak {figures['peak_mib']['median']:.0f}"
        )
    mm = results["loops"]["mmtrain"]
    print(
        f"  mmtrain's own train/samples_per_s (metrics.jsonl): "
        f"{mm['reported_samples_per_s']['median']:.1f}; fit() to first step "
        f"{mm['fit_to_first_step_s']['median']:.2f} s"
    )
    for key, label in (("samples_per_s", "wall time"), ("samples_per_cpu_s", "CPU time")):
        if f"ratio_{key}" in results:
            ratio = results[f"ratio_{key}"]
            per = ratio["per_repeat"]
            print(
                f"  mmtrain / plain ({label}): {ratio['of_medians']:.3f} (ratio of medians); "
                f"per repeat median {per['median']:.3f} [{per['min']:.3f}, {per['max']:.3f}]"
            )
    if variants:
        v = results["variants"]
        print(
            f"\nplain loop, model step only, synthetic tensors on the device, "
            f"{args.text_len} text tokens, {v['gflop_per_sample']:.3g} GFLOP per sample:"
        )
        for name, figures in v["rows"].items():
            s = figures["samples_per_s"]
            print(
                f"  {name:32s} {s['median']:9.1f} [{s['min']:.1f}, {s['max']:.1f}]"
                f"  {figures['tflop_per_s']:.3g} TFLOP/s  peak {figures['peak_mib']['median']:.0f}"
            )
    if "startup" in results:
        st = {k: v["median"] for k, v in results["startup"].items()}
        print(
            f"\nmmtrain train start-up to the first step (median of {args.startup_repeats}): "
            f"{st['first_step_s']:.2f} s = imports and config {st['imports_and_config_s']:.2f}"
            f" + data {st['data_s']:.2f} + model and optimizer {st['model_and_optimizer_s']:.2f}"
            f" + first step {st['first_step_after_setup_s']:.2f}"
            f"  (all runs: {results['startup']['first_step_s']['all']})"
        )
    results["load_average_after"] = os.getloadavg()
    print(f"load average (1, 5, 15 min) at the end: {results['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
