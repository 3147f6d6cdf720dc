"""What every model provides: the contract the loop, evaluation and zero-shot rely on.

A model is registered with its `ModelTraits`, the facts known before it is built (which
metric picks its best checkpoint, what validation reports, what else it can do):

    @register("model", "clip_fusion", traits=ImageTextClassifier.traits)
    def clip_fusion(*, tokenizer, spec, ...) -> ImageTextClassifier: ...

and the module it builds follows `Model` (every model), `EmbeddingModel` (with
`traits.embeds`: it embeds images and texts into one space, so retrieval, zero-shot
classification and predict's embeddings apply) and `FeatureCachingModel` (with
`traits.accumulates_features`: gradient accumulation scores every micro-batch against the
whole batch's negatives, `mmtrain.models.feature_cache`). Nothing probes a model for
methods: the traits say which contract it keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from mmtrain.metrics import ZeroShotClasses


@dataclass(frozen=True)
class ModelTraits:
    """What a model is, known from its registration alone."""

    monitor: tuple[str, str]  # the validation metric that picks best.pt, and "max" or "min"
    metric_names: tuple[str, ...]  # what validation reports, as val/NAME
    embeds: bool = False  # an EmbeddingModel
    accumulates_features: bool = False  # a FeatureCachingModel
    takes_negatives: bool = False  # forward takes negative_input_ids (data.hard_negatives)


@runtime_checkable
class Metrics(Protocol):
    """Streaming validation metrics: `update` per batch, `compute` once."""

    def update(self, output: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None: ...

    def compute(self) -> dict[str, float]: ...


@runtime_checkable
class Model(Protocol):
    """Every model: an nn.Module whose forward takes a batch (uint8 `images`, `input_ids`,
    `attention_mask`, and with labels `labels`/`paired`) and returns a dict with `loss`
    (when the batch has what the loss needs) and its outputs."""

    traits: ClassVar[ModelTraits]
    clip: nn.Module  # the transformers dual encoder (CLIPModel, SiglipModel): what export saves
    # DDP must look for parameters that get no gradient in some steps.
    has_unused_parameters: bool
    # Pretrained towers that train themselves (optimizer.backbone_lr_scale=auto scales them).
    finetunes_pretrained_towers: bool

    def __call__(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def metrics(self, device: torch.device, zeroshot: ZeroShotClasses | None = None) -> Metrics:
        """A fresh set of validation metrics (names: traits.metric_names)."""
        ...

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The towers' parameters (scaled by optimizer.backbone_lr_scale)."""
        ...

    def layer_depths(self) -> dict[int, tuple[int, int]]:
        """{id(param): (layer id, layers)} of the towers (optimizer.layer_decay)."""
        ...


@runtime_checkable
class EmbeddingModel(Model, Protocol):
    """A model that embeds images and texts into one space (L2-normalised); its forward
    also returns `image_embeds`, `text_embeds` and their `similarity`."""

    def embed_images(self, images: torch.Tensor) -> torch.Tensor: ...

    def embed_texts(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor: ...


@runtime_checkable
class FeatureCachingModel(EmbeddingModel, Protocol):
    """An embedding model whose loss is computed from a whole batch's embeddings, so that
    accumulated micro-batches share negatives (GradCache)."""

    def embed(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The embeddings the loss is computed from."""
        ...

    def objective(
        self, embeds: dict[str, torch.Tensor], paired: torch.Tensor | None
    ) -> torch.Tensor:
        """The loss of a batch's embeddings."""
        ...

    def loss_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the loss itself uses (the temperature, a bias)."""
        ...
