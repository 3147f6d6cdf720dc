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


def sigmoid_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_bias: torch.Tensor,
    negative_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023): each image row of `logits` (scaled
    similarities to every text) is a positive at its `targets` column and a negative
    everywhere else, and so are its `negative_logits` (hard negatives); summed over texts,
    averaged over images."""
    if negative_logits is not None:
        logits = torch.cat([logits, negative_logits], dim=1)
    logits = logits + logit_bias
    labels = -torch.ones_like(logits)
    labels[torch.arange(len(logits), device=logits.device), targets] = 1.0
    return -F.logsigmoid(labels * logits).sum() / len(logits)
