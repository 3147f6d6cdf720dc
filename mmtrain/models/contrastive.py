"""`clip_contrastive`: CLIP's own objective, symmetric InfoNCE with a learned temperature;
`siglip_contrastive`: SigLIP's sigmoid pairwise loss with a learned temperature and bias.

Hard-negative texts, when the data pipeline draws them (`data.hard_negatives=K`), arrive in
the batch as `negative_input_ids` and are appended to each image's logits."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mmtrain import distributed, registry
from mmtrain.errors import UserError
from mmtrain.metrics import RetrievalMetrics, ZeroShotClasses
from mmtrain.models.backbone import (
    BackboneSpec,
    PixelNormalize,
    PositionInit,
    build_backbone,
    encode_image,
    encode_text,
)
from mmtrain.models.feature_cache import replay_loss
from mmtrain.models.finetune import Freeze, Lora, UnfreezeLast, prepare_backbone, tower_depths
from mmtrain.models.interface import ModelTraits
from mmtrain.models.objectives import MAX_LOGIT_SCALE, sigmoid_loss


class ContrastiveCLIP(nn.Module):
    """Image and text towers trained so that each image's own caption scores highest: with
    CLIP's InfoNCE (`loss="infonce"`) or SigLIP's pairwise sigmoid loss (`loss="sigmoid"`)."""

    # trainer.accumulate_grad_batches scores every micro-batch against the negatives of all
    # of them (mmtrain.models.feature_cache), not each against its own.
    traits = ModelTraits(
        monitor=("val/recall@1_i2t", "max"),
        metric_names=RetrievalMetrics.NAMES,
        embeds=True,
        accumulates_features=True,
        takes_negatives=True,
    )

    def __init__(
        self,
        clip: nn.Module,
        spec: BackboneSpec,
        loss: str = "infonce",
        finetunes_pretrained_towers: bool = False,
    ):
        super().__init__()
        self.clip = clip  # the dual encoder: a CLIPModel, SiglipModel or VisionTextDualEncoderModel
        self.loss = loss
        # The sigmoid loss learns a bias; a dual encoder of two towers has none of its own: it
        # gets one here (exported beside the head), with SigLIP's initial temperature 10 and
        # bias -10.
        self.register_parameter("logit_bias", None)
        if loss == "sigmoid" and not hasattr(clip, "logit_bias"):
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
            with torch.no_grad():
                clip.logit_scale.fill_(math.log(10.0))
        self.finetunes_pretrained_towers = finetunes_pretrained_towers
        self.normalize = PixelNormalize(spec)
        # DDP: every parameter gets a gradient each step, except SigLIP's bias under InfoNCE.
        self.has_unused_parameters = loss != "sigmoid" and hasattr(clip, "logit_bias")

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of uint8 images."""
        return F.normalize(encode_image(self.clip, self.normalize(images))[1].float(), dim=-1)

    def embed_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings."""
        return F.normalize(encode_text(self.clip, input_ids, attention_mask)[1].float(), dim=-1)

    def embed(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """The batch's embeddings the loss is computed from: image, text (and negatives)."""
        embeds = {
            "image": self.embed_images(images),
            "text": self.embed_texts(input_ids, attention_mask),
        }
        if negative_input_ids is not None:
            embeds["negatives"] = self.embed_texts(negative_input_ids, negative_attention_mask)
        return embeds

    def loss_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters the loss itself uses: the temperature (and SigLIP's bias)."""
        parameters = {"logit_scale": self.clip.logit_scale}
        if self.loss == "sigmoid":
            parameters["logit_bias"] = self.bias()
        return parameters

    def bias(self) -> nn.Parameter:
        """The sigmoid loss's learned bias: the backbone's (SigLIP), else this model's."""
        return self.logit_bias if self.logit_bias is not None else self.clip.logit_bias

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        paired: torch.Tensor | None = None,
        negative_input_ids: torch.Tensor | None = None,
        negative_attention_mask: torch.Tensor | None = None,
        cached_grads: dict[str, torch.Tensor] | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        """The loss over the batch's genuine pairs (`paired`), with embeddings and similarity
        scores of every row. With `cached_grads` (feature-cached accumulation), the loss is
        a surrogate whose gradient is the whole accumulated batch's."""
        embeds = self.embed(
            images, input_ids, attention_mask, negative_input_ids, negative_attention_mask
        )
        if cached_grads is not None:
            return {"loss": replay_loss(embeds, cached_grads, self.loss_parameters())}
        image, text = embeds["image"], embeds["text"]
        return {
            "loss": self.objective(embeds, paired),
            "image_embeds": image,
            "text_embeds": text,
            "similarity": (image * text).sum(-1),
        }

    def objective(
        self, embeds: dict[str, torch.Tensor], paired: torch.Tensor | None
    ) -> torch.Tensor:
        """The contrastive loss of a batch's embeddings (see `embed`); `paired` marks the rows
        whose text truly describes the image."""
        image, text = embeds["image"], embeds["text"]
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
        log_scale = self.clip.logit_scale
        if self.loss == "infonce":
            log_scale = log_scale.clamp(max=MAX_LOGIT_SCALE)
        scale = log_scale.exp()
        image_to_text = scale * image[keep] @ all_texts[all_keep].T
        extra = None
        if "negatives" in embeds:
            negatives = embeds["negatives"].view(len(image), -1, image.shape[-1])  # [B, K, D]
            extra = (scale * torch.einsum("bd,bkd->bk", image, negatives))[keep]
        if self.loss == "sigmoid":
            return sigmoid_loss(image_to_text, targets, self.bias(), extra)
        text_to_image = scale * text[keep] @ all_images[all_keep].T
        if extra is not None:
            image_to_text = torch.cat([image_to_text, extra], dim=1)
        return (
            F.cross_entropy(image_to_text, targets) + F.cross_entropy(text_to_image, targets)
        ) / 2

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The towers (scaled by optimizer.backbone_lr_scale); the temperature and bias are not."""
        loss_parameters = {id(p) for p in self.loss_parameters().values()}
        return [p for p in self.clip.parameters() if id(p) not in loss_parameters]

    def layer_depths(self) -> dict[int, tuple[int, int]]:
        """{id(param): (layer id, layers)} of the towers (for optimizer.layer_decay)."""
        return tower_depths(self.clip)

    def metrics(
        self, device: torch.device, zeroshot: ZeroShotClasses | None = None
    ) -> RetrievalMetrics:
        """Streaming recall@1/5 in both directions and the loss (names: RetrievalMetrics.NAMES),
        with zero-shot top-1/top-5 against `zeroshot`'s classes when given."""
        return RetrievalMetrics(device, zeroshot)


def _dual_encoder(
    tokenizer: Any,
    spec: BackboneSpec,
    loss: str,
    backbone: str | None,
    backbone_config: dict[str, Any] | None,
    position_init: PositionInit,
    freeze: Freeze,
    unfreeze_last_layers: UnfreezeLast,
    gradient_checkpointing: bool,
    lora: Lora | None,
) -> ContrastiveCLIP:
    clip = build_backbone(
        backbone, backbone_config, tokenizer, position_init, spec.trust_remote_code
    )
    if loss == "sigmoid" and clip.config.model_type == "clip":
        raise UserError(
            f"model=siglip_contrastive needs a SigLIP backbone or a dual encoder of two towers "
            f"(it learns a logit bias), "
            f"but the backbone is a {clip.config.model_type!r} model; use model=clip_contrastive "
            "for it, or a SigLIP model.backbone (or model.backbone_config.model_type=siglip)."
        )
    clip = prepare_backbone(clip, freeze, unfreeze_last_layers, gradient_checkpointing, lora)
    finetunes = backbone is not None and not (lora is not None and lora.on)
    return ContrastiveCLIP(clip, spec, loss, finetunes)


@registry.register("model", "clip_contrastive", traits=ContrastiveCLIP.traits)
def clip_contrastive(
    *,
    tokenizer: Any,
    spec: BackboneSpec,
    backbone: str | None = None,
    backbone_config: dict[str, Any] | None = None,
    position_init: PositionInit = "sincos",
    freeze: Freeze = "none",
    unfreeze_last_layers: UnfreezeLast = None,
    gradient_checkpointing: bool = False,
    lora: Lora | None = None,
) -> ContrastiveCLIP:
    """A dual encoder trained with symmetric InfoNCE over the batch (hard negatives from the
    data)."""
    return _dual_encoder(
        tokenizer, spec, "infonce", backbone, backbone_config, position_init,
        freeze, unfreeze_last_layers, gradient_checkpointing, lora,
    )  # fmt: skip


@registry.register("model", "siglip_contrastive", traits=ContrastiveCLIP.traits)
def siglip_contrastive(
    *,
    tokenizer: Any,
    spec: BackboneSpec,
    backbone: str | None = None,
    backbone_config: dict[str, Any] | None = None,
    position_init: PositionInit = "sincos",
    freeze: Freeze = "none",
    unfreeze_last_layers: UnfreezeLast = None,
    gradient_checkpointing: bool = False,
    lora: Lora | None = None,
) -> ContrastiveCLIP:
    """A SigLIP dual encoder trained with the sigmoid pairwise loss (Zhai et al., 2023): every
    image-text pair of the batch is a binary decision, with a learned temperature and bias."""
    return _dual_encoder(
        tokenizer, spec, "sigmoid", backbone, backbone_config, position_init,
        freeze, unfreeze_last_layers, gradient_checkpointing, lora,
    )  # fmt: skip
