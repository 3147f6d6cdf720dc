"""The whole GPU check in one run (about 8 minutes on one H100/H200, no network):

1. the card and versions;
2. the CUDA tests (`pytest -m gpu`: bf16, fp16 + scaler, compile, resume, NCCL under torchrun,
   a GPU-trained run used on the CPU);
3. benchmarks/throughput.py on CUDA: mmtrain's loop against the plain loops in the same
   process (ViT-B/32 sizes, batch 256, bf16), and the plain-loop reference rows;
4. benchmarks/e2e.py: `mmtrain train data=manifest` from generated 640x480 JPEGs with
   10-15 word captions, the cache build timed apart from training.

Every figure goes into OUT/gpu-CARD-DATE.json (commit it as benchmarks/results/...), with at
least `device`, `mmtrain_e2e_samples_per_s`, `plain_samples_per_s`, `ratio_vs_plain`.

    python benchmarks/gpu_check.py --out "$OUT"      (benchmarks/gpu_check.sh installs first)

`--device cpu` is a dry run of the same steps without a GPU (the CUDA tests then skip, the
benchmarks train on the CPU in fp32), at the size the flags give, e.g. a tiny one:

    python benchmarks/gpu_check.py --device cpu --model small --batch-size 8 --blocks 2 \
        --num-workers 0 --pairs 32 --steps 2 --out /tmp/check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def step(name: str, command: list[str], timeout: float, out: Path) -> dict:
    """Run one part, keep its output in OUT/NAME.log, and say how it went."""
    print(f"== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        code, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        code, text = 124, f"{error.stdout or ''}{error.stderr or ''}\ntimed out after {timeout} s"
        text = text if isinstance(text, str) else text.decode(errors="replace")
    (out / f"{name}.log").write_text(text)
    seconds = round(time.perf_counter() - started, 1)
    print(
        f"   exit {code} in {seconds} s; last lines:\n" + "\n".join(text.splitlines()[-8:]),
        flush=True,
    )
    return {"exit_code": code, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results"))
    )
    parser.add_argument("--pairs", type=int, default=8000, help="e2e: generated image-text pairs")
    parser.add_argument("--steps", type=int, default=200, help="e2e: training steps")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda",
        help="cpu: a dry run of every step without a GPU (fp32)",
    )  # fmt: skip
    parser.add_argument("--model", choices=("vit-b32", "small"), default="vit-b32")
    parser.add_argument("--batch-size", type=int, default=256, help="throughput and e2e")
    parser.add_argument("--blocks", type=int, default=6, help="throughput: rounds of blocks")
    parser.add_argument(
        "--num-workers", type=int,
        help="DataLoader workers (default: 4 in throughput, e2e's own default in e2e)",
    )  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(
            "No CUDA GPU visible: this check needs one (the CPU suite is `make test`; "
            "--device cpu is a dry run of this check)."
        )
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    card = (re.search(r"[A-Z]\d{2,4}", name) or re.search(r"\w+", name)).group(0).lower()
    result: dict = {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    if cuda:
        result["gpu_memory_gib"] = round(
            torch.cuda.get_device_properties(0).total_memory / 2**30, 1
        )
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass

    python = sys.executable
    if not args.skip_tests:
        tests = step(
            "gpu-tests",
            [python, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"],
            330,
            args.out,
        )
        log = (args.out / "gpu-tests.log").read_text()
        counts = dict(
            (k, int(v)) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", log)
        )
        result["gpu_tests"] = {**tests, **counts}

    throughput_json = args.out / "throughput.json"
    workers = args.num_workers
    result["throughput_run"] = step(
        "throughput",
        [python, "benchmarks/throughput.py", "--device", args.device, "--model", args.model,
         "--batch-size", str(args.batch_size), "--precision", "bf16" if cuda else "32",
         "--blocks", str(args.blocks), "--num-workers", str(4 if workers is None else workers),
         "--no-checkpoints", "--variant-repeats", "1", "--json", str(throughput_json)],
        240, args.out,
    )  # fmt: skip
    if throughput_json.exists():
        figures = json.loads(throughput_json.read_text())
        loops = figures["loops"]
        result["plain_samples_per_s"] = loops["plain"]["samples_per_s"]["median"]
        result["mmtrain_loop_samples_per_s"] = loops["mmtrain"]["samples_per_s"]["median"]
        ratio = figures["ratio_samples_per_s"]["mmtrain"]["per_round"]["median"]
        result["loop_ratio_vs_plain"] = ratio
        # MiB, each loop's median peak per block (throughput.json's peak_mib)
        result["peak_memory"] = {n: loop["peak_mib"]["median"] for n, loop in loops.items()}
        if "variants" in figures:
            rows = figures["variants"]["rows"]
            result["plain_variants_samples_per_s"] = {
                n: r["samples_per_s"]["median"] for n, r in rows.items()
            }
            result["best_plain_samples_per_s"] = max(
                result["plain_variants_samples_per_s"].values()
            )
            result["gflop_per_sample"] = figures["variants"]["gflop_per_sample"]

    e2e_json = args.out / "e2e.json"
    result["e2e_run"] = step(
        "e2e",
        [python, "benchmarks/e2e.py", "--device", args.device, "--model", args.model,
         "--pairs", str(args.pairs), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
         *([] if workers is None else ["--num-workers", str(workers)]), "--json", str(e2e_json)],
        300, args.out,
    )  # fmt: skip
    if e2e_json.exists():
        e2e = json.loads(e2e_json.read_text())
        result["e2e"] = e2e
        result["mmtrain_e2e_samples_per_s"] = e2e["mmtrain_e2e_samples_per_s"]
        if result.get("plain_samples_per_s"):
            result["ratio_vs_plain"] = (
                e2e["mmtrain_e2e_samples_per_s"] / result["plain_samples_per_s"]
            )
        if result.get("gflop_per_sample"):
            peak = {"h100": 989e12, "h200": 989e12}.get(card)  # dense bf16 tensor-core peak
            if peak:
                result["e2e_mfu"] = (
                    e2e["mmtrain_e2e_samples_per_s"] * result["gflop_per_sample"] * 1e9 / peak
                )
    path = args.out / f"gpu-{card}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
