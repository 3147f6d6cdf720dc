"""`clip_fusion`: CLIP towers, a registered fusion and a classifier head, with its loss.

Model and loss live in one module (its forward returns a dict with `loss`), so the
training loop, DDP and torch.compile wrap both at once.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import nn
from torch.nn import functional as F

from mmtrain import registry
from mmtrain.errors import UserError
from mmtrain.metrics import ClassificationMetrics
from mmtrain.models.backbone import (
    BackboneSpec,
    PixelNormalize,
    PositionInit,
    build_backbone,
    encode_image,
    encode_text,
    widths,
)
from mmtrain.models.finetune import Freeze, Lora, UnfreezeLast, prepare_backbone, tower_depths
from mmtrain.models.fusion import Features
from mmtrain.models.interface import ModelTraits
from mmtrain.models.objectives import contrastive_loss
from mmtrain.rules import Bounds


class ImageTextClassifier(nn.Module):
    """Classify (image, text) pairs from fused CLIP features with cross-entropy.

    With `contrastive_weight` > 0 the pooled image and text embeddings are also aligned
    with CLIP's contrastive loss over the batch's genuine pairs ("align before fuse", as in
    ALBEF): a from-scratch model then learns which words go with which pixels long before
    the fused classifier alone would find it.
    """

    traits = ModelTraits(monitor=("val/accuracy", "max"), metric_names=ClassificationMetrics.NAMES)

    def __init__(
        self,
        clip: nn.Module,
        fusion: nn.Module,
        num_classes: int,
        head_hidden: int,
        dropout: float,
        contrastive_weight: float,
        spec: BackboneSpec,
        finetunes_pretrained_towers: bool = False,
        positive_class: int | None = None,
    ):
        super().__init__()
        self.clip = clip
        # The class binary F1/precision/recall/AUROC score (mmtrain.metrics.positive_class).
        self.positive_class = 1 if positive_class is None else positive_class
        self.finetunes_pretrained_towers = finetunes_pretrained_towers
        self.fusion = fusion
        self.num_classes = num_classes
        self.contrastive_weight = contrastive_weight
        # Without the contrastive term, the temperature (and, for token-level fusions, the
        # projections) get no gradient: DDP must then look for unused parameters.
        # SigLIP's learned bias is never used here.
        self.has_unused_parameters = contrastive_weight == 0 or hasattr(clip, "logit_bias")
        self.head = nn.Sequential(
            nn.LayerNorm(fusion.out_dim),
            nn.Linear(fusion.out_dim, head_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(head_hidden, num_classes),
        )
        self.normalize = PixelNormalize(spec)

    def features(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> Features:
        """Run both towers once, keeping token states and projected pooled embeddings."""
        image_tokens, image_embed = encode_image(self.clip, self.normalize(images))
        text_tokens, text_embed = encode_text(self.clip, input_ids, attention_mask)
        return Features(image_tokens, image_embed, text_tokens, text_embed, attention_mask)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        paired: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """Logits, and with `labels` the loss; `paired` marks rows whose text truly
        describes the image (the rows the contrastive term aligns). With the contrastive
        term, also the loss's parts, detached, for the log: `loss_ce` and
        `loss_contrastive` (0 for a batch with no genuine pair), loss = ce + weight x it."""
        features = self.features(images, input_ids, attention_mask)
        logits = self.head(self.fusion(features))
        output = {"logits": logits}
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels)
            keep = (
                paired.bool() if paired is not None else torch.ones_like(labels, dtype=torch.bool)
            )
            if self.contrastive_weight:
                output["loss_ce"] = loss.detach()
                output["loss_contrastive"] = torch.zeros_like(output["loss_ce"])
            if self.contrastive_weight and keep.any():  # a batch may hold no genuine pair
                aligned = contrastive_loss(
                    features.image_embed[keep], features.text_embed[keep], self.clip.logit_scale
                )
                loss = loss + self.contrastive_weight * aligned
                output["loss_contrastive"] = aligned.detach()
            output["loss"] = loss
        return output

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The CLIP towers' parameters (scaled by optimizer.backbone_lr_scale)."""
        return list(self.clip.parameters())

    def layer_depths(self) -> dict[int, tuple[int, int]]:
        """{id(param): (layer id, layers)} of the towers (for optimizer.layer_decay)."""
        return tower_depths(self.clip)

    def metrics(self, device: torch.device, zeroshot: None = None) -> ClassificationMetrics:
        """A fresh set of streaming validation metrics (names: ClassificationMetrics.NAMES)."""
        return ClassificationMetrics(self.num_classes, device, self.positive_class)


@registry.register("model", "clip_fusion", traits=ImageTextClassifier.traits)
def clip_fusion(
    *,
    tokenizer: Any,
    spec: BackboneSpec,
    backbone: str | None = None,
    backbone_config: dict[str, Any] | None = None,
    fusion: str = "cross_attention_concat",
    fusion_layers: Annotated[int, Bounds(ge=1)] = 1,
    fusion_heads: Annotated[int, Bounds(ge=1)] = 4,
    fusion_difference: bool = False,
    num_classes: int | None = None,
    head_hidden: Annotated[int, Bounds(ge=1)] = 256,
    dropout: Annotated[float, Bounds(ge=0, lt=1)] = 0.1,
    contrastive_weight: Annotated[float, Bounds(ge=0)] = 0.5,
    position_init: PositionInit = "sincos",
    freeze: Freeze = "none",
    unfreeze_last_layers: UnfreezeLast = None,
    gradient_checkpointing: bool = False,
    lora: Lora | None = None,
    positive_class: int | None = None,
) -> ImageTextClassifier:
    """A CLIP classifier on `fusion` of image and text features; the head's input size is
    the fusion's `out_dim`. `positive_class` (supplied by mmtrain from data.positive_label
    and the labels) is the class its binary metrics score."""
    if num_classes is None or num_classes < 2:  # null in the config: the data's classes
        raise UserError(f"model.num_classes must be at least 2 (got {num_classes}).")
    clip = build_backbone(
        backbone, backbone_config, tokenizer, position_init, spec.trust_remote_code
    )
    offered = {
        **widths(clip),
        "layers": fusion_layers,
        "heads": fusion_heads,
        "dropout": dropout,
        "with_difference": fusion_difference,
    }
    fuse = registry.build("fusion", fusion, **registry.accepted("fusion", fusion, offered))
    clip = prepare_backbone(clip, freeze, unfreeze_last_layers, gradient_checkpointing, lora)
    finetunes = backbone is not None and not (lora is not None and lora.on)
    return ImageTextClassifier(
        clip, fuse, num_classes, head_hidden, dropout, contrastive_weight, spec, finetunes,
        positive_class,
    )  # fmt: skip
