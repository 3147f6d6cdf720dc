"""`clip_contrastive`: CLIP's own objective, symmetric InfoNCE with a learned temperature.

Hard-negative texts, when the data pipeline draws them (`data.hard_negatives=K`), arrive in
the batch as `negative_input_ids` and are appended to each image's logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mmtrain import distributed, registry
from mmtrain.metrics import RetrievalMetrics, ZeroShotClasses
from mmtrain.models.backbone import BackboneSpec, PixelNormalize, build_clip, freeze_towers
from mmtrain.models.objectives import MAX_LOGIT_SCALE


class ContrastiveCLIP(nn.Module):
    """Image and text towers trained so that each image's own caption scores highest."""

    monitor = ("val/recall@1_i2t", "max")
    metric_names = RetrievalMetrics.NAMES  # what validation reports, as val/NAME
    has_unused_parameters = False  # DDP: every parameter gets a gradient each step

    def __init__(self, clip: nn.Module, spec: BackboneSpec):
        super().__init__()
        self.clip = clip
        self.normalize = PixelNormalize(spec)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of uint8 images."""
        pooled = self.clip.vision_model(pixel_values=self.normalize(images)).pooler_output
        return F.normalize(self.clip.visual_projection(pooled).float(), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings."""
        pooled = self.clip.text_model(
            input_ids=input_ids, attention_mask=attention_mask
        ).pooler_output
        return F.normalize(self.clip.text_projection(pooled).float(), dim=-1)

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        paired: torch.Tensor | None = None,
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """The loss over the batch's genuine pairs (`paired`), with embeddings and similarity
        scores of every row."""
        image = self.embed_images(images)
        text = self.embed_texts(input_ids, attention_mask)
        scale = self.clip.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        if paired is None:
            paired = torch.ones(len(image), dtype=torch.bool, device=image.device)
        keep = paired.bool()
        # Under DDP every rank scores its images against the texts of the whole global batch
        # (and its texts against all images); gradients flow back through the gather.
        # (Validation batches differ in size between ranks: there each rank scores its own.)
        gather = distributed.gather if self.training else (lambda tensor: tensor)
        all_images, all_texts = gather(image), gather(text)
        all_keep = gather(keep.to(torch.uint8)).bool()
        offset = distributed.rank() * len(image) if self.training else 0
        own = offset + torch.arange(len(image), device=image.device)
        targets = (all_keep.cumsum(0) - 1)[own][keep]  # own text's column among kept texts
        image_to_text = scale * image[keep] @ all_texts[all_keep].T
        text_to_image = scale * text[keep] @ all_images[all_keep].T
        if negative_input_ids is not None:
            negatives = self.embed_texts(negative_input_ids, negative_attention_mask)
            negatives = negatives.view(len(image), -1, negatives.shape[-1])  # [B, K, D]
            extra = scale * torch.einsum("bd,bkd->bk", image, negatives)
            image_to_text = torch.cat([image_to_text, extra[keep]], dim=1)
        loss = (
            F.cross_entropy(image_to_text, targets) + F.cross_entropy(text_to_image, targets)
        ) / 2
        return {
            "loss": loss,
            "image_embeds": image,
            "text_embeds": text,
            "similarity": (image * text).sum(-1),
        }

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The CLIP towers (scaled by optimizer.backbone_lr_scale); the temperature is not."""
        return [p for name, p in self.clip.named_parameters() if name != "logit_scale"]

    def metrics(
        self, device: torch.device, zeroshot: ZeroShotClasses | None = None
    ) -> RetrievalMetrics:
        """Streaming recall@1/5 in both directions and the loss (names: RetrievalMetrics.NAMES),
        with zero-shot top-1/top-5 against `zeroshot`'s classes when given."""
        return RetrievalMetrics(device, zeroshot)


@registry.register("model", "clip_contrastive")
def clip_contrastive(
    *,
    tokenizer: Any,
    spec: BackboneSpec,
    backbone: str | None = None,
    backbone_config: dict[str, Any] | None = None,
    position_init: str = "sincos",
    freeze: str = "none",
) -> ContrastiveCLIP:
    """CLIP trained with symmetric InfoNCE over the batch (hard negatives from the data)."""
    clip = build_clip(backbone, backbone_config, tokenizer, position_init)
    freeze_towers(clip, freeze)
    return ContrastiveCLIP(clip, spec)
