"""What every experiment tracker is told about its run (`RunInfo`), and the guard each one
runs inside (`Guarded`): a tracker that fails mid-run costs one warning, never the run.
The trackers themselves are in `mmtrain.loggers`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import OmegaConf

from mmtrain.errors import UserError
from mmtrain.runlog import read_json, write_json

log = logging.getLogger("mmtrain")
IDS_FILE = "trackers.json"  # the tracked runs' ids, so that a resumed run reopens them


class Sink(Protocol):
    """What MetricsLog calls on a tracker (a tracker may also take the run's pictures:
    `picture(name, path, step)`, a PNG file)."""

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None: ...

    def finish(self, status: str, summary: dict[str, Any]) -> None: ...


@dataclass
class RunInfo:
    """What every sink is told about the run it tracks."""

    run_dir: Path
    config: dict[str, Any]  # the resolved config: the run's hyperparameters
    resumed: bool  # continuing a checkpoint of this run directory: reopen the tracked run
    name: str  # the run's name: its directory (DATE/TIME), or a sweep job's overrides
    group: str | None = None  # the sweep directory, for a job of a multirun
    metric_names: list[str] = field(default_factory=list)  # what the run will log
    ids: dict[str, str] = field(default_factory=dict)  # trackers.json
    # The values in force where the config says "auto" or leaves them to the run: the
    # learning rate, precision, device, world size, batch per step, budget.
    in_force: dict[str, Any] = field(default_factory=dict)

    def hparams(self) -> dict[str, Any]:
        """The config as written, with the values in force beside it (`in_force.*`)."""
        return {**self.config, "in_force": self.in_force} if self.in_force else self.config

    @classmethod
    def of(
        cls,
        run_dir: Path,
        config: dict[str, Any],
        resumed: bool,
        metric_names: list[str],
        in_force: dict[str, Any] | None = None,
    ) -> RunInfo:
        """The run in `run_dir`; a sweep job is recognised by Hydra's record of it
        (.hydra/hydra.yaml), which every process of the run can read."""
        run_dir = Path(run_dir)
        name, group = f"{run_dir.parent.name}/{run_dir.name}", None
        hydra_file = run_dir / ".hydra" / "hydra.yaml"
        if hydra_file.is_file():
            hydra = OmegaConf.load(hydra_file).hydra
            if str(hydra.get("mode")) == "MULTIRUN":
                group = str(hydra.sweep.dir)
                values = _swept_values(Path(group), list(hydra.overrides.task))
                name = f"{hydra.job.num}: {values}" if values else str(hydra.job.num)
        ids_file = run_dir / IDS_FILE
        ids = {}
        if resumed and ids_file.is_file():
            try:
                ids = read_json(ids_file)
            except UserError as error:
                log.warning("%s The trackers start new runs instead of continuing theirs.", error)
        return cls(
            run_dir, config, resumed, name, group, list(metric_names), ids, dict(in_force or {})
        )

    def saved_id(self, sink: str) -> str | None:
        """The id of the run that `sink` tracked before, when this run resumes."""
        return self.ids.get(sink) if self.resumed else None

    def remember(self, sink: str, run_id: str) -> None:
        """Keep `sink`'s run id in the run directory (trackers.json) for a later resume."""
        self.ids[sink] = run_id
        write_json(self.run_dir / IDS_FILE, self.ids)


def _swept_values(sweep_dir: Path, task: list[str]) -> str:
    """`key=value,...` of a sweep job's overrides of the keys the sweep varies, as the sweep's
    record (multirun.yaml) tells them: Hydra's parser picks its sweep overrides (a,b,
    range(...)), and a sweeper plugin's own `params` count too."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    record = sweep_dir / "multirun.yaml"
    if not record.is_file():
        return ""
    hydra = OmegaConf.load(record).hydra
    parser = OverridesParser.create()
    sweep = parser.parse_overrides(list(hydra.overrides.task))
    swept = {o.get_key_element() for o in sweep if o.is_sweep_override()}
    swept |= set((hydra.sweeper.get("params") or {}).keys())
    job = parser.parse_overrides(task)
    return ",".join(o.input_line for o in job if o.get_key_element() in swept)


class Guarded:
    """A tracker whose failure mid-run (a full disk under its store, a lost connection) is
    one warning: the run goes on without it and summary.json marks it failed (`state`).
    `mmtrain.loggers.build` builds every tracker inside one."""

    def __init__(self, name: str, sink: Sink):
        self.name, self.sink = name, sink
        self.error: str | None = None

    @property
    def state(self) -> str:
        return "ok" if self.error is None else f"failed: {self.error}"

    def _call(self, method: str, *args: Any) -> None:
        if self.error is not None:
            return
        try:
            getattr(self.sink, method)(*args)
        except Exception as error:  # noqa: BLE001  (any tracker's own failure)
            self.error = f"{type(error).__name__}: {error}".strip()[:300]
            log.warning(
                "the %s tracker failed (%s); the run goes on without it (the run directory "
                "has every metric; summary.json marks the tracker failed)",
                self.name, self.error,
            )  # fmt: skip

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self._call("log", step, epoch, metrics)

    def picture(self, name: str, path: Path, step: int) -> None:
        if hasattr(self.sink, "picture"):
            self._call("picture", name, path, step)

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        if self.error is None:
            self._call("finish", status, summary)
        else:  # closed quietly: its failure was told once
            with contextlib.suppress(Exception):
                self.sink.finish(status, summary)


def states(sinks: list[Any]) -> dict[str, str]:
    """{tracker name: "ok" or "failed: why"} of the `Guarded` sinks among `sinks`."""
    return {sink.name: sink.state for sink in sinks if isinstance(sink, Guarded)}
