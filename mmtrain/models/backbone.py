"""CLIP backbones: loaded with `from_pretrained`, or built from a `CLIPConfig`.

The backbone decides the data's shape: image size, normalisation and the longest text it
can position. `backbone_spec` reads those before any data or weights are loaded, so the data
pipeline is aligned to the model instead of configured twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmtrain.errors import UserError

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel

# The normalisation CLIP was trained with (transformers.image_utils.OPENAI_CLIP_MEAN/STD),
# for backbones built from a config. Importing transformers' image utilities for these six
# numbers would cost `mmtrain validate` two seconds.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """What the data pipeline must produce for this backbone."""

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    max_text_length: int


class PixelNormalize(nn.Module):
    """uint8 images to the backbone's normalised floats, on whatever device the model is:
    the data pipeline hands over uint8 and never normalises on the CPU."""

    def __init__(self, spec: BackboneSpec):
        super().__init__()
        scale = 255.0
        self.register_buffer(
            "mean", torch.tensor(spec.image_mean).view(1, 3, 1, 1) * scale, persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(spec.image_std).view(1, 3, 1, 1) * scale, persistent=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


FREEZE_CHOICES = ("none", "vision", "text", "both")


def _load_error(backbone: str, error: Exception) -> UserError:
    return UserError(
        f"Could not load the backbone model.backbone={backbone!r}: {error}. "
        "The model hub may be unreachable (offline machine) or the name not cached. "
        "Pass a local directory instead: save one where the hub is reachable with "
        "CLIPModel.from_pretrained(NAME).save_pretrained(DIR) and the processor's save_pretrained(DIR), "
        "then run with model.backbone=DIR; or use model.backbone=null to build one from model.backbone_config."
    )


def _check_keys(section: str, given: dict[str, Any], defaults: dict[str, Any]) -> None:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UserError(
            f"Unknown key {unknown[0]!r} in model.backbone_config.{section}. "
            f"Accepted keys: {', '.join(sorted(k for k in defaults if not k.startswith('_')))}."
        )


def _config_from_dict(backbone_config: dict[str, Any]) -> CLIPConfig:
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    options = dict(backbone_config)
    vision = dict(options.pop("vision", {}) or {})
    text = dict(options.pop("text", {}) or {})
    _check_keys("vision", vision, CLIPVisionConfig().to_dict())
    _check_keys("text", text, CLIPTextConfig().to_dict())
    top_level = {"projection_dim", "logit_scale_init_value"}
    unknown = sorted(set(options) - top_level)
    if unknown:
        raise UserError(
            f"Unknown key {unknown[0]!r} in model.backbone_config. "
            f"Accepted keys: text, vision, {', '.join(sorted(top_level))}."
        )
    return CLIPConfig(text_config=text, vision_config=vision, **options)


def backbone_spec(backbone: str | None, backbone_config: dict[str, Any] | None) -> BackboneSpec:
    """Image size, mean/std and text length of the backbone, without loading weights."""
    if backbone is None:
        config = _config_from_dict(backbone_config or {})
        return BackboneSpec(
            image_size=config.vision_config.image_size,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
            max_text_length=config.text_config.max_position_embeddings,
        )
    from transformers import CLIPConfig, CLIPImageProcessor

    try:
        config = CLIPConfig.from_pretrained(backbone)
        processor = CLIPImageProcessor.from_pretrained(backbone)
    except (OSError, ValueError) as error:
        raise _load_error(backbone, error) from None
    crop = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    size = crop.get("height") or crop.get("shortest_edge") or config.vision_config.image_size
    return BackboneSpec(
        image_size=int(size),
        image_mean=tuple(processor.image_mean),
        image_std=tuple(processor.image_std),
        max_text_length=config.text_config.max_position_embeddings,
    )


def load_tokenizer(backbone: str) -> Any:
    """The pretrained backbone's own tokenizer, from the same name or directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(backbone)
    except (OSError, ValueError) as error:
        raise _load_error(backbone, error) from None


def init_sincos_positions(clip: CLIPModel) -> None:
    """Set the vision tower's position embeddings to a 2D sine-cosine grid (still trainable).

    Learned position embeddings start as small noise, and a ViT trained from scratch on a
    few thousand images then barely learns where things are (on `shapes`, a from-scratch
    tower stayed at chance telling left from right). A fixed 2D grid, as in MAE and MoCo v3,
    gives every patch its place from the first step.
    """
    embeddings = clip.vision_model.embeddings
    grid = int(math.isqrt(embeddings.num_patches))
    dim = embeddings.embed_dim
    quarter = dim // 4
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    angles = [axis.flatten().float()[:, None] * omega for axis in (xs, ys)]
    table = torch.zeros(embeddings.num_patches + 1, dim)  # row 0 is the class token
    table[1:, : 4 * quarter] = torch.cat(
        [f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1
    )
    with torch.no_grad():
        embeddings.position_embedding.weight.copy_(table)


def build_clip(
    backbone: str | None,
    backbone_config: dict[str, Any] | None,
    tokenizer: Any,
    position_init: str = "sincos",
) -> CLIPModel:
    """A CLIPModel: pretrained weights, or random weights from `backbone_config`.

    A backbone built from a config takes its vocabulary size and special-token ids from the
    tokenizer, so the text tower pools at the tokenizer's end-of-text token, and (with
    `position_init="sincos"`) 2D sine-cosine vision position embeddings.
    """
    from transformers import CLIPModel

    if backbone is not None:
        try:
            return CLIPModel.from_pretrained(backbone, attn_implementation="sdpa")
        except (OSError, ValueError) as error:
            raise _load_error(backbone, error) from None
    config = _config_from_dict(backbone_config or {})
    text = config.text_config
    text.vocab_size = len(tokenizer)
    text.pad_token_id = tokenizer.pad_token_id
    text.bos_token_id = tokenizer.bos_token_id
    text.eos_token_id = tokenizer.eos_token_id
    if position_init not in ("sincos", "random"):
        raise UserError(f"model.position_init={position_init!r} is not one of: sincos, random.")
    clip = CLIPModel._from_config(config, attn_implementation="sdpa")
    if position_init == "sincos":
        init_sincos_positions(clip)
    return clip


def freeze_towers(clip: nn.Module, freeze: str) -> None:
    """Stop gradients through the vision tower, the text tower, both, or neither."""
    if freeze not in FREEZE_CHOICES:
        raise UserError(f"model.freeze={freeze!r} is not one of {', '.join(FREEZE_CHOICES)}.")
    towers = {
        "vision": [clip.vision_model, clip.visual_projection],
        "text": [clip.text_model, clip.text_projection],
    }
    for side in ("vision", "text"):
        if freeze in (side, "both"):
            for module in towers[side]:
                module.requires_grad_(False)
