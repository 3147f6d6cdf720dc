"""What a run writes besides checkpoints: metrics.jsonl, summary.json, curves.png, progress."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mmtrain.errors import Interrupted


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl, keeps them for the plot, and
    passes each to the experiment trackers (`sinks`, see mmtrain.loggers)."""

    def __init__(self, run_dir: Path, enabled: bool = True, sinks: list[Any] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.events: list[dict[str, Any]] = []
        self.sinks = list(sinks or [])
        # (step, name) pairs the trackers already have: a resumed run logs them again.
        self.sent: set[tuple[int, str]] = set()
        if enabled and self.path.exists():  # a resumed run continues its own history
            self.events = [
                json.loads(line) for line in self.path.read_text().splitlines() if line.strip()
            ]

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Record `metrics` (names like `train/loss`) at `step` of `epoch`."""
        event = {"step": step, "epoch": epoch, **{k: _plain(v) for k, v in metrics.items()}}
        self.events.append(event)
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(event) + "\n")
        fresh = {k: float(v) for k, v in metrics.items() if (step, k) not in self.sent}
        if fresh:
            for sink in self.sinks:
                sink.log(step, epoch, fresh)

    def truncate_after(self, step: int) -> None:
        """Forget events after `step` (a resumed run logs them again, to the trackers only
        what they do not have)."""
        self.sent = {(e["step"], k) for e in self.events for k in e if k not in ("step", "epoch")}
        self.events = [event for event in self.events if event["step"] <= step]
        if self.enabled:
            self.path.write_text("".join(json.dumps(event) + "\n" for event in self.events))

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        """Give each tracker the run's final status and summary, and close it."""
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.finish(status, summary)
            except Exception as error:  # one tracker's failure must not keep the others open
                logging.getLogger("mmtrain").warning(
                    "could not close the %s tracker: %s", type(sink).__name__, error
                )

    def close(self, error: BaseException | None = None) -> None:
        """Close the trackers that `finish` did not: the run ended on an exception."""
        if self.sinks:
            status = (
                "interrupted" if isinstance(error, KeyboardInterrupt | Interrupted) else "failed"
            )
            last = self.events[-1]["step"] if self.events else 0
            self.finish(status, {"status": status, "steps": last, "error": repr(error)})


def _plain(value: Any) -> Any:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half of it."""
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def plot_curves(events: list[dict[str, Any]], path: Path) -> None:
    """curves.png: losses in the first panel, every other validation metric in the second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list[int], list[float]]] = {}
    for event in events:
        for name, value in event.items():
            if "/" in name and value is not None and not name.endswith(("lr", "samples_per_s")):
                steps, values = series.setdefault(name, ([], []))
                steps.append(event["step"])
                values.append(value)
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (steps, values) in sorted(series.items()):
        axis = losses if name.split("/")[-1].startswith("loss") else scores  # loss, loss_ce
        axis.plot(
            steps, values, label=name, marker="" if name.startswith("train") else "o", markersize=3
        )
    for axis, title in ((losses, "loss"), (scores, "validation metrics")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    # Redrawn after every validation: a viewer never opens a half-written file.
    partial = Path(path).with_suffix(".tmp.png")
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    os.replace(partial, path)


def progress_bar(enabled: bool, total: int, completed: int) -> Progress:
    """A rich bar (one task) showing step, loss, lr, samples/s and time remaining."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[speed]:.0f} samples/s"
        ),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
        refresh_per_second=1,  # its fields change only at log intervals
    )
    bar.add_task("train", total=total, completed=completed, loss=math.nan, lr=0.0, speed=0.0)
    return bar


def stderr_log_handler(**options: Any) -> logging.Handler:
    """A rich log handler that writes to standard error (Hydra's job_logging `console` of
    commands whose standard output is their result)."""
    from rich.console import Console
    from rich.logging import RichHandler

    return RichHandler(console=Console(stderr=True), **options)


def resume_command(run_dir: Path) -> str:
    """The command that resumes the run in `run_dir` (its own overrides, auto resume)."""
    return shlex.join(["mmtrain", "resume", str(run_dir)])
