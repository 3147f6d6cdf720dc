"""What a run writes besides checkpoints: metrics.jsonl, summary.json, curves.png, progress."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mmtrain.errors import Interrupted, UserError

log = logging.getLogger("mmtrain")


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
            self.events = read_events(self.path)

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Record `metrics` (names like `train/loss`) at `step` of `epoch`."""
        event = {"step": step, "epoch": epoch, **{k: _plain(v) for k, v in metrics.items()}}
        self.events.append(event)
        if self.enabled:
            with open_append(self.path) as handle:
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
            write_file(self.path, "".join(json.dumps(event) + "\n" for event in self.events))

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


def _refuse_link(path: Path) -> None:
    if os.path.islink(path):
        raise UserError(
            f"{path} is a symbolic link (to {os.readlink(path)}); mmtrain does not write "
            "through links in a run directory. Remove it, or use another run directory."
        )


def write_file(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` atomically (a temporary file and a rename): readers never
    see half of it, and a link in its place is refused rather than followed."""
    path = Path(path)
    _refuse_link(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # as open() creates it, not mkstemp's private 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_append(path: Path, mode: str = "a"):
    """`path` opened to append (mode "a") or to rewrite ("w") as text, never through a link."""
    _refuse_link(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_APPEND if mode == "a" else os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as error:
        if os.path.islink(path):
            _refuse_link(path)
        raise error
    return os.fdopen(fd, mode, encoding="utf-8")


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a metrics.jsonl. A line that is not a whole JSON object (the partial
    last line of a run killed while writing it) and the lines after it are left out, with a
    warning: a resume writes them again."""
    events: list[dict[str, Any]] = []
    lines = Path(path).read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("step"), int):
            log.warning(
                "%s: line %d is not a whole event (a run killed while writing it?); "
                "reading the %d events before it",
                path, number, len(events),
            )  # fmt: skip
            break
        events.append(event)
    return events


def _plain(value: Any) -> Any:
    value = float(value)
    return round(value, 6) if math.isfinite(value) else None


def read_json(path: Path, kind: type = dict) -> Any:
    """The JSON value in `path`, which must be a `kind`; a damaged file (cut short, not JSON,
    another type) is a UserError that names it."""
    try:
        value = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} is damaged ({error}).") from None
    if not isinstance(value, kind):
        raise UserError(f"{path} is damaged (a JSON {kind.__name__} expected).")
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half of it
    (and never through a link: see `mmtrain.runlock.write_file`)."""
    write_file(path, json.dumps(payload, indent=2) + "\n")


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
    save_figure(figure, path, dpi=110)


def save_figure(figure: Any, path: Path, dpi: int = 100) -> None:
    """Save and close a matplotlib `figure` as PNG through `write_file` (whole or not at all,
    never through a link)."""
    import matplotlib.pyplot as plt

    picture = io.BytesIO()
    figure.savefig(picture, format="png", dpi=dpi)
    plt.close(figure)
    write_file(path, picture.getvalue())


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


class RunLogFile(logging.Handler):
    """train.log. Nothing may be written into a run directory before the run holds its lock,
    so the records wait in memory until `start` (see `start_run_log`); a run refused the
    directory never opens the file. The file is opened without following a link."""

    PENDING = 10_000  # records kept before the start; later ones reach the console only

    def __init__(self, filename: str, start: bool = False):
        super().__init__()
        self.filename = Path(filename)
        self.stream: Any = None
        self.pending: list[logging.LogRecord] = []
        if start:
            self.start()

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            if len(self.pending) < self.PENDING:
                self.pending.append(record)
            return
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def start(self) -> None:
        """Open the file and write the records kept so far."""
        if self.stream is None:
            self.stream = open_append(self.filename)
            pending, self.pending = self.pending, []
            for record in pending:
                self.emit(record)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.pending = []
        super().close()


def start_run_log() -> None:
    """Start writing train.log (the run now holds its directory's lock)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogFile):
            handler.start()


def stderr_log_handler(**options: Any) -> logging.Handler:
    """A rich log handler that writes to standard error (Hydra's job_logging `console` of
    commands whose standard output is their result)."""
    from rich.console import Console
    from rich.logging import RichHandler

    return RichHandler(console=Console(stderr=True), **options)


def resume_command(run_dir: Path) -> str:
    """The command that resumes the run in `run_dir` (its own overrides, auto resume)."""
    return shlex.join(["mmtrain", "resume", str(run_dir)])
