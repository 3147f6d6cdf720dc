"""Fusions: how image and text features become one vector for the classifier head.

A fusion is a registered factory returning a module with an `out_dim` attribute whose
forward takes the `Features` of a batch. Its parameters are chosen from what the model
offers (`FUSION_ARGUMENTS`): the feature sizes, the attention settings
(`model.fusion_layers`, `model.fusion_heads`, `model.dropout`) and `with_difference`
(`model.fusion_difference`). A factory names only those it uses, and receives only those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmtrain.errors import UserError
from mmtrain.registry import register

FUSION_ARGUMENTS = (
    "image_dim", "text_dim", "embed_dim", "layers", "heads", "dropout", "with_difference",
)  # fmt: skip


@dataclass
class Features:
    """A batch through the CLIP towers: token states, and the projected pooled embeddings."""

    image_tokens: torch.Tensor  # [B, patches + 1, vision width]
    image_embed: torch.Tensor  # [B, projection_dim]
    text_tokens: torch.Tensor  # [B, T, text width]
    text_embed: torch.Tensor  # [B, projection_dim]
    text_mask: torch.Tensor  # [B, T], 1 for real tokens


class Concat(nn.Module):
    """The pooled, projected image and text embeddings side by side."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.out_dim = 2 * embed_dim

    def forward(self, features: Features) -> torch.Tensor:
        return torch.cat([features.image_embed, features.text_embed], dim=-1)


class Product(nn.Module):
    """The element-wise product of the pooled, projected image and text embeddings (a
    dot product before its sum), optionally beside their absolute difference."""

    def __init__(self, embed_dim: int, with_difference: bool):
        super().__init__()
        self.with_difference = with_difference
        self.out_dim = (2 if with_difference else 1) * embed_dim

    def forward(self, features: Features) -> torch.Tensor:
        image, text = features.image_embed, features.text_embed
        product = image * text
        if not self.with_difference:
            return product
        return torch.cat([product, (image - text).abs()], dim=-1)


class CrossAttention(nn.Module):
    """Text tokens attend to each other and to the image patches; masked mean over text.

    Pooled features cannot tell "a red circle in the top left" from a red square there
    as well as token-level attention can: each word looks at the patches it describes.
    """

    def __init__(self, image_dim: int, text_dim: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.image_in = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, text_dim))
        layer = nn.TransformerDecoderLayer(
            d_model=text_dim,
            nhead=heads,
            dim_feedforward=4 * text_dim,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers=layers, norm=nn.LayerNorm(text_dim))
        self.out_dim = text_dim

    def forward(self, features: Features) -> torch.Tensor:
        padding = features.text_mask == 0
        fused = self.decoder(
            tgt=features.text_tokens,
            memory=self.image_in(features.image_tokens),
            tgt_key_padding_mask=padding,
        )
        weights = features.text_mask.unsqueeze(-1).to(fused.dtype)
        return (fused * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class CrossAttentionConcat(nn.Module):
    """Cross-attention's pooled output beside concat's features and their agreement.

    The concat features keep a path that pooled-feature training already learns, so adding
    attention cannot take it away; the elementwise product of the unit-length pooled
    embeddings (whose sum is their cosine similarity, the quantity a contrastive term
    aligns) hands the head "does this text describe this image" directly.
    """

    def __init__(
        self, image_dim: int, text_dim: int, embed_dim: int, layers: int, heads: int, dropout: float
    ):
        super().__init__()
        self.attention = CrossAttention(image_dim, text_dim, layers, heads, dropout)
        self.out_dim = text_dim + 3 * embed_dim

    def forward(self, features: Features) -> torch.Tensor:
        image = nn.functional.normalize(features.image_embed, dim=-1)
        text = nn.functional.normalize(features.text_embed, dim=-1)
        pooled = [features.image_embed, features.text_embed, image * text]
        return torch.cat([self.attention(features), *pooled], dim=-1)


def _check_heads(text_dim: int, heads: int) -> None:
    if text_dim % heads:
        raise UserError(
            f"model.fusion_heads={heads} must divide the text width {text_dim} "
            "(model.backbone_config.text.hidden_size)."
        )


@register("fusion", "concat")
def concat(embed_dim: int) -> nn.Module:
    """Pooled projected features concatenated; out_dim = 2 * projection_dim."""
    return Concat(embed_dim)


@register("fusion", "product")
def product(embed_dim: int, with_difference: bool) -> nn.Module:
    """Element-wise product of the projected features (plus |difference| with
    model.fusion_difference=true); out_dim = projection_dim, or twice it."""
    return Product(embed_dim, with_difference)


@register("fusion", "cross_attention")
def cross_attention(
    image_dim: int, text_dim: int, embed_dim: int, layers: int, heads: int, dropout: float
) -> nn.Module:
    """`layers` decoder layers of text-to-image attention with `heads` heads."""
    _check_heads(text_dim, heads)
    return CrossAttention(image_dim, text_dim, layers, heads, dropout)


@register("fusion", "cross_attention_concat")
def cross_attention_concat(
    image_dim: int, text_dim: int, embed_dim: int, layers: int, heads: int, dropout: float
) -> nn.Module:
    """`cross_attention`'s output joined with `concat`'s pooled features and their
    elementwise product (the default: never fewer features than concat)."""
    _check_heads(text_dim, heads)
    return CrossAttentionConcat(image_dim, text_dim, embed_dim, layers, heads, dropout)
