"""Checks on the composed config that Hydra's own struct checks do not cover."""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmtrain import registry
from mmtrain.data import augment
from mmtrain.errors import UserError

PRECISIONS = ("auto", "32", "bf16", "16")
DEVICES = ("auto", "cpu", "cuda")
DATA_LOADER_KEYS = ("batch_size", "num_workers", "max_text_length", "on_bad_sample", "augment")
# Passed to a data source at run time, when its factory has a parameter of that name
# (`image_size` always): on_bad_sample from the data group, class_names from a run's
# labels.json, num_classes from model.num_classes.
SOURCE_RUNTIME = ("on_bad_sample", "class_names", "num_classes")


def plain(cfg: Any) -> Any:
    """A DictConfig/ListConfig as plain Python containers, interpolations resolved."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_list(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def source_options(data_cfg: DictConfig) -> dict[str, Any]:
    """The data group's keys that go to the source factory (loader keys removed)."""
    return {k: v for k, v in plain(data_cfg).items() if k not in DATA_LOADER_KEYS}


def source_runtime(name: str) -> tuple[str, ...]:
    """The run-time keyword arguments the data source `name` takes."""
    params = inspect.signature(registry.get("data", name)).parameters
    return ("image_size", *(key for key in SOURCE_RUNTIME if key in params))


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    text = str(value)
    if text not in choices:
        raise UserError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}.")
    return text


def _positive(key: str, value: Any, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        wanted = "a non-negative integer" if allow_zero else "a positive integer"
        raise UserError(
            f"{key} must be {wanted}{' or null' if allow_none else ''} (got {value!r})."
        )


def validate(cfg: DictConfig) -> None:
    """Fail fast, before any data or model is built, on values no component can use."""
    t = cfg.trainer
    _choice("trainer.precision", t.precision, PRECISIONS)
    _choice("trainer.device", t.device, DEVICES)
    _choice("trainer.on_nonfinite", t.on_nonfinite, ("stop", "skip"))
    _choice("trainer.checkpoint.mode", t.checkpoint.mode, ("max", "min", "auto"))
    _choice("data.on_bad_sample", cfg.data.on_bad_sample, ("error", "skip"))
    _positive("trainer.max_epochs", t.max_epochs, allow_none=True)
    _positive("trainer.max_steps", t.max_steps, allow_none=True)
    if t.max_epochs is None and t.max_steps is None:
        raise UserError("Set trainer.max_epochs or trainer.max_steps (both are null).")
    _positive("trainer.accumulate_grad_batches", t.accumulate_grad_batches)
    _positive("trainer.log_every_n_steps", t.log_every_n_steps)
    _positive("trainer.val_every_n_steps", t.val_every_n_steps, allow_none=True)
    _positive("trainer.checkpoint.every_n_steps", t.checkpoint.every_n_steps, allow_none=True)
    _positive(
        "trainer.checkpoint.keep_last", t.checkpoint.keep_last, allow_none=True, allow_zero=True
    )
    _positive("trainer.early_stopping.patience", t.early_stopping.patience, allow_none=True)
    _positive("data.batch_size", cfg.data.batch_size)
    _positive("data.num_workers", cfg.data.num_workers, allow_zero=True)
    _positive("data.max_text_length", cfg.data.max_text_length, allow_none=True)
    if t.grad_clip is not None and not (isinstance(t.grad_clip, int | float) and t.grad_clip > 0):
        raise UserError(
            f"trainer.grad_clip must be a positive number or null (got {t.grad_clip!r})."
        )

    model = plain(cfg.model)
    data = source_options(cfg.data)
    runtime = source_runtime(data["name"]) if "name" in data else ("image_size",)
    registry.check("data", data, runtime=runtime)
    augment.parse(plain(cfg.data.get("augment")))
    registry.check("model", model, runtime=("tokenizer", "spec"))
    registry.check("optimizer", plain(cfg.optimizer), runtime=("model",))
    registry.check("scheduler", plain(cfg.scheduler), runtime=("optimizer", "total_steps"))
    if "fusion" in model:
        registry.get("fusion", model["fusion"])
