"""Start-up time of the `mmtrain` command: wall time of fresh processes, against `import torch`.

Each repeat runs every command below once, as a fresh subprocess, in this order (so a
change in the machine's load hits all of them alike); the table gives the median, min and
max over --repeats repeats. One untimed round runs first (--warmup-rounds), to write the
bytecode caches and read the files into the page cache.

    import torch                python -c "import torch" (the floor every command pays)
    mmtrain --help              usage text
    mmtrain list                registered components and config options
    mmtrain train --help        Hydra's help: config groups and the composed config
    mmtrain train --cfg job     compose the config, print it, exit
    mmtrain validate            the default synthetic data made small (data.train_size=512
                                data.val_size=128 data.test_size=128): every row checked
    mmtrain train: first step   the default run with trainer.log_every_n_steps=1
                                trainer.max_steps=2 into a temporary hydra.run.dir; the clock
                                stops when metrics.jsonl gets its first line (step 1's loss),
                                and the process is then killed

The child processes get OMP_NUM_THREADS=--threads (default 1; 0 leaves it unset), which
matters for the first training step on a shared CPU (benchmarks/RESULTS.md). The phases of
the first-step run come from its train.log timestamps.

Without --source the commands run the `mmtrain` script of this interpreter's environment
(`python -m mmtrain` if it has none) from a temporary folder. With --source DIR they run as
`python -m mmtrain` with PYTHONPATH=DIR and DIR as the working directory, to measure another
checkout (e.g. a `git worktree` of an older commit, which reads conf/ beside its source). A
command that fails is reported with its error and left out of the later repeats.

    python benchmarks/startup.py [--repeats 5] [--source DIR] [--json startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

SMALL_DATA = ["data.train_size=512", "data.val_size=128", "data.test_size=128"]
FIRST_STEP = "mmtrain train: first step"
COMMANDS: dict[str, list[str] | None] = {
    "import torch": None,
    "mmtrain --help": ["--help"],
    "mmtrain list": ["list"],
    "mmtrain train --help": ["train", "--help"],
    "mmtrain train --cfg job": ["train", "--cfg", "job"],
    "mmtrain validate (small data)": ["validate", *SMALL_DATA],
    FIRST_STEP: ["train", "trainer.log_every_n_steps=1", "trainer.max_steps=2"],
}
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]*\]\[\w+\] (.*)$")
PHASES = {"building data": "data", "building model": "model", "training ": "loop"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup-rounds", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--source", type=Path, help="run `python -m mmtrain` from this checkout")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to run")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS; 0: unset")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per command")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    if args.source is not None:
        args.source = args.source.resolve()
    return args


def mmtrain_command(args: argparse.Namespace) -> list[str]:
    if args.source is None:
        script = Path(args.python).with_name("mmtrain")
        if script.exists():
            return [str(script)]
    return [args.python, "-m", "mmtrain"]


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    if args.source is not None:
        env["PYTHONPATH"] = str(args.source)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def run_once(name: str, argv: list[str], args, cwd: Path, scratch: Path) -> dict[str, Any]:
    """Wall seconds of one command (to its first metrics line for the training run)."""
    log = scratch / "console.txt"
    run_dir = scratch / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    if name == FIRST_STEP:
        argv = [*argv, f"hydra.run.dir={run_dir}"]
    metrics = run_dir / "metrics.jsonl"
    with open(log, "w") as console:
        started, wall = time.time(), time.perf_counter()
        process = subprocess.Popen(
            argv, stdout=console, stderr=console, cwd=cwd, env=child_env(args),
            start_new_session=True,
        )  # fmt: skip
        seconds = None
        try:
            if name == FIRST_STEP:
                while process.poll() is None and time.perf_counter() - wall < args.timeout:
                    if metrics.exists() and "\n" in metrics.read_text():
                        seconds = time.perf_counter() - wall
                        break
                    time.sleep(0.005)
                if seconds is None and metrics.exists() and "\n" in metrics.read_text():
                    seconds = time.perf_counter() - wall  # it ended between two looks
                os.killpg(process.pid, signal.SIGKILL)  # the rest is not start-up
                process.wait()
                code = 0 if seconds is not None else process.returncode
            else:
                code = process.wait(timeout=args.timeout)
                seconds = time.perf_counter() - wall
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timeout"
    result: dict[str, Any] = {"seconds": seconds if code == 0 else None, "code": code}
    if code != 0:
        result["error"] = log.read_text()[-1500:]
    elif name == FIRST_STEP:
        result["phases"] = phases(run_dir / "train.log", started, seconds)
    return result


def phases(train_log: Path, started: float, first: float) -> dict[str, float] | None:
    """Seconds in imports + config, data, model + optimizer and the first step, from the
    timestamps of train.log's lines."""
    if not train_log.exists():
        return None
    marks: dict[str, float] = {}
    for line in train_log.read_text().splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        at = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - started
        marks.setdefault("first log line", at)
        for prefix, phase in PHASES.items():
            if match[2].startswith(prefix):
                marks.setdefault(phase, at)
    if not {"first log line", "data", "model", "loop"} <= set(marks):
        return None
    return {
        "imports_and_config": marks["first log line"],
        "data": marks["model"] - marks["data"],
        "model_and_optimizer": marks["loop"] - marks["model"],
        "first_step": first - marks["loop"],
    }


def source_revision(source: Path | None) -> str:
    folder = source or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--", "mmtrain", "conf"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in mmtrain/ or conf/" if dirty else "")


def load_text(load: tuple[float, ...]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def stats(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "all": [round(v, 3) for v in values],
    }


def main() -> None:
    args = parse_args()
    mmtrain = mmtrain_command(args)
    commands = {
        name: [args.python, "-c", "import torch"] if rest is None else [*mmtrain, *rest]
        for name, rest in COMMANDS.items()
    }
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    revision = source_revision(args.source)
    where = f"PYTHONPATH={args.source}, cwd {args.source}" if args.source else "a temporary cwd"
    print(
        f"{' '.join(mmtrain)} ({where}; code {revision}); {args.repeats} repeats after "
        f"{args.warmup_rounds} untimed round(s); OMP_NUM_THREADS={args.threads or 'unset'}; "
        f"{os.cpu_count()} CPUs ({cpu}); load average {load_text(os.getloadavg())}",
        flush=True,
    )
    times: dict[str, dict[int, float]] = {name: {} for name in commands}  # repeat -> seconds
    first_phases: list[dict[str, float]] = []
    failed: dict[str, dict[str, Any]] = {}
    loads = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="mmtrain-startup-") as tmp:
        scratch = Path(tmp)
        cwd = args.source or scratch
        for round_index in range(args.warmup_rounds + args.repeats):
            timed = round_index >= args.warmup_rounds
            shown = []
            for name, argv in commands.items():
                if name in failed:
                    continue
                result = run_once(name, argv, args, cwd, scratch)
                if result["seconds"] is None:
                    failed[name] = {"code": result["code"], "error": result.get("error", "")}
                    print(f"  {name}: FAILED (exit {result['code']}); left out from now on")
                    print("    " + result.get("error", "").strip()[-600:].replace("\n", "\n    "))
                    continue
                if timed:
                    times[name][round_index] = result["seconds"]
                    if result.get("phases"):
                        first_phases.append(result["phases"])
                shown.append(f"{name.removeprefix('mmtrain ')} {result['seconds']:.2f}")
            loads.append(os.getloadavg())
            label = f"repeat {round_index - args.warmup_rounds + 1}" if timed else "warm-up"
            print(f"{label}: {'  '.join(shown)}  (load {loads[-1][0]:.2f})", flush=True)

    results: dict[str, Any] = {
        "command": mmtrain,
        "source": str(args.source) if args.source else None,
        "revision": revision,
        "python": args.python,
        "omp_num_threads": args.threads or None,
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "repeats": args.repeats,
        "load_averages": loads,
        "commands": {name: stats(list(v.values())) for name, v in times.items() if v},
        "failed": failed,
    }
    if first_phases:
        results["first_step_phases"] = {
            key: stats([p[key] for p in first_phases]) for key in first_phases[0]
        }
    torch_s = results["commands"].get("import torch", {}).get("median")
    print(f"\n{'command':34s} {'median':>7s} {'min':>7s} {'max':>7s}  minus import torch (median)")
    for name, figures in results["commands"].items():
        extra = (
            f"{figures['median'] - torch_s:+7.2f}"
            if torch_s is not None and name != "import torch"
            else ""
        )
        print(
            f"{name:34s} {figures['median']:7.2f} {figures['min']:7.2f} {figures['max']:7.2f}  {extra}"
        )
    for name, failure in failed.items():
        print(f"{name:34s} failed (exit {failure['code']}): not in this checkout?")
    if "first_step_phases" in results:
        p = {k: v["median"] for k, v in results["first_step_phases"].items()}
        print(
            f"first step, phases (median, from train.log): imports and config "
            f"{p['imports_and_config']:.2f} + data {p['data']:.2f} + model and optimizer "
            f"{p['model_and_optimizer']:.2f} + first step {p['first_step']:.2f} s"
        )
    if torch_s is not None and times["mmtrain list"]:
        per_repeat = [
            seconds - times["import torch"][index]
            for index, seconds in times["mmtrain list"].items()
            if index in times["import torch"]
        ]
        difference = results["commands"]["mmtrain list"]["median"] - torch_s
        results["list_minus_import_torch"] = {
            "of_medians": difference,
            "per_repeat": stats(per_repeat),
        }
        print(
            f"mmtrain list minus import torch: {difference:.2f} s (of the medians; per repeat "
            f"median {statistics.median(per_repeat):.2f} [{min(per_repeat):.2f}, "
            f"{max(per_repeat):.2f}]); target <= 1.0 s: "
            + ("met" if difference <= 1.0 else "not met")
        )
    print(f"load average (1, 5, 15 min): start {load_text(loads[0])}, end {load_text(loads[-1])}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
