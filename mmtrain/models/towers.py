"""Dual encoders of any two transformers towers (`VisionTextDualEncoderModel`): an image
model (ViT, DeiT, BEiT, DINOv2, Swin, ConvNeXt, ...) and a text model (BERT, RoBERTa, CLIP's
text tower, ...), each with a projection into one shared space.

A from-config tower names its transformers config class (`config_class: ConvNextConfig`,
default CLIP's towers) beside that class's own keys. The checks here run on configs alone,
before any weight is built: a config class transformers does not have, keys the class does
not take, an image tower whose pooled output has no single width, a processor whose image
size the tower cannot take.
"""

from __future__ import annotations

from typing import Any

from mmtrain.errors import UserError
from mmtrain.rules import did_you_mean

DUAL = "vision-text-dual-encoder"  # transformers' model_type of VisionTextDualEncoderModel
TOWER_DEFAULTS = {"vision": "CLIPVisionConfig", "text": "CLIPTextConfig"}
# Image models whose pooled output is a [B, C, 1, 1] map: mmtrain flattens it to [B, C]
# (backbone.encode_image); transformers' own VisionTextDualEncoderModel.get_image_features
# cannot read it (its projection is a Linear over the last axis), which export says.
UNFLAT_POOLERS = ("resnet", "regnet", "bit")
# Text models whose position table starts after the padding id (fairseq's convention).
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")
# Patch transformers that interpolate their position table to any image size.
INTERPOLATING = ("dinov2",)


def check_keys(section: str, given: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a key of model.backbone_config.`section` that its config class does not take."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        accepted = sorted(k for k in defaults if not k.startswith("_"))
        raise UserError(
            f"Unknown key {unknown[0]!r} in model.backbone_config.{section}."
            f"{did_you_mean(unknown[0], accepted)} Accepted keys: {', '.join(accepted)}."
        )


def config_class(name: str, where: str) -> Any:
    """The transformers config class `name` (e.g. ConvNextConfig), or a UserError naming
    the closest one transformers has."""
    import transformers

    found = getattr(transformers, name, None) if name.endswith("Config") else None
    if found is None:
        known = [n for n in dir(transformers) if n.endswith("Config") and n[0].isupper()]
        raise UserError(
            f"{where}={name!r}: transformers has no such config class."
            f"{did_you_mean(name, known)} Name one such as ConvNextConfig, SwinConfig, "
            "ViTConfig (image towers) or BertConfig, CLIPTextConfig (text towers)."
        )
    return found


def tower_config(section: str, options: dict[str, Any] | None) -> Any:
    """The config of one tower of model.backbone_config (`vision` or `text`): its
    `config_class` (default CLIP's tower) with the other keys."""
    options = dict(options or {})
    where = f"model.backbone_config.{section}.config_class"
    config_type = config_class(str(options.pop("config_class", TOWER_DEFAULTS[section])), where)
    defaults = config_type().to_dict()
    if section == "vision":  # the processor's size, kept by a tower that lacks it (ResNet)
        defaults.setdefault("image_size", None)
    check_keys(section, options, defaults)
    config = config_type(**options)
    if section == "vision":
        flat_width(config, f"model.backbone_config.vision ({config_type.__name__})")
    return config


def flat_width(vision_config: Any, where: str) -> None:
    """Make sure the image tower pools to one vector of a known width (`hidden_size`, the
    input of VisionTextDualEncoderModel's projection): a hierarchical or convolutional
    tower's is its last stage's width."""
    if getattr(vision_config, "hidden_size", None) is None:
        sizes = getattr(vision_config, "hidden_sizes", None)
        if not sizes:
            raise UserError(
                f"{where}: the {vision_config.model_type!r} image tower names no output width "
                "(hidden_size or hidden_sizes), which VisionTextDualEncoderModel needs for its "
                "projection."
            )
        vision_config.hidden_size = int(sizes[-1])


def dual_config(options: dict[str, Any], top_level_keys: tuple[str, ...]) -> Any:
    """A VisionTextDualEncoderConfig from model.backbone_config: `vision` and `text` towers of
    any config class, and the top-level keys (projection_dim, logit_scale_init_value)."""
    from transformers import VisionTextDualEncoderConfig

    options = dict(options)
    vision = tower_config("vision", options.pop("vision", None))
    text = tower_config("text", options.pop("text", None))
    unknown = sorted(set(options) - set(top_level_keys))
    if unknown:
        raise UserError(
            f"Unknown key {unknown[0]!r} in model.backbone_config. "
            f"Accepted keys: {', '.join(('model_type', 'text', 'vision', *top_level_keys))}."
        )
    return VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, **options)


def names_tower_classes(options: dict[str, Any]) -> bool:
    """Whether model.backbone_config names a tower's config class (a dual encoder then)."""
    return any("config_class" in (options.get(side) or {}) for side in ("vision", "text"))


def text_positions(text_config: Any) -> int:
    """The longest text the text tower can position."""
    positions = int(text_config.max_position_embeddings)
    if text_config.model_type in OFFSET_POSITIONS:
        positions -= int(text_config.pad_token_id or 0) + 1
    return positions


def check_pretrained(config: Any, image_size: int, where: str) -> None:
    """A pretrained dual encoder's towers against each other and its processor: an image
    tower with one pooled width, a processor image size a patch tower can take."""
    vision = config.vision_config
    flat_width(vision, f"{where}'s image tower")
    patch, trained = getattr(vision, "patch_size", None), getattr(vision, "image_size", None)
    hierarchical = hasattr(vision, "depths")
    if patch and trained and not hierarchical and vision.model_type not in INTERPOLATING:
        trained = trained if isinstance(trained, int) else trained[0]
        if image_size != trained:
            raise UserError(
                f"{where}: its processor makes {image_size} px images, but its {vision.model_type!r} "
                f"image tower was built for {trained} px (vision_config.image_size) and cannot "
                "position other sizes. Save the tower's own image processor with the folder "
                "(AutoImageProcessor.from_pretrained(VISION_NAME).save_pretrained(DIR))."
            )


def check_vocabulary(tokenizer: Any, vocab_size: int | None, where: str) -> None:
    """Refuse a tokenizer with ids the pretrained text tower has no embedding for."""
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise UserError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the text tower embeds "
            f"only {vocab_size}; use the text tower's own tokenizer (save it into the folder "
            "with AutoTokenizer.from_pretrained(TEXT_NAME).save_pretrained(DIR), and leave "
            "model.tokenizer=null)."
        )
