"""`mmtrain report SWEEP_DIR`: every job of a multirun, sorted by its monitored metric."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from mmtrain.errors import UserError
from mmtrain.runlog import save_figure

log = logging.getLogger("mmtrain")


def _read(path: Path, load: Any, kind: type) -> Any:
    """`path` read with `load` (json.loads, yaml.safe_load); None, with a warning, when it
    is damaged or is not a `kind`."""
    try:
        value = load(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
        value = error
    if not isinstance(value, kind):
        reason = (
            f"{type(value).__name__}: {value}"
            if isinstance(value, Exception)
            else "not a " + kind.__name__
        )
        log.warning("%s cannot be read (%s); the job is listed as damaged", path, str(reason)[:200])
        return None
    return value


def _job(folder: Path) -> dict[str, Any]:
    """One job's overrides, status and numbers, from its run directory (a damaged file is a
    warning and a job marked damaged, not the end of the report)."""
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = _read(overrides_file, yaml.safe_load, list) if overrides_file.is_file() else []
    params = dict(
        str(o).split("=", 1)
        for o in overrides or []
        if "=" in str(o) and not str(o).startswith(("hydra", "+hydra"))
    )
    summary_file = folder / "summary.json"
    summary = _read(summary_file, json.loads, dict) if summary_file.is_file() else None
    if summary is not None:
        status = str(summary.get("status", "damaged"))
    elif summary_file.is_file() or overrides is None:
        summary, status = {}, "damaged"
    else:  # never got as far as writing a summary: crashed, killed, or still running
        summary, status = {}, "failed" if (folder / "train.log").is_file() else "not started"
    best = summary.get("best") if isinstance(summary.get("best"), dict) else {}
    if not isinstance(best.get("value"), int | float | None):
        best = {**best, "value": None}
    return {
        "job": folder.name,
        "params": params,
        "status": status,
        "metric": best.get("metric"),
        "value": best.get("value"),
        "steps": summary.get("steps"),
        "samples_per_s": summary.get("samples_per_s"),
    }


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job folder (numbered, with a .hydra folder) of a multirun directory."""
    folders = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    return [
        _job(p)
        for p in sorted(
            folders,
            key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name),
        )
    ]


def swept(jobs: list[dict[str, Any]]) -> list[str]:
    """The overrides whose value differs between jobs (the ones every job shares are not
    what the sweep varied)."""
    names = sorted({name for job in jobs for name in job["params"]})
    return (
        [n for n in names if len({job["params"].get(n) for job in jobs}) > 1] or names[:1]
        if len(jobs) > 1
        else names
    )


def _sorted(jobs: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    def key(job: dict[str, Any]) -> float:
        value = job["value"]
        if value is None or not math.isfinite(value):
            return math.inf
        return -value if mode == "max" else value

    return sorted(jobs, key=key)


def _mode(metric: str | None) -> str:
    return "min" if metric and metric.endswith("loss") else "max"


def plot(jobs: list[dict[str, Any]], path: Path) -> None:
    """report.png: the metric against each swept parameter (one panel per parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = swept(jobs)
    scored = [job for job in jobs if job["value"] is not None]
    figure, axes = plt.subplots(
        1, max(len(params), 1), figsize=(4.5 * max(len(params), 1), 3.6), squeeze=False
    )
    metric = next((job["metric"] for job in jobs if job["metric"]), "metric")
    for axis, name in zip(axes[0], params or ["job"], strict=False):
        values = [job["params"].get(name, "-") if params else job["job"] for job in scored]
        try:
            xs: list[Any] = [float(v) for v in values]
            if all(x > 0 for x in xs) and max(xs) / min(xs) >= 10:
                axis.set_xscale("log")
        except ValueError:
            order = list(dict.fromkeys(sorted(map(str, values))))
            xs = [order.index(str(v)) for v in values]
            axis.set_xticks(range(len(order)), order, rotation=20)
        axis.scatter(xs, [job["value"] for job in scored])
        axis.set_xlabel(name)
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def report(args: list[str]) -> Path:
    """Print the table of SWEEP_DIR's jobs and write SWEEP_DIR/report.png."""
    if len(args) != 1:
        raise UserError(
            "Usage: mmtrain report SWEEP_DIR (a multirun directory, e.g. multirun/2026-11-26/14-03-12)."
        )
    sweep_dir = Path(args[0]).expanduser()
    if not sweep_dir.is_dir():
        raise UserError(
            f"{sweep_dir} is not a directory; give the folder `mmtrain train -m` printed (multirun/DATE/TIME)."
        )
    jobs = collect(sweep_dir)
    if not jobs:
        raise UserError(
            f"{sweep_dir} holds no job folders (numbered folders with .hydra/ inside); is it a multirun directory?"
        )
    metric = next((job["metric"] for job in jobs if job["metric"]), None)
    jobs = _sorted(jobs, _mode(metric))
    params = swept(jobs)
    table = Table(title=f"{sweep_dir}: {len(jobs)} jobs by {metric or 'metric'} ({_mode(metric)})")
    for column in ("job", *params, f"best {metric or 'metric'}", "steps", "samples/s", "status"):
        table.add_column(
            column, justify="right" if column not in params and column != "status" else "left"
        )
    styles = {"completed": "green", "stopped_early": "green", "interrupted": "yellow"}
    for job in jobs:
        value = f"{job['value']:.4f}" if job["value"] is not None else "-"
        speed = f"{job['samples_per_s']:.0f}" if job["samples_per_s"] else "-"
        status = f"[{styles.get(job['status'], 'red')}]{job['status']}[/]"
        table.add_row(
            job["job"],
            *(job["params"].get(p, "-") for p in params),
            value,
            str(job["steps"] or "-"),
            speed,
            status,
        )
    Console().print(table)
    plot(jobs, sweep_dir / "report.png")
    Console().print(f"plot: {sweep_dir / 'report.png'}")
    return sweep_dir / "report.png"
