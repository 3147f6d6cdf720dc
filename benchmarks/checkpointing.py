"""Activation memory saved by `model.gradient_checkpointing=true`, and what it costs in time.

A ViT-B/32-sized CLIP (random weights, built from a config; the concat head, or
`--model clip_contrastive`; `--size small`: conf/model's small towers instead) takes one forward and backward on a synthetic batch, with and
without transformers' gradient checkpointing, each in a fresh process so that neither
inherits the other's memory. Gradients are allocated before the measured step, so the
figure is what the step adds: activations kept for backward, and temporaries.

- CPU: the peak resident set size during the step minus the resident size before it
  (glibc is told to return every allocation over 64 KiB to the system, so the resident
  size follows live memory).
- CUDA: torch.cuda.max_memory_allocated during the step minus memory_allocated before it.

    python benchmarks/checkpointing.py [--batch-size 16] [--threads 1] [--steps 3]
    python benchmarks/checkpointing.py --size small --batch-size 2 --steps 1 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from common import MODELS, ClipVocab, PeakMemory, compose_cfg, quiet, set_threads, synthetic_batch

from mmtrain import registry
from mmtrain.devices import resolve_device, seed_everything
from mmtrain.models.backbone import backbone_spec
from mmtrain.spec import LOADING_KEYS, plain

SIZES_SHOWN = {"vit-b32": "ViT-B/32", "small": "small (conf/model)"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--text-len", type=int, default=77)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the measured one")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--model", default="clip_fusion", choices=["clip_fusion", "clip_contrastive"]
    )
    parser.add_argument(
        "--size", default="vit-b32", choices=list(MODELS),
        help="the towers' sizes: ViT-B/32's, or conf/model's small default",
    )  # fmt: skip
    parser.add_argument("--variant", choices=["off", "on"], help=argparse.SUPPRESS)
    return parser.parse_args()


def measure(args: argparse.Namespace) -> dict:
    """One variant, in this process: activation memory of one step, then step times."""
    set_threads(args.threads)
    quiet()
    device = resolve_device(args.device)
    overrides = [f"model={args.model}", *MODELS[args.size]]
    if args.model == "clip_contrastive":
        overrides = [o for o in overrides if "fusion" not in o]
    overrides.append(f"model.gradient_checkpointing={args.variant == 'on'}")
    model_cfg = plain(compose_cfg(overrides).model)
    for key in LOADING_KEYS:  # the spec's keys, not the factory's
        model_cfg.pop(key, None)
    if "num_classes" in model_cfg:
        model_cfg["num_classes"] = 2
    spec = backbone_spec(None, model_cfg["backbone_config"])
    args.text_len = min(args.text_len, spec.max_text_length)  # the small towers take 32
    tokenizer = ClipVocab()
    seed_everything(0)
    model = registry.build("model", model_cfg, tokenizer=tokenizer, spec=spec).to(device).train()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    batch = synthetic_batch(
        args.batch_size, spec.image_size, args.text_len, len(tokenizer), tokenizer.eos_token_id,
        device,
    )  # fmt: skip
    memory = PeakMemory(device)
    before = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else _rss_mib()
    memory.reset()
    model(**batch)["loss"].backward()
    peak = memory.peak_mib()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model(**batch)["loss"].backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "activation_mib": peak - before,
        "step_s": statistics.median(times) if times else float("nan"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "text_len": args.text_len,
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    args = parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return
    results = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    for variant in ("off", "on"):
        command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant]
        out = subprocess.run(command, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"the {variant} variant failed:\n{out.stderr[-3000:]}")
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    off, on = results["off"], results["on"]
    print(
        f"{args.model}, {SIZES_SHOWN[args.size]} sizes, batch {args.batch_size}, "
        f"{off['text_len']} text tokens, fp32, device {off['device']}"
    )
    print(f"{'gradient checkpointing':<24}{'step memory MiB':>16}{'step s':>10}")
    for name, result in (("off", off), ("on", on)):
        print(f"{name:<24}{result['activation_mib']:>16,.0f}{result['step_s']:>10.2f}")
    print(
        f"saved: {off['activation_mib'] - on['activation_mib']:,.0f} MiB "
        f"({1 - on['activation_mib'] / off['activation_mib']:.0%} of the step's memory); "
        f"time x{on['step_s'] / off['step_s']:.2f}"
    )


if __name__ == "__main__":
    main()
