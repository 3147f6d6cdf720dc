"""A training run as the loop receives it: the flat set of objects `mmtrain.assemble` builds
from a spec and `mmtrain.loop.train_loop` steps. The loop reads these fields and nothing
else; it never builds anything itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mmtrain import distributed
from mmtrain.data.loader import close_workers
from mmtrain.evaluation import fresh_metrics
from mmtrain.models.interface import Metrics, Model, ModelTraits
from mmtrain.models.zeroshot import ZeroShotTask
from mmtrain.spec import TrainerConfig
from mmtrain.watch import ChanceWatch


@dataclass
class Run:
    """Everything the training loop steps, built and on its device (`mmtrain.assemble`)."""

    trainer: TrainerConfig
    device: torch.device
    precision: str
    model: Model  # the plain module: evaluated, saved and restored
    traits: ModelTraits
    step_model: nn.Module  # what a training step calls: DDP across ranks, compiled if asked
    autocast: Callable[[], Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train_loader: DataLoader
    val_loader: DataLoader
    batch_size: int  # per process and micro-batch
    # Applied on the training device to each training batch: (batch, key) -> batch with
    # key = (step, micro-batch, rank); deterministic in (seed, key).
    augment: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]]
    zeroshot: ZeroShotTask | None  # zero-shot classification of the val split
    steps_per_epoch: int
    max_steps: int
    monitor: str  # the validation metric that picks best.pt and early stopping
    mode: str  # max | min
    watch: ChanceWatch  # hints once when validation stays at chance
    # summary.json's bad_samples, asked at the end: streamed splits count theirs while training.
    bad_samples: Callable[[], dict[str, Any]]
    # zeroshot.reference: (name, batches, task) of each labelled set scored zero-shot too.
    references: list[tuple[str, DataLoader, ZeroShotTask]] = field(default_factory=list)

    def close(self) -> None:
        """End the loaders' worker processes (the run is over, however it ended)."""
        close_workers(self.train_loader)
        close_workers(self.val_loader)
        for _, batches, _ in self.references:
            close_workers(batches)

    def in_force(self) -> dict[str, Any]:
        """The values this run uses where the config says `auto` or leaves them to the run,
        keyed like the config: what trackers record beside the config as written."""
        rates = [group.get("initial_lr", group["lr"]) for group in self.optimizer.param_groups]
        world = distributed.world_size()
        return {
            # The head's rate, and every group's when they differ (backbone_lr_scale, layer_decay).
            "optimizer": {
                "lr": max(rates),
                **({"lr_groups": rates} if len(set(rates)) > 1 else {}),
            },
            "trainer": {
                "device": str(self.device),
                "precision": self.precision,
                "world_size": world,
                "samples_per_step": self.batch_size * self.trainer.accumulate_grad_batches * world,
                "total_steps": self.max_steps,
                "steps_per_epoch": self.steps_per_epoch,
            },
        }

    def val_metrics(self) -> Metrics:
        """A fresh set of the model's validation metrics (`evaluation.fresh_metrics`)."""
        return fresh_metrics(self.model, self.device, self.zeroshot)
