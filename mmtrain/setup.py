"""Builds what a run needs from its config: data, tokenizer, model, optimizer, schedule."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

# Importing the modules registers their components.
import mmtrain.data.manifest  # noqa: F401
import mmtrain.data.shapes  # noqa: F401
import mmtrain.models.classifier  # noqa: F401
import mmtrain.models.contrastive  # noqa: F401
import mmtrain.models.fusion  # noqa: F401
import mmtrain.optim  # noqa: F401
from mmtrain import distributed, registry
from mmtrain.config import plain, source_options, source_runtime
from mmtrain.data import augment as aug
from mmtrain.data.loader import Collate, make_loader
from mmtrain.data.source import SplitData, load_class_names, save_class_names
from mmtrain.data.tokenizer import build_word_tokenizer, save_tokenizer
from mmtrain.errors import UserError
from mmtrain.models.backbone import BackboneSpec, backbone_spec, load_tokenizer
from mmtrain.models.negatives import NegativeSampler

log = logging.getLogger("mmtrain")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 autocast on a CUDA GPU that supports it (no scaler needed), else 32."""
    if str(name) != "auto":
        return str(name)
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32"


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "trainer.device=cuda but no CUDA GPU is visible; use trainer.device=auto or cpu."
        )
    return torch.device(name)


@dataclass
class Parts:
    """The built objects of a run."""

    spec: BackboneSpec
    splits: dict[str, SplitData]
    tokenizer: Any
    model: nn.Module
    collate: Collate
    # Applied on the training device to each training batch: (batch, key) -> batch, with
    # key = (step, micro-batch, rank). Deterministic in (seed, key): a resumed run augments
    # exactly as before.
    augment: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]] = (
        lambda batch, step: batch
    )
    # Rows dropped under data.on_bad_sample=skip: {"skipped": N, "by_reason": {reason: N}}.
    bad_samples: dict[str, Any] = field(default_factory=lambda: {"skipped": 0, "by_reason": {}})
    # The training split's collate (text augmentation); `collate` serves the other splits.
    train_collate: Collate | None = None


def build_data(
    cfg: DictConfig,
    spec: BackboneSpec,
    class_names: list[str] | None = None,
    on_bad_sample: str | None = None,
) -> dict[str, SplitData]:
    """The data source's splits, at the backbone's image size.

    `class_names` (a run's labels.json) fixes the label mapping; `on_bad_sample` overrides
    `data.on_bad_sample` (`mmtrain validate` collects bad rows with "skip").
    """
    log.info("building data %s at %d px", cfg.data.name, spec.image_size)
    available = {
        "image_size": spec.image_size,
        "on_bad_sample": on_bad_sample or cfg.data.on_bad_sample,
        "class_names": class_names,
        "num_classes": cfg.model.get("num_classes"),
    }
    runtime = {key: available[key] for key in source_runtime(cfg.data.name)}
    splits = registry.build("data", source_options(cfg.data), **runtime)
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


def text_length(cfg: DictConfig, spec: BackboneSpec) -> int:
    """`data.max_text_length`, capped at the backbone's positions (with a warning)."""
    wanted = cfg.data.max_text_length
    if wanted is None:
        return spec.max_text_length
    if wanted > spec.max_text_length:
        log.warning(
            "data.max_text_length=%d exceeds the backbone's %d text positions; using %d.",
            wanted,
            spec.max_text_length,
            spec.max_text_length,
        )
        return spec.max_text_length
    return wanted


def build_parts(
    cfg: DictConfig, run_dir: Path | None, class_names: list[str] | None = None
) -> Parts:
    """Data aligned to the backbone, the tokenizer and label names (saved to `run_dir`), the
    model, and the training split's augmentation.

    `class_names` fixes the label mapping (eval and predict pass the run's labels.json); a
    resumed run reuses the labels.json of its run directory.
    """
    model_cfg = plain(cfg.model)
    spec = backbone_spec(model_cfg.get("backbone"), model_cfg.get("backbone_config"))
    if class_names is None and run_dir is not None and cfg.trainer.get("resume"):
        class_names = load_class_names(run_dir)
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
    if run_dir is not None:
        save_tokenizer(tokenizer, run_dir)
        save_class_names(class_names, run_dir)
    log.info("building model %s", model_cfg["name"])
    model = registry.build("model", model_cfg, tokenizer=tokenizer, spec=spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info(
        "  %s parameters: %s trainable, %s frozen",
        f"{trainable + frozen:,}",
        f"{trainable:,}",
        f"{frozen:,}",
    )
    length = text_length(cfg, spec)
    augment = aug.parse(plain(cfg.data.get("augment")))
    for kind, entries in augment.items():
        if entries:
            log.info("training %s: %s", kind.replace("_", " "), ", ".join(e[0] for e in entries))
    text_augment = (
        aug.TextAugment(augment[aug.TEXT], cfg.trainer.seed) if augment[aug.TEXT] else None
    )
    return Parts(
        spec,
        splits,
        tokenizer,
        model,
        Collate(tokenizer, length),
        augment=aug.ImageAugment(augment[aug.IMAGE], cfg.trainer.seed),
        bad_samples=bad_sample_counts(splits),
        train_collate=Collate(tokenizer, length, text_augment, negative_sampler(model_cfg, cfg)),
    )


def negative_sampler(model_cfg: dict[str, Any], cfg: DictConfig) -> NegativeSampler | None:
    """The hard-negative texts of `model.hard_negatives` (clip_contrastive), if any."""
    if not model_cfg.get("hard_negatives"):
        return None
    log.info(
        "hard negatives: %d per image from %s",
        model_cfg["hard_negatives"],
        model_cfg["negative_sampler"],
    )
    return NegativeSampler(
        model_cfg["negative_sampler"], model_cfg["hard_negatives"], cfg.trainer.seed
    )


def loader(
    parts: Parts, cfg: DictConfig, split: str, *, train: bool, pin_memory: bool
) -> DataLoader:
    """The DataLoader of `split`: shuffled by (seed, epoch) for training, in order otherwise."""
    collate = parts.train_collate if train and parts.train_collate else parts.collate
    return make_loader(
        parts.splits[split],
        collate,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        shuffle=train,
        seed=cfg.trainer.seed,
        pin_memory=pin_memory,
        rank=distributed.rank(),
        world_size=distributed.world_size(),
    )


def total_steps(cfg: DictConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) from max_epochs / max_steps."""
    per_epoch = math.ceil(batches_per_epoch / cfg.trainer.accumulate_grad_batches)
    limits = []
    if cfg.trainer.max_epochs is not None:
        limits.append(cfg.trainer.max_epochs * per_epoch)
    if cfg.trainer.max_steps is not None:
        limits.append(cfg.trainer.max_steps)
    return per_epoch, min(limits)
