"""Config -> the objects of a run: data aligned to the backbone, tokenizer, model, loaders,
optimizer, schedule, and the wrapped module the loop steps.

`check` runs first and builds nothing: every key and value it can judge from the config
alone fails there, before any data is read or any weight is made.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import typing
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

import mmtrain.components  # noqa: F401  (registers the built-in components)
from mmtrain import distributed, loggers, registry
from mmtrain.config import (
    LoaderConfig,
    TrainerConfig,
    loader_config,
    plain,
    source_options,
    trainer_config,
)
from mmtrain.data import augment as aug
from mmtrain.data.loader import Collate, close_workers, make_loader
from mmtrain.data.negatives import NegativeSampler
from mmtrain.data.source import SplitData, save_class_names
from mmtrain.data.summary import summarize
from mmtrain.data.tokenizer import build_word_tokenizer, save_tokenizer
from mmtrain.errors import UserError
from mmtrain.metrics import RetrievalMetrics
from mmtrain.models.backbone import BackboneSpec, backbone_spec, load_tokenizer
from mmtrain.models.zeroshot import ZeroShotTask, can_embed, load_templates
from mmtrain.optim import AUTO_KEYS, check_auto
from mmtrain.watch import ChanceWatch

log = logging.getLogger("mmtrain")
AUTOCAST = {"bf16": torch.bfloat16, "16": torch.float16}
# Facts a data source may need that are not its config keys: the backbone's image size, a
# finished run's label names (labels.json), the model's number of classes. A source gets
# those its factory has a parameter for; `mmtrain validate` also asks it to verify its cache.
SOURCE_RUNTIME = ("image_size", "class_names", "num_classes", "full_check")
MODEL_RUNTIME = ("tokenizer", "spec")
ZEROSHOT_RUNTIME = ("classes", "tokenizer", "max_length")


def source_runtime(name: str) -> tuple[str, ...]:
    """The run-time keyword arguments the data source `name` takes."""
    return tuple(registry.accepted("data", name, dict.fromkeys(SOURCE_RUNTIME)))


def check(cfg: DictConfig) -> TrainerConfig:
    """Check every group of `cfg` against its schema or its factory, building nothing;
    return the typed trainer config."""
    trainer, loader = trainer_config(cfg), loader_config(cfg)
    source = source_options(cfg)
    registry.check("data", source, runtime=source_runtime(source.get("name", "")))
    aug.parse(loader.augment)
    registry.get("negatives", loader.negative_sampler)
    model = plain(cfg.model)
    registry.check("model", model, runtime=MODEL_RUNTIME)
    if "fusion" in model:
        registry.get("fusion", model["fusion"])
    built = typing.get_type_hints(registry.get("model", model["name"])).get("return")
    if loader.hard_negatives and inspect.isclass(built) and not _takes_negatives(built.forward):
        raise _no_negatives(loader, model["name"])
    zeroshot = zeroshot_options(cfg)
    registry.check("zeroshot", zeroshot, runtime=ZEROSHOT_RUNTIME)
    if "templates" in zeroshot:  # a missing template file fails now, not at the first validation
        load_templates(zeroshot["templates"])
    optimizer = plain(cfg.optimizer)
    named = isinstance(optimizer, dict) and "name" in optimizer
    # accepted() also refuses an unknown name, listing the registered ones.
    offered = registry.accepted("optimizer", optimizer["name"], OPTIMIZER_RUNTIME) if named else {}
    registry.check("optimizer", optimizer, runtime=("model", *offered))
    if named:  # a word other than auto fails now, not after the build
        for key in AUTO_KEYS:
            check_auto(key, optimizer.get(key))
    registry.check("scheduler", plain(cfg.scheduler), runtime=("optimizer", "total_steps"))
    loggers.check(plain(cfg.get("logger")))
    return trainer


# What build_run offers every optimizer factory besides the model; each takes what it uses
# (`samples_per_step`: what `optimizer.lr=auto` scales with).
OPTIMIZER_RUNTIME = dict.fromkeys(("samples_per_step",))


def monitored(model: str, monitor: str | None, mode: str) -> tuple[str, str]:
    """The validation metric that picks best.pt (and stops early, and a sweep optimises) and
    whether higher ("max") or lower ("min") is better: trainer.checkpoint.monitor/mode, with
    `auto` the model's own metric and mode, or "min" for a monitored loss."""
    built = typing.get_type_hints(registry.get("model", model)).get("return")
    default_metric, default_mode = getattr(built, "monitor", ("val/loss", "min"))
    metric = monitor or default_metric
    if mode == "auto":
        mode = default_mode if metric == default_metric else ("min" if "loss" in metric else "max")
    return metric, mode


def _takes_negatives(forward: Callable[..., Any]) -> bool:
    return "negative_input_ids" in inspect.signature(forward).parameters


def _no_negatives(loader: LoaderConfig, model: str) -> UserError:
    return UserError(
        f"data.hard_negatives={loader.hard_negatives}, but model {model!r} takes no negative "
        "texts; use a contrastive model (model=clip_contrastive) or set data.hard_negatives=0."
    )


def zeroshot_options(cfg: DictConfig) -> dict[str, Any]:
    """The zeroshot group (runs written before it existed get its default, `prompts`)."""
    return plain(cfg.zeroshot) if cfg.get("zeroshot") is not None else {"name": "prompts"}


def build_zeroshot(
    cfg: DictConfig, split: SplitData, tokenizer: Any, max_length: int, model: nn.Module
) -> ZeroShotTask | None:
    """Zero-shot classification of `split`'s images as the zeroshot group says, when the
    model embeds images and texts and the split has image classes; else None."""
    if not can_embed(model):
        return None
    task = registry.build(
        "zeroshot",
        zeroshot_options(cfg),
        classes=split.zeroshot_classes(),
        tokenizer=tokenizer,
        max_length=max_length,
    )
    if task is not None:
        log.info(
            "zero-shot classification: %d classes, %d prompt templates",
            len(task.class_names),
            len(task.templates),
        )
    return task


def val_metrics(model: nn.Module, device: torch.device, zeroshot: ZeroShotTask | None) -> Any:
    """A fresh set of `model`'s validation metrics; with `zeroshot`, its classes embedded by
    the model as it is now (prompts are re-embedded at every evaluation)."""
    if zeroshot is None:
        return model.metrics(device)
    return model.metrics(device, zeroshot=zeroshot.classes(model, device))


def metric_names(model: nn.Module, zeroshot: ZeroShotTask | None) -> list[str]:
    """The `val/NAME` metrics an evaluation of `model` reports."""
    names = [*model.metric_names, *(RetrievalMetrics.ZEROSHOT_NAMES if zeroshot else ())]
    return [f"val/{name}" for name in names]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "trainer.device=cuda but no CUDA GPU is visible; use trainer.device=auto or cpu."
        )
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 autocast on a CUDA GPU that supports it (no scaler needed), else 32."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32"


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    """A context-manager factory: autocast at `precision` on `device`, or nothing for 32."""
    dtype = AUTOCAST.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


def model_spec(cfg: DictConfig) -> BackboneSpec:
    """What the backbone asks of the data (size, mean/std, text length), loading no weights."""
    model = plain(cfg.model)
    return backbone_spec(model.get("backbone"), model.get("backbone_config"))


def build_data(
    cfg: DictConfig,
    spec: BackboneSpec,
    class_names: list[str] | None = None,
    full_check: bool = False,
) -> dict[str, SplitData]:
    """The data source's splits at the backbone's image size; `class_names` (a run's
    labels.json) fixes the label mapping; `full_check` (validate) checks every cached pixel or decoded sample."""
    log.info("building data %s at %d px", cfg.data.name, spec.image_size)
    available = {
        "image_size": spec.image_size,
        "class_names": class_names,
        "num_classes": cfg.model.get("num_classes"),
        "full_check": full_check,
    }
    runtime = registry.accepted("data", cfg.data.name, available)
    splits = registry.build("data", source_options(cfg), **runtime)
    for name, split in splits.items():
        log.info("  %s: %d pairs", name, len(split))
    return splits


def bad_sample_counts(splits: dict[str, SplitData]) -> dict[str, Any]:
    """summary.json's `bad_samples`: rows dropped, in all, and per reason."""
    reasons = Counter(row.reason for split in splits.values() for row in split.bad_rows)
    return {"skipped": sum(reasons.values()), "by_reason": dict(reasons.most_common())}


def check_num_classes(model_cfg: dict[str, Any], class_names: list[str]) -> int:
    """The number of classes: inferred from the data, or model.num_classes if it agrees."""
    num_classes = len(class_names)
    if model_cfg.get("num_classes", num_classes) not in (None, num_classes):
        shown = ", ".join(class_names[:20]) + (" ..." if num_classes > 20 else "")
        raise UserError(
            f"model.num_classes={model_cfg['num_classes']} but the data has {num_classes} classes "
            f"({shown}); set model.num_classes={num_classes} or null to infer it."
        )
    return num_classes


def text_length(max_text_length: int | None, spec: BackboneSpec) -> int:
    """`data.max_text_length`, capped at the backbone's positions (with a warning)."""
    if max_text_length is None:
        return spec.max_text_length
    if max_text_length > spec.max_text_length:
        log.warning(
            "data.max_text_length=%d exceeds the backbone's %d text positions; using %d.",
            max_text_length,
            spec.max_text_length,
            spec.max_text_length,
        )
        return spec.max_text_length
    return max_text_length


@dataclass
class Parts:
    """What a run is built from: data aligned to the backbone, its tokenizer, the model, and
    how batches are made."""

    spec: BackboneSpec
    splits: dict[str, SplitData]
    tokenizer: Any
    model: nn.Module
    loader: LoaderConfig
    seed: int
    collate: Collate  # validation and test batches
    train_collate: Collate  # training batches: text augmentation and hard negatives
    # Applied on the training device to each training batch: (batch, key) -> batch with
    # key = (step, micro-batch, rank); deterministic in (seed, key).
    augment: aug.ImageAugment
    zeroshot: ZeroShotTask | None = None  # zero-shot classification of the val split
    # random_resized_crop's options when the training images are whole pictures (a cache):
    # the loader cuts the box from the whole picture instead of the device from the centre.
    load_crop: dict[str, Any] | None = None

    @property
    def bad_samples(self) -> dict[str, Any]:
        """Rows dropped under data.on_bad_sample=skip: {"skipped": N, "by_reason": {reason:
        N}}; asked at the end, as streamed splits count theirs while training."""
        return bad_sample_counts(self.splits)


def build_parts(
    cfg: DictConfig, run_dir: Path | None, class_names: list[str] | None = None
) -> Parts:
    """Data aligned to the backbone, the tokenizer and label names (saved to `run_dir`), the
    model, and the training split's augmentation and hard negatives.

    `class_names` fixes the label mapping (a resumed run passes its labels.json).
    """
    loader = loader_config(cfg)
    seed = trainer_config(cfg).seed
    model_cfg = plain(cfg.model)
    spec = model_spec(cfg)
    splits = build_data(cfg, spec, class_names)
    for name in ("train", "val"):
        if name not in splits:
            raise UserError(f"The data source {cfg.data.name!r} must provide train and val splits.")
        if len(splits[name]) == 0:
            raise UserError(
                f"The {name} split has no usable rows"
                f"{' (every row is bad)' if splits[name].bad_rows else ''}; "
                "run `mmtrain validate` with the same overrides to see why."
            )
    if model_cfg.get("backbone") is None:
        tokenizer = build_word_tokenizer(splits["train"].texts)
        log.info("built a word-level tokenizer from the training texts: %d tokens", len(tokenizer))
    else:
        tokenizer = load_tokenizer(model_cfg["backbone"])
    class_names = splits["train"].class_names
    num_classes = check_num_classes(model_cfg, class_names)
    if "num_classes" in model_cfg:
        model_cfg["num_classes"] = num_classes
    log.info("building model %s", model_cfg["name"])
    model = registry.build("model", model_cfg, tokenizer=tokenizer, spec=spec)
    if loader.hard_negatives and not _takes_negatives(model.forward):
        raise _no_negatives(loader, model_cfg["name"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info(
        "  %s parameters: %s trainable, %s frozen",
        f"{trainable + frozen:,}",
        f"{trainable:,}",
        f"{frozen:,}",
    )
    if run_dir is not None:
        save_tokenizer(tokenizer, run_dir)
        save_class_names(class_names, run_dir)
    length = text_length(loader.max_text_length, spec)
    summarize(splits, tokenizer, length)
    augment = aug.parse(loader.augment)
    load_crop = None
    if splits["train"].aspects is not None:
        for entry in [e for e in augment[aug.IMAGE] if e[0] == "random_resized_crop"]:
            augment[aug.IMAGE].remove(entry)
            load_crop = entry[2]
            log.info("random_resized_crop: cut at load time from the whole cached pictures")
    for kind, entries in augment.items():
        if entries:
            log.info("training %s: %s", kind.replace("_", " "), ", ".join(e[0] for e in entries))
    text_augment = aug.TextAugment(augment[aug.TEXT], seed) if augment[aug.TEXT] else None
    negatives = None
    if loader.hard_negatives:
        log.info(
            "hard negatives: %d per image from %s", loader.hard_negatives, loader.negative_sampler
        )
        negatives = NegativeSampler(loader.negative_sampler, loader.hard_negatives, seed)
        # A sampler that cannot serve this data says so now, not from a loader worker.
        train = splits["train"]
        negatives(train.texts[0], 0, 0, train.negatives[0] if train.negatives else None)
    return Parts(
        spec=spec,
        splits=splits,
        tokenizer=tokenizer,
        model=model,
        loader=loader,
        seed=seed,
        collate=Collate(tokenizer, length, pad_to_max_length=spec.pad_to_max_length),
        train_collate=Collate(
            tokenizer, length, text_augment, negatives, pad_to_max_length=spec.pad_to_max_length
        ),
        augment=aug.ImageAugment(augment[aug.IMAGE], seed),
        zeroshot=build_zeroshot(cfg, splits["val"], tokenizer, length, model),
        load_crop=load_crop,
    )


def data_loader(parts: Parts, split: str, *, train: bool, pin_memory: bool) -> DataLoader:
    """The DataLoader of `split`: shuffled by (seed, epoch) for training, in order otherwise;
    this rank's share of it under DDP."""
    return make_loader(
        parts.splits[split],
        parts.train_collate if train else parts.collate,
        batch_size=parts.loader.batch_size,
        num_workers=parts.loader.num_workers,
        shuffle=train,
        seed=parts.seed,
        pin_memory=pin_memory,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
        crop=parts.load_crop if train else None,
    )


def total_steps(trainer: TrainerConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps): max_epochs' steps, raised to
    min_steps (a small data set still gets a budget that can learn), capped by max_steps."""
    per_epoch = math.ceil(batches_per_epoch / trainer.accumulate_grad_batches)
    limits = []
    if trainer.max_epochs is not None:
        limits.append(max(trainer.max_epochs * per_epoch, trainer.min_steps or 0))
    if trainer.max_steps is not None:
        limits.append(trainer.max_steps)
    return per_epoch, min(limits)


@dataclass
class Run:
    """Everything the training loop steps, built and on its device."""

    trainer: TrainerConfig
    parts: Parts
    device: torch.device
    precision: str
    model: nn.Module  # the plain module: evaluated, saved and restored
    step_model: nn.Module  # what a training step calls: DDP across ranks, compiled if asked
    autocast: Callable[[], Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    val_loader: DataLoader
    steps_per_epoch: int
    max_steps: int
    monitor: str  # the validation metric that picks best.pt and early stopping
    mode: str  # max | min
    watch: ChanceWatch  # hints once when validation stays at chance

    def close(self) -> None:
        """End the loaders' worker processes (the run is over, however it ended)."""
        close_workers(self.train_loader)
        close_workers(self.val_loader)

    def val_metrics(self) -> Any:
        """A fresh set of the model's validation metrics (zero-shot included, if any)."""
        return val_metrics(self.model, self.device, self.parts.zeroshot)


def build_run(
    cfg: DictConfig,
    run_dir: Path | None,
    device: torch.device,
    class_names: list[str] | None = None,
) -> Run:
    """Parts, loaders, optimizer, schedule and the wrapped model of a training run; only the
    main process passes `run_dir` (where the tokenizer and labels are saved)."""
    trainer = trainer_config(cfg)
    precision = resolve_precision(trainer.precision, device)
    parts = build_parts(cfg, run_dir, class_names)
    model = parts.model.to(device)
    pin = device.type == "cuda"
    train_loader = data_loader(parts, "train", train=True, pin_memory=pin)
    val_loader = data_loader(parts, "val", train=False, pin_memory=pin)
    steps_per_epoch, max_steps = total_steps(trainer, len(train_loader))
    samples = parts.loader.batch_size * trainer.accumulate_grad_batches * distributed.world_size()
    options = plain(cfg.optimizer)
    offered = registry.accepted("optimizer", options["name"], {"samples_per_step": samples})
    optimizer = registry.build("optimizer", options, model=model, **offered)
    scheduler = registry.build(
        "scheduler", plain(cfg.scheduler), optimizer=optimizer, total_steps=max_steps
    )
    step_model = model
    if distributed.world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        unused = getattr(model, "has_unused_parameters", True)
        step_model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
    if trainer.compile:
        step_model = torch.compile(step_model)
    monitor, mode = monitored(cfg.model.name, trainer.checkpoint.monitor, trainer.checkpoint.mode)
    metrics = metric_names(model, parts.zeroshot)
    if monitor not in metrics:
        raise UserError(
            f"trainer.checkpoint.monitor={monitor} is not a validation metric of model "
            f"{cfg.model.name!r}; choose one of: {', '.join(metrics)}."
        )
    return Run(
        trainer=trainer,
        parts=parts,
        device=device,
        precision=precision,
        model=model,
        step_model=step_model,
        autocast=autocast_for(precision, device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "16"),
        train_loader=train_loader,
        val_loader=val_loader,
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        monitor=monitor,
        mode=mode,
        watch=ChanceWatch(getattr(parts.splits["val"], "labels", None), max_steps),
    )


def build_loggers(cfg: DictConfig, run: Run, run_dir: Path, resumed: bool) -> list[loggers.Sink]:
    """The experiment trackers of `cfg.logger` (rank 0 builds them), told the resolved
    config and the metrics `run` will log; `resumed` reopens the runs they tracked."""
    names = ["train/loss", *(f"val/{name}" for name in run.model.metric_names)]
    config = plain(cfg)
    info = loggers.RunInfo.of(run_dir, config, resumed, names)
    return loggers.build(config.get("logger"), info)
