"""Losses shared by the models."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100


def contrastive_loss(
    image_embed: torch.Tensor, text_embed: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of matching (image, text) rows."""
    image = F.normalize(image_embed.float(), dim=-1)
    text = F.normalize(text_embed.float(), dim=-1)
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * image @ text.T
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
