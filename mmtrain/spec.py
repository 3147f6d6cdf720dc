"""A run's spec: the composed config as typed values, checked once before anything is built.

`parse` turns the composed config (Hydra's DictConfig, or the plain dict a run directory
or a checkpoint holds) into a `RunSpec`:

- the trainer group and the data group's batching keys become dataclasses (`TrainerConfig`,
  `BatchConfig`) whose fields declare their rules beside the key (`mmtrain.rules`);
- every other group names a registered component (`Component`), whose keys are checked
  against its factory's signature, with the same rules (`mmtrain.registry.check`).

A mistyped or unknown key, a value of the wrong type or out of range, an unknown component
and a choice that contradicts another (hard negatives for a model that takes none, a
monitored metric the model does not report) fail here, naming the key, before any data is
read or any weight is made. Everything below receives these values, never the config.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf

import mmtrain.components  # noqa: F401  (registers the built-in components)
from mmtrain import loggers, registry, rules
from mmtrain.data import augment as aug
from mmtrain.errors import UserError
from mmtrain.metrics import RetrievalMetrics
from mmtrain.models.interface import ModelTraits
from mmtrain.models.zeroshot import load_templates
from mmtrain.releases import upgrade
from mmtrain.rules import Bounds

Positive = Annotated[int, Bounds(ge=1)]
Count = Annotated[int, Bounds(ge=0)]


@dataclass
class CheckpointConfig:
    """`trainer.checkpoint`: which checkpoints are written and which one is best."""

    every_n_steps: Positive | None = None
    keep_last: Count | None = 2
    monitor: str | None = None
    mode: Literal["max", "min", "auto"] = "auto"


@dataclass
class EarlyStoppingConfig:
    """`trainer.early_stopping`."""

    patience: Positive | None = None


@dataclass
class TrainerConfig:
    """The `trainer` group: how long, where and how a run trains, and what it keeps."""

    # The budget (`budget`): max_steps, else max_epochs, else the default one.
    max_epochs: Positive | None = None
    max_steps: Positive | None = None
    default_epochs: Positive = 10
    min_steps: Positive | None = 2000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "32", "bf16", "16"] = "auto"
    accumulate_grad_batches: Positive = 1
    grad_clip: Annotated[float, Bounds(gt=0)] | None = 1.0
    compile: bool = False
    nproc_per_node: Positive = 1
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: sharded (mmtrain.sharding)
    seed: rules.Seed = 42
    val_every_n_steps: Positive | None = None
    val_before_training: bool = False
    log_every_n_steps: Positive = 20
    on_nonfinite: Literal["stop", "skip"] = "stop"
    resume: str | None = None
    overwrite: bool = False
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class BatchConfig:
    """The data group's keys that every data source has (they shape batches or say how the
    labels are scored, rather than choose rows); the source's own keys go to its factory."""

    batch_size: Positive = 32
    num_workers: Count = 0
    max_text_length: Positive | None = None
    # {name: {p: ..., options}}: each checked against its registered augmentation.
    augment: dict[str, Any] = field(default_factory=dict)
    hard_negatives: Count = 0
    negative_sampler: str = "perturb"
    # The class binary F1/precision/recall/AUROC score; None: chosen from the two labels
    # (mmtrain.metrics.positive_class, checked against them once the data is read).
    positive_label: str | int | bool | None = None


@dataclass(frozen=True)
class ModelLoading:
    """Keys of every model that say how transformers loads it (not its factory's, which
    receives the tokenizer and the backbone's shape): model.tokenizer, a pretrained
    tokenizer's name or folder; model.trust_remote_code, whether code that a backbone or
    tokenizer folder names (a config's auto_map) may run: never, unless the user opts in."""

    tokenizer: str | None = None
    trust_remote_code: bool = False


BATCH_KEYS = tuple(f.name for f in dataclasses.fields(BatchConfig))
# Keys of every model section that the spec keeps (RunSpec), not the model's factory.
LOADING_KEYS = tuple(f.name for f in dataclasses.fields(ModelLoading))
# Per kind of component, the keyword arguments mmtrain supplies at run time (not config
# keys). A data source gets the ones its factory has a parameter for: the backbone's image
# size, a finished run's label names, the model's number of classes, and `full_check`
# (`mmtrain validate` asks it to verify its cache).
RUNTIME = {
    "data": ("image_size", "class_names", "num_classes", "full_check"),
    "model": ("tokenizer", "spec", "positive_class"),
    "optimizer": ("model", "samples_per_step"),
    "scheduler": ("optimizer", "total_steps"),
    "zeroshot": ("classes", "tokenizer", "max_length"),
    "logger": ("run",),
}
DEFAULT_TRAITS = ModelTraits(monitor=("val/loss", "min"), metric_names=("loss",))


def typed(schema: type, values: Any, path: str, more: str = "") -> Any:
    """`values` (a mapping of a config section) as an instance of the dataclass `schema`,
    each field conformed to its rule; a UserError naming the key when one does not fit."""
    try:
        return rules.conform({} if values is None else values, schema)
    except rules.Mismatch as wrong:
        if wrong.accepted is None:
            raise UserError(f"{wrong.key(path)} must be {wrong} (got {wrong.shown}).") from None
        raise UserError(
            f"Unknown key '{wrong.key(path)}'.{wrong.accepted_keys(path)}{more}"
        ) from None


@dataclass(frozen=True)
class Component:
    """A registered component chosen by a config group: its kind, name and config keys."""

    kind: str
    name: str
    options: dict[str, Any]

    @classmethod
    def checked(cls, kind: str, values: Any) -> Component:
        """The component `values` (`{"name": ..., keys}`) selects, checked against its
        factory (with the `RUNTIME` keywords it takes supplied later, at build time)."""
        registry.check(kind, values, runtime=_takes(kind, values))
        options = dict(values)
        return cls(kind, str(options.pop("name")), options)

    def build(self, **runtime: Any) -> Any:
        """Call the factory with the config keys and those of the `runtime` values it has
        a parameter for (run-time facts offered to every component of a kind)."""
        offered = registry.accepted(self.kind, self.name, runtime)
        return registry.build(self.kind, {"name": self.name, **self.options}, **offered)


@dataclass(frozen=True)
class RunSpec:
    """Everything a run is built from, checked."""

    config: dict[str, Any]  # the resolved config: saved in checkpoints, given to trackers
    trainer: TrainerConfig
    data: Component  # the data source and its own keys
    batches: BatchConfig
    augment: dict[str, list[aug.Entry]]  # data.augment's switched-on entries, per kind
    model: Component
    traits: ModelTraits  # the model's, from its registration
    optimizer: Component
    scheduler: Component
    zeroshot: Component
    loggers: list[Component]
    monitor: str  # the validation metric that picks best.pt, stops early, a sweep optimises
    mode: Literal["max", "min"]
    # model.tokenizer: a pretrained tokenizer's name or folder (the assembler loads it; the
    # model's factory receives the tokenizer itself); None: the backbone's own, or built.
    tokenizer: str | None = None
    # model.trust_remote_code: transformers may run the code a backbone or tokenizer names.
    trust_remote_code: bool = False

    def prompt_templates(self) -> list[str]:
        """The zero-shot prompt templates (zeroshot.templates; openai by default)."""
        return load_templates(self.zeroshot.options.get("templates", "openai"))


def plain(cfg: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers, interpolations resolved."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_list(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return copy.deepcopy(cfg)


def _takes(kind: str, values: Any) -> tuple[str, ...]:
    """The run-time keyword names of `RUNTIME[kind]` that the factory `values` names has a
    parameter for (none when it names no factory: the check then says why)."""
    name = values.get("name") if isinstance(values, dict) else None
    if name is None:
        return ()
    return tuple(registry.accepted(kind, str(name), dict.fromkeys(RUNTIME.get(kind, ()))))


def traits_of(model: str) -> ModelTraits:
    """The traits model `model` was registered with (an unknown name lists the known ones)."""
    return registry.about("model", model).get("traits", DEFAULT_TRAITS)


def monitored(traits: ModelTraits, monitor: str | None, mode: str) -> tuple[str, str]:
    """The monitored validation metric and whether higher ("max") or lower ("min") is
    better: trainer.checkpoint.monitor/mode, with `auto` the model's own metric and mode,
    or "min" for a monitored loss."""
    default_metric, default_mode = traits.monitor
    metric = monitor or default_metric
    if mode == "auto":
        mode = default_mode if metric == default_metric else ("min" if "loss" in metric else "max")
    return metric, mode


def parse(cfg: DictConfig | dict[str, Any]) -> RunSpec:
    """Check every group of the composed config and return it as a `RunSpec`."""
    config = plain(cfg)
    trainer = typed(TrainerConfig, config.get("trainer"), "trainer")
    data = dict(config.get("data") or {})
    more = f" The data source {data.get('name')!r} takes the others (`mmtrain list data`)."
    batches = typed(BatchConfig, {k: data.pop(k) for k in BATCH_KEYS if k in data}, "data", more)
    data = Component.checked("data", data)
    augment = aug.parse(batches.augment)
    registry.get("negatives", batches.negative_sampler)
    model_values = dict(config.get("model") or {})
    loading = {k: model_values.pop(k) for k in LOADING_KEYS if k in model_values}
    loading = typed(ModelLoading, loading, "model")
    model = Component.checked("model", model_values)
    if "fusion" in model.options:
        registry.get("fusion", model.options["fusion"])
    traits = traits_of(model.name)
    if batches.hard_negatives and not traits.takes_negatives:
        raise UserError(
            f"data.hard_negatives={batches.hard_negatives}, but model {model.name!r} takes no "
            "negative texts; use a contrastive model (model=clip_contrastive) or set "
            "data.hard_negatives=0."
        )
    # Runs written before the zeroshot group existed get its default.
    zeroshot = Component.checked("zeroshot", config.get("zeroshot") or {"name": "prompts"})
    caption = data.options.get("caption_from_label")
    if caption is not None:  # one template, checked as the prompts are
        load_templates([caption], "data.caption_from_label")
    zeroshot = prompts_of(zeroshot, caption)
    if "templates" in zeroshot.options:  # a missing template file fails now
        load_templates(zeroshot.options["templates"])
    if zeroshot.options.get("reference") and not traits.embeds:
        raise UserError(
            f"zeroshot.reference: model {model.name!r} classifies image-text pairs and does not "
            "embed them, so it cannot classify a reference set zero-shot. Train a contrastive "
            "model (e.g. model=clip_contrastive, FLYP with data.caption_from_label), or measure "
            "a fusion run's towers after training: mmtrain export run=RUN out=DIR, then mmtrain "
            "eval out=EVAL model=clip_contrastive model.backbone=DIR zeroshot.reference=[...] "
            "with your data keys."
        )
    optimizer = config.get("optimizer") or {}
    optimizer = Component.checked("optimizer", optimizer)
    scheduler = Component.checked("scheduler", config.get("scheduler") or {})
    loggers.check(config.get("logger"))
    sinks = [
        Component("logger", name, options)
        for name, options in loggers.entries(config.get("logger"))
    ]
    monitor, mode = monitored(traits, trainer.checkpoint.monitor, trainer.checkpoint.mode)
    reported = metric_names(traits, zeroshot)
    if monitor not in reported:
        raise UserError(
            f"trainer.checkpoint.monitor={monitor} is not a validation metric of model "
            f"{model.name!r}; choose one of: {', '.join(reported)}."
        )
    return RunSpec(
        config, trainer, data, batches, augment, model, traits, optimizer, scheduler,
        zeroshot, sinks, monitor, mode, loading.tokenizer, loading.trust_remote_code,
    )  # fmt: skip


def prompts_of(zeroshot: Component, caption: str | None) -> Component:
    """The zeroshot group with `templates: auto` resolved: the captions' template
    (data.caption_from_label) when training makes captions from labels, so the prompts
    match training, else OpenAI's 80; any other value is the user's and stays."""
    if zeroshot.options.get("templates") != "auto":
        return zeroshot
    templates = [caption] if caption is not None else "openai"
    return dataclasses.replace(zeroshot, options={**zeroshot.options, "templates": templates})


def metric_names(traits: ModelTraits, zeroshot: Component | None = None) -> list[str]:
    """The `val/NAME` metrics a validation of the model reports (zero-shot ones when the
    model embeds and `zeroshot` is on and the split turns out to have image classes)."""
    names = list(traits.metric_names)
    if traits.embeds and zeroshot is not None and zeroshot.name != "none":
        names += RetrievalMetrics.ZEROSHOT_NAMES
    return [f"val/{name}" for name in names]


@dataclass(frozen=True)
class Budget:
    """How long a run trains: optimizer steps per epoch, in all, and the rule that chose it."""

    steps_per_epoch: int
    total: int
    reason: str


def budget(trainer: TrainerConfig, batches_per_epoch: int) -> Budget:
    """The training budget: what the user set wins. `trainer.max_steps` is the number of
    optimizer steps (over `max_epochs`, as in the transformers Trainer); else
    `trainer.max_epochs` is the number of epochs; with neither set (both null in
    conf/trainer), `default_epochs` epochs raised to at least `min_steps` steps, so that a
    small data set still gets a budget that can learn."""
    per_epoch = math.ceil(batches_per_epoch / trainer.accumulate_grad_batches)
    if trainer.max_steps is not None:
        also = (
            f"; it wins over trainer.max_epochs={trainer.max_epochs}" if trainer.max_epochs else ""
        )
        return Budget(per_epoch, trainer.max_steps, f"trainer.max_steps={trainer.max_steps}{also}")
    if trainer.max_epochs is not None:
        reason = f"trainer.max_epochs={trainer.max_epochs} of {per_epoch} steps"
        if trainer.min_steps:
            reason += (
                " (trainer.min_steps applies only when neither max_epochs nor max_steps is set)"
            )
        return Budget(per_epoch, trainer.max_epochs * per_epoch, reason)
    epochs = trainer.default_epochs * per_epoch
    if trainer.min_steps and trainer.min_steps > epochs:
        reason = (
            f"the default budget: {trainer.default_epochs} epochs of {per_epoch} steps "
            f"raised to trainer.min_steps={trainer.min_steps}"
        )
        total = trainer.min_steps
    else:
        reason = f"the default budget: trainer.default_epochs={trainer.default_epochs} of {per_epoch} steps"
        total = epochs
    how = "set trainer.max_epochs or trainer.max_steps to choose"
    return Budget(per_epoch, total, f"{reason} ({how})")


def total_steps(trainer: TrainerConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of `budget`."""
    chosen = budget(trainer, batches_per_epoch)
    return chosen.steps_per_epoch, chosen.total


def of_run(run_dir: Path, overrides: list[str] = ()) -> RunSpec:
    """The spec of the run in `run_dir` (its .hydra/config.yaml, in this release's keys),
    with `overrides` (`data.batch_size=256`) applied; its trackers left out."""
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise UserError(
            f"run={run_dir}: {config_file} not found; give the directory of a finished "
            "`mmtrain train` run (it holds .hydra/, checkpoints/, tokenizer/)."
        )
    config = upgrade(OmegaConf.to_container(OmegaConf.load(config_file)))
    config.pop("logger", None)  # trackers follow training only: eval needs no W&B or MLflow
    if overrides:
        given = dotlist(overrides)
        unknown = sorted(set(given) - set(config))
        if unknown:
            raise UserError(
                f"Unknown override group {unknown[0]!r}; overrides change the run's config, "
                f"whose groups are: {', '.join(map(str, config))} (e.g. data.batch_size=256)."
            )
        config = OmegaConf.to_container(OmegaConf.merge(config, given))
    try:
        return parse(config)
    except UserError as error:
        raise UserError(
            f"run={run_dir}: its config ({config_file}) does not fit this release of mmtrain: "
            f"{error} If another release of mmtrain trained it, use that release; if an "
            "override above caused it, change the override."
        ) from None


def dotlist(overrides: list[str]) -> dict[str, Any]:
    """`KEY.PATH=VALUE` overrides as a nested mapping, values typed as YAML types them."""
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
