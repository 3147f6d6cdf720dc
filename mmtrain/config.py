"""The typed part of the config: the trainer group and the data group's loader keys.

Both are OmegaConf structured configs: the composed YAML is merged into the dataclass, so a
key the schema does not have, also one added with `+`, and a value of the wrong type fail
before anything is built, naming the key and the keys that exist. Ranges and choices are
checked in `__post_init__`, which OmegaConf runs when it creates the object.

The other groups (model, optimizer, scheduler and the data source's own keys) are checked
against the signature of the factory that consumes them (`mmtrain.registry.check`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from mmtrain.errors import UserError

PRECISIONS = ("auto", "32", "bf16", "16")
DEVICES = ("auto", "cpu", "cuda")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key}={value} is not valid; choose one of: {', '.join(choices)}.")


def _at_least(key: str, value: int | None, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        wanted = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise UserError(f"{key} must be {wanted}{' or null' if allow_none else ''} (got {value}).")


@dataclass
class CheckpointConfig:
    """`trainer.checkpoint`: which checkpoints are written and which one is best."""

    every_n_steps: int | None = None
    keep_last: int | None = 2
    monitor: str | None = None
    mode: str = "auto"

    def __post_init__(self) -> None:
        _at_least("trainer.checkpoint.every_n_steps", self.every_n_steps, 1, allow_none=True)
        _at_least("trainer.checkpoint.keep_last", self.keep_last, 0, allow_none=True)
        _choice("trainer.checkpoint.mode", self.mode, ("max", "min", "auto"))


@dataclass
class EarlyStoppingConfig:
    """`trainer.early_stopping`."""

    patience: int | None = None

    def __post_init__(self) -> None:
        _at_least("trainer.early_stopping.patience", self.patience, 1, allow_none=True)


@dataclass
class TrainerConfig:
    """The `trainer` group: how long, where and how a run trains, and what it keeps."""

    max_epochs: int | None = 10
    max_steps: int | None = None
    min_steps: int | None = 2000
    device: str = "auto"
    precision: str = "auto"
    accumulate_grad_batches: int = 1
    grad_clip: float | None = 1.0
    compile: bool = False
    nproc_per_node: int = 1
    seed: int = 42
    val_every_n_steps: int | None = None
    val_before_training: bool = False
    log_every_n_steps: int = 20
    on_nonfinite: str = "stop"
    resume: str | None = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    def __post_init__(self) -> None:
        _choice("trainer.device", self.device, DEVICES)
        _choice("trainer.precision", self.precision, PRECISIONS)
        _choice("trainer.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _at_least("trainer.max_epochs", self.max_epochs, 1, allow_none=True)
        _at_least("trainer.max_steps", self.max_steps, 1, allow_none=True)
        _at_least("trainer.min_steps", self.min_steps, 1, allow_none=True)
        if self.max_epochs is None and self.max_steps is None:
            raise UserError("Set trainer.max_epochs or trainer.max_steps (both are null).")
        _at_least("trainer.accumulate_grad_batches", self.accumulate_grad_batches, 1)
        _at_least("trainer.nproc_per_node", self.nproc_per_node, 1)
        _at_least("trainer.log_every_n_steps", self.log_every_n_steps, 1)
        _at_least("trainer.val_every_n_steps", self.val_every_n_steps, 1, allow_none=True)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(
                f"trainer.grad_clip must be a positive number or null (got {self.grad_clip})."
            )


@dataclass
class LoaderConfig:
    """The data group's keys that shape batches rather than choose rows: every data source
    has them; the source's own keys go to its factory."""

    batch_size: int = 32
    num_workers: int = 0
    max_text_length: int | None = None
    # {name: {p: ..., options}}: checked against the registered augmentations.
    augment: dict[str, Any] = field(default_factory=dict)
    hard_negatives: int = 0
    negative_sampler: str = "perturb"

    def __post_init__(self) -> None:
        _at_least("data.batch_size", self.batch_size, 1)
        _at_least("data.num_workers", self.num_workers, 0)
        _at_least("data.max_text_length", self.max_text_length, 1, allow_none=True)
        _at_least("data.hard_negatives", self.hard_negatives, 0)


LOADER_KEYS = tuple(f.name for f in dataclasses.fields(LoaderConfig))


def plain(cfg: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers, interpolations resolved."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_list(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _schema_at(schema: type, path: list[str]) -> tuple[type, Any]:
    """The dataclass holding the last key of `path`, and that key's type (None if unknown)."""
    node = schema
    for name in path[:-1]:
        node = typing.get_type_hints(node).get(name, node)
    return node, typing.get_type_hints(node).get(path[-1]) if path else None


def _type_words(hint: Any) -> str:
    args = () if typing.get_origin(hint) is dict else typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint)
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    text = words.get(base, "a mapping")
    return f"{text} or null" if type(None) in args else text


def typed(schema: type, node: Any, prefix: str, more: str = "") -> Any:
    """`node` (a config section) as an instance of the dataclass `schema`; a UserError
    naming the key, and the keys that exist (and `more` about others), when it does not fit."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        path = [p for p in str(getattr(error, "full_key", "") or "").split(".") if p]
        node, hint = _schema_at(schema, path)
        keys = ", ".join(f.name for f in dataclasses.fields(node))
        where, parent = ".".join([prefix, *path]), ".".join([prefix, *path[:-1]])
        if isinstance(error, ConfigKeyError) and path:
            close = difflib.get_close_matches(path[-1], keys.split(", "), n=1, cutoff=0.5)
            did_you_mean = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"Unknown key {where!r}.{did_you_mean} Accepted keys of {parent}: {keys}.{more}"
            ) from None
        reason = str(getattr(error, "msg", error)).splitlines()[0]
        takes = f"; {where} takes {_type_words(hint)}" if hint is not None else ""
        raise UserError(
            f"{where}: {reason}{takes}. Accepted keys of {parent}: {keys}.{more}"
        ) from None


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    """The `trainer` group, checked and typed."""
    return typed(TrainerConfig, cfg.trainer, "trainer")


def loader_config(cfg: DictConfig) -> LoaderConfig:
    """The data group's loader keys, checked and typed."""
    data = cfg.data
    more = f" The data source {data.get('name')!r} takes the others (`mmtrain list data`)."
    return typed(LoaderConfig, {k: data[k] for k in LOADER_KEYS if k in data}, "data", more)


def source_options(cfg: DictConfig) -> dict[str, Any]:
    """The data group's keys that belong to the data source's factory (`data.name` too)."""
    return {k: v for k, v in plain(cfg.data).items() if k not in LOADER_KEYS}


# Model keys added after 0.2.0; a run written before them trained without them.
FINE_TUNING_DEFAULTS = {
    "unfreeze_last_layers": None,
    "gradient_checkpointing": False,
    "lora": {"r": None, "alpha": None, "dropout": 0.0, "target_modules": None},
}


def upgrade(config: dict[str, Any]) -> dict[str, Any]:
    """A resolved config that mmtrain 0.1.0 wrote (a checkpoint's, a run's
    .hydra/config.yaml), in this release's keys; a config of this release comes back equal.

    0.1.0 kept hard negatives in the model group (model.hard_negatives,
    model.negative_sampler); the data pipeline draws them now (data.*). Its `shapes` took
    data.on_bad_sample, which only sources that read files take now.
    """
    config = copy.deepcopy(config)
    model, data = config.get("model") or {}, config.get("data") or {}
    if model.get("name") in ("clip_fusion", "clip_contrastive"):  # before the fine-tuning keys
        for key, value in FINE_TUNING_DEFAULTS.items():
            model.setdefault(key, copy.deepcopy(value))
    if data.get("name") == "shapes":
        data.pop("on_bad_sample", None)
    if model.get("name") == "clip_fusion":  # 0.2.0 had no product fusion: its default, off
        model.setdefault("fusion_difference", False)
    if "hard_negatives" not in model and "hard_negatives" in data:
        return config  # written by this release
    for key in ("hard_negatives", "negative_sampler"):
        if key in model:
            data.setdefault(key, model.pop(key))
    if not data.get("hard_negatives") and data.get("name") in ("shapes", "manifest"):
        # Without negatives the sampler is never used: take this release's default of the
        # data option, so the run's config equals the one its overrides compose today.
        data["hard_negatives"] = 0
        data["negative_sampler"] = "shapes" if data["name"] == "shapes" else "perturb"
    return config
