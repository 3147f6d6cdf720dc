"""Builds what a run needs from its config: data, tokenizer, model, optimizer, schedule."""

from __future__ import annotations

import logging
import math
import random
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
import mmtrain.data.shapes  # noqa: F401
import mmtrain.models.classifier  # noqa: F401
import mmtrain.models.fusion  # noqa: F401
import mmtrain.optim  # noqa: F401
from mmtrain import registry
from mmtrain.config import plain, source_options
from mmtrain.data.loader import Collate, make_loader
from mmtrain.data.source import SplitData
from mmtrain.data.tokenizer import build_word_tokenizer, save_tokenizer
from mmtrain.errors import UserError
from mmtrain.models.backbone import BackboneSpec, backbone_spec, load_tokenizer

log = logging.getLogger("mmtrain")


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


@dataclass
class Parts:
    """The built objects of a run."""

    spec: BackboneSpec
    splits: dict[str, SplitData]
    tokenizer: Any
    model: nn.Module
    collate: Collate
    # Applied on the training device to each training batch: (batch, step) -> batch.
    # Deterministic in (seed, step), so a resumed run augments exactly as before.
    augment: Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]] = (
        lambda batch, step: batch
    )
    # Rows dropped under data.on_bad_sample=skip: {"skipped": N, "by_reason": {reason: N}}.
    bad_samples: dict[str, Any] = field(default_factory=lambda: {"skipped": 0, "by_reason": {}})


def build_data(cfg: DictConfig, spec: BackboneSpec) -> dict[str, SplitData]:
    """The data source's splits, at the backbone's image size."""
    log.info("building data %s at %d px", cfg.data.name, spec.image_size)
    splits = registry.build("data", source_options(cfg.data), image_size=spec.image_size)
    for name, split in splits.items():
        log.info("  %s: %d pairs", name, len(split))
    return splits


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


def build_parts(cfg: DictConfig, run_dir: Path | None) -> Parts:
    """Data aligned to the backbone, the tokenizer (saved to `run_dir`), and the model."""
    model_cfg = plain(cfg.model)
    spec = backbone_spec(model_cfg.get("backbone"), model_cfg.get("backbone_config"))
    splits = build_data(cfg, spec)
    if "train" not in splits or "val" not in splits:
        raise UserError(f"The data source {cfg.data.name!r} must provide train and val splits.")
    if model_cfg.get("backbone") is None:
        tokenizer = build_word_tokenizer(splits["train"].texts)
        log.info("built a word-level tokenizer from the training texts: %d tokens", len(tokenizer))
    else:
        tokenizer = load_tokenizer(model_cfg["backbone"])
    if run_dir is not None:
        save_tokenizer(tokenizer, run_dir)

    num_classes = len(splits["train"].class_names)
    if "num_classes" in model_cfg and model_cfg["num_classes"] is None:
        model_cfg["num_classes"] = num_classes
    elif model_cfg.get("num_classes", num_classes) != num_classes:
        raise UserError(
            f"model.num_classes={model_cfg['num_classes']} but the data has {num_classes} classes "
            f"({', '.join(splits['train'].class_names)}); set model.num_classes={num_classes} or null to infer it."
        )
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
    return Parts(spec, splits, tokenizer, model, Collate(tokenizer, text_length(cfg, spec)))


def loader(
    parts: Parts, cfg: DictConfig, split: str, *, train: bool, pin_memory: bool
) -> DataLoader:
    """The DataLoader of `split`: shuffled by (seed, epoch) for training, in order otherwise."""
    return make_loader(
        parts.splits[split],
        parts.collate,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        shuffle=train,
        seed=cfg.trainer.seed,
        pin_memory=pin_memory,
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
