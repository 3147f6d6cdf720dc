"""Experiment trackers: the run's metrics, config and outcome in TensorBoard, Weights & Biases,
MLflow or a CSV table, besides the run directory's own files (which are always written).

Each sink is a registered factory (`@register("logger", NAME)`) whose keyword arguments are
the keys of `logger.NAME` in the config, plus `run`, a `RunInfo` given at run time. A sink
receives the resolved config when it is built, then `log(step, epoch, metrics)` for every
train and validation event, then `finish(status, summary)` with summary.json's content.
`mmtrain.runlog.MetricsLog` feeds them, on rank 0 only.

The trackers' libraries are imported when a sink is built, so listing and checking stay
fast; `check` tells a missing one, with the command that installs it, before training.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import OmegaConf

from mmtrain import registry
from mmtrain.errors import UserError
from mmtrain.runlog import read_json, write_json

log = logging.getLogger("mmtrain")
# The module each built-in sink imports, which is also the name of the extra that installs it.
REQUIRES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
IDS_FILE = "trackers.json"  # the tracked runs' ids, so that a resumed run reopens them
OK = ("completed", "stopped_early")


class Sink(Protocol):
    """What MetricsLog calls on a tracker."""

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

    @classmethod
    def of(
        cls, run_dir: Path, config: dict[str, Any], resumed: bool, metric_names: list[str]
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
        return cls(run_dir, config, resumed, name, group, list(metric_names), ids)

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


def entries(logger_cfg: Mapping[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """(sink name, options) for each entry of the `logger` config, a mapping keyed by the
    sinks' registered names; null or empty means none."""
    if not logger_cfg:
        return []
    if not isinstance(logger_cfg, Mapping):
        raise UserError(
            f"logger must be a mapping of sinks (got {logger_cfg!r}); pick options with "
            f"logger=tensorboard or logger=[tensorboard,mlflow] (registered: {', '.join(registry.names('logger'))})."
        )
    for name, options in logger_cfg.items():
        if options is not None and not isinstance(options, Mapping):
            raise UserError(
                f"logger.{name} must be a mapping of its keys (got {options!r}); "
                f"set one key at a time (logger.{name}.KEY=VALUE), see `mmtrain list logger`."
            )
    return [(str(name), dict(options or {})) for name, options in logger_cfg.items()]


def check(logger_cfg: Mapping[str, Any] | None) -> None:
    """Check each sink's keys against its factory and that its library is installed,
    building nothing."""
    for name, options in entries(logger_cfg):
        registry.check("logger", {"name": name, **options}, runtime=("run",))
        module = REQUIRES.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise UserError(
                f"logger={name} needs the {module} package, which is not installed. "
                f"Install it with: pip install 'mmtrain[{module}]' (or pip install {module}), "
                "or drop the sink from logger."
            )


def build(logger_cfg: Mapping[str, Any] | None, run: RunInfo) -> list[Sink]:
    """The sinks of the `logger` config, each started for `run`."""
    sinks = []
    for name, options in entries(logger_cfg):
        log.info("logging to %s", name)
        try:
            sinks.append(registry.build("logger", {"name": name, **options}, run=run))
        except UserError:
            raise
        except Exception as error:  # the tracker's own account: a store, a login, a URI
            for sink in sinks:
                sink.finish("failed", {"status": "failed", "steps": 0})
            raise UserError(
                f"logger={name} could not start its tracker: {error} "
                f"Fix its settings (logger.{name}.* or its environment variables), or drop it from logger."
            ) from None
    return sinks


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"a.b.c": value}; lists stay values."""
    if isinstance(tree, Mapping) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree} if prefix else {}


def _scalar(value: Any) -> str | int | float | bool:
    """A hyperparameter value TensorBoard's and MLflow's tables take."""
    return value if isinstance(value, str | int | float | bool) else json.dumps(value)


def _code(payload: Any) -> str:
    """Markdown: `payload` as an indented block (TensorBoard's text panel renders markdown)."""
    text = payload if isinstance(payload, str) else json.dumps(payload, indent=2)
    return "\n".join("    " + line for line in text.splitlines())


class TensorBoardSink:
    """Event files in RUN_DIR/SUBDIR, written with `torch.utils.tensorboard.SummaryWriter`."""

    def __init__(self, run: RunInfo, subdir: str):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run.run_dir / subdir))
        if not run.resumed:  # a resumed run continues the same directory: written once
            params = {k: _scalar(v) for k, v in flatten(run.config).items()}
            # What the HParams dashboard shows per run: every hyperparameter, and the
            # metrics the run logs as its columns (their values come from the scalars).
            for summary in hparams(params, dict.fromkeys(run.metric_names, math.nan)):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", _code(OmegaConf.to_yaml(run.config)), 0)
            self.writer.add_text("run_dir", str(run.run_dir.resolve()), 0)

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.add_scalar("epoch", epoch, step)

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", _code(summary), summary.get("steps") or 0)
        self.writer.close()


@registry.register("logger", "tensorboard")
def tensorboard(run: RunInfo, subdir: str = "tensorboard") -> TensorBoardSink:
    """TensorBoard event files in the run directory: `tensorboard --logdir outputs`."""
    return TensorBoardSink(run, subdir)


class WandbSink:
    """A Weights & Biases run; WANDB_MODE=offline keeps it in RUN_DIR/wandb for `wandb sync`."""

    def __init__(self, run: RunInfo, **init: Any):
        import wandb

        run_id = run.saved_id("wandb")
        self.run = wandb.init(
            **init,
            config=run.config,
            dir=str(run.run_dir),
            job_type="train",
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run.summary["run_dir"] = str(run.run_dir.resolve())
        run.remember("wandb", self.run.id)

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, "epoch": epoch}, step=step)

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        self.run.summary.update({f"summary/{k}": v for k, v in flatten(summary).items()})
        self.run.finish(exit_code=0 if status in OK else 1)


@registry.register("logger", "wandb")
def wandb(
    run: RunInfo,
    project: str = "mmtrain",
    entity: str | None = None,
    run_name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    notes: str | None = None,
    mode: str | None = None,
) -> WandbSink:
    """A W&B run in `project` (of `entity`); `run_name` defaults to the run directory's name (a
    sweep job's overrides), `group` to the sweep; `mode` null follows WANDB_MODE."""
    return WandbSink(
        run,
        project=project,
        entity=entity,
        name=run_name or run.name,
        group=group or run.group,
        tags=list(tags or []),
        notes=notes,
        mode=mode,
    )


# MLflow's metric and parameter names take letters, digits and _ - . / space and colon.
_MLFLOW_BAD = re.compile(r"[^\w\-./ :]")
MLFLOW_STATUS = {"completed": "FINISHED", "stopped_early": "FINISHED", "interrupted": "KILLED"}


def mlflow_key(name: str) -> str:
    """`name` as MLflow takes it: val/recall@1_i2t -> val/recall_at_1_i2t."""
    return _MLFLOW_BAD.sub("_", name.replace("@", "_at_"))


class MlflowSink:
    """An MLflow run, through `MlflowClient` (the tracking URI as MLflow resolves it)."""

    def __init__(
        self, run: RunInfo, experiment: str, tracking_uri: str | None, tags: dict[str, str]
    ):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run.saved_id("mlflow")
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {
                **tags,
                "mmtrain.run_dir": str(run.run_dir.resolve()),
                **({"mmtrain.sweep": run.group} if run.group else {}),
            }
            created = self.client.create_run(
                self._experiment_id(experiment), run_name=run.name, tags=tags
            )
            self.run_id = created.info.run_id
            params = [Param(mlflow_key(k), str(v)) for k, v in flatten(run.config).items()]
            self.client.log_batch(self.run_id, params=params)
        run.remember("mlflow", self.run_id)

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # another job of a sweep created it first
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {**{mlflow_key(k): v for k, v in metrics.items()}, "epoch": epoch}
        batch = [Metric(key, float(value), now, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        self.client.log_dict(self.run_id, summary, "summary.json")
        self.client.set_tag(self.run_id, "mmtrain.status", status)
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


@registry.register("logger", "mlflow")
def mlflow(
    run: RunInfo,
    experiment: str = "mmtrain",
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
) -> MlflowSink:
    """An MLflow run in `experiment`; `tracking_uri` null: MLFLOW_TRACKING_URI, else
    MLflow's local default store."""
    return MlflowSink(run, experiment, tracking_uri, {k: str(v) for k, v in (tags or {}).items()})


class CsvSink:
    """RUN_DIR/SUBDIR/metrics.csv (one row per event, a column per metric, as Lightning's
    CSVLogger writes it) and hparams.yaml."""

    def __init__(self, run: RunInfo, subdir: str):
        folder = run.run_dir / subdir
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.csv"
        (folder / "hparams.yaml").write_text(OmegaConf.to_yaml(run.config))
        self.rows: list[dict[str, Any]] = []
        if run.resumed and self.path.is_file():
            with self.path.open(newline="") as handle:
                self.rows = list(csv.DictReader(handle))
        self.columns = list(self.rows[0]) if self.rows else ["step", "epoch"]

    def log(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "epoch": epoch, **metrics}
        self.rows.append(row)
        new = [key for key in row if key not in self.columns]
        self.columns += new
        # A new column rewrites the table with its header; otherwise the row is appended.
        with self.path.open("w" if new or len(self.rows) == 1 else "a", newline="") as handle:
            writer = csv.DictWriter(handle, self.columns)
            if new or len(self.rows) == 1:
                writer.writeheader()
                writer.writerows(self.rows)
            else:
                writer.writerow(row)

    def finish(self, status: str, summary: dict[str, Any]) -> None:
        """Every row is on disk already; the outcome is the run directory's summary.json."""


@registry.register("logger", "csv")
def csv_table(run: RunInfo, subdir: str = "csv") -> CsvSink:
    """A CSV table of every event in RUN_DIR/SUBDIR/metrics.csv, with hparams.yaml."""
    return CsvSink(run, subdir)
