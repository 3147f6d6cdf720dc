"""Dual-encoder backbones (CLIP, SigLIP, transformers' VisionTextDualEncoderModel of any two
towers): loaded with `from_pretrained`, or built from a config.

The backbone decides the data's shape: image size, normalisation, the longest text it can
position and how text is padded. `backbone_spec` reads those from the model's own config
and processor before any weights are loaded, so the data pipeline is aligned to the model
instead of configured twice.

Everything here is generic over the families in `FAMILIES`: each is a `transformers` model
with `vision_model` and `text_model` towers (pooled outputs, optional projections), a
learned `logit_scale` and, for SigLIP, a `logit_bias`. `mmtrain.models.towers` builds and
checks the towers of a VisionTextDualEncoderModel.
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mmtrain.errors import UserError
from mmtrain.models import towers

log = logging.getLogger("mmtrain")

# The normalisation CLIP was trained with (transformers.image_utils.OPENAI_CLIP_MEAN/STD),
# for backbones built from a config. Importing transformers' image utilities for these six
# numbers would cost `mmtrain validate` two seconds.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)  # transformers.image_utils' (ConvNeXt, Swin)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Family:
    """How one dual-encoder family of `transformers` is built, fed and read."""

    model_class: str  # transformers class names
    config_class: str
    text_config_class: str
    vision_config_class: str
    image_processor_class: str
    image_mean: tuple[float, float, float]  # for backbones built from a config
    image_std: tuple[float, float, float]
    # SigLIP pools the text at the last position and was trained on text padded to its full
    # length without an attention mask; CLIP pools at the end-of-text token of padded text.
    pad_to_max_length: bool
    text_attention_mask: bool
    top_level_keys: tuple[str, ...]  # model.backbone_config keys besides text and vision


FAMILIES = {
    "clip": Family(
        "CLIPModel", "CLIPConfig", "CLIPTextConfig", "CLIPVisionConfig", "CLIPImageProcessor", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
        pad_to_max_length=False, text_attention_mask=True,
        top_level_keys=("projection_dim", "logit_scale_init_value"),
    ),
    "siglip": Family(
        "SiglipModel", "SiglipConfig", "SiglipTextConfig", "SiglipVisionConfig",
        "SiglipImageProcessor", (0.5,) * 3, (0.5,) * 3,
        pad_to_max_length=True, text_attention_mask=False, top_level_keys=(),
    ),
    # Any image tower with any text tower (config_class in model.backbone_config.vision or
    # .text names them; CLIP's towers by default). Exported with a plain resize-and-normalise
    # processor of the run's geometry.
    towers.DUAL: Family(
        "VisionTextDualEncoderModel", "VisionTextDualEncoderConfig", "CLIPTextConfig",
        "CLIPVisionConfig", "ViTImageProcessor", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
        pad_to_max_length=False, text_attention_mask=True,
        top_level_keys=("projection_dim", "logit_scale_init_value"),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class BackboneSpec:
    """What the data pipeline must produce for this backbone."""

    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    max_text_length: int
    pad_to_max_length: bool = False  # pad every text to max_text_length (SigLIP)
    family: str = "clip"
    vocab_size: int | None = None  # a pretrained text tower's: a tokenizer must fit in it
    trust_remote_code: bool = False  # model.trust_remote_code: its loads may run its code

    def text_length(self, wanted: int | None) -> int:
        """`wanted` text positions (data.max_text_length; null: the backbone's), capped at
        the backbone's with a warning."""
        if wanted is None:
            return self.max_text_length
        if wanted > self.max_text_length:
            log.warning(
                "data.max_text_length=%d exceeds the backbone's %d text positions; using %d.",
                wanted, self.max_text_length, self.max_text_length,
            )  # fmt: skip
            return self.max_text_length
        return wanted


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


# Keys every dual-encoder model takes; their rules, declared once for every factory.
PositionInit = Literal["sincos", "random"]


def _transformers(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def _load_error(backbone: str, error: Exception) -> UserError:
    if "custom code" in str(error) or "trust_remote_code" in str(error):
        return UserError(
            f"model.backbone={backbone!r} names code of its own to run (auto_map in its "
            "config), which mmtrain never runs unless you opt in: set "
            "model.trust_remote_code=true only for a folder from a source you trust."
        )
    return UserError(
        f"Could not load the backbone model.backbone={backbone!r}: {error}. "
        "The model hub may be unreachable (offline machine) or the name not cached. "
        "Pass a local directory instead: save one where the hub is reachable with "
        "AutoModel.from_pretrained(NAME).save_pretrained(DIR) and AutoProcessor.from_pretrained(NAME).save_pretrained(DIR), "
        "then run with model.backbone=DIR; or use model.backbone=null to build one from model.backbone_config."
    )


def _family(model_type: str, where: str) -> Family:
    if model_type not in FAMILIES:
        raise UserError(
            f"{where} is a {model_type!r} model; mmtrain trains the dual encoders "
            f"{', '.join(FAMILIES)} (transformers CLIPModel, SiglipModel, "
            "VisionTextDualEncoderModel)."
        )
    return FAMILIES[model_type]


def _config_from_dict(backbone_config: dict[str, Any]) -> Any:
    """A CLIPConfig, SiglipConfig or VisionTextDualEncoderConfig (`model_type`, default clip;
    a tower's `config_class` makes it a VisionTextDualEncoderConfig) from model.backbone_config."""
    options = dict(backbone_config)
    model_type = options.pop("model_type", None)
    if towers.names_tower_classes(options):  # CLIP's and SigLIP's configs build their own towers
        if model_type not in (None, "clip", towers.DUAL):
            raise UserError(
                f"model.backbone_config names a tower's config_class, which builds a "
                f"VisionTextDualEncoderModel, but its model_type is {model_type!r}; set "
                f"model.backbone_config.model_type={towers.DUAL} (every contrastive loss trains it)."
            )
        model_type = towers.DUAL
    model_type = model_type or "clip"
    family = _family(model_type, f"model.backbone_config.model_type={model_type!r}")
    if model_type == towers.DUAL:
        return towers.dual_config(options, family.top_level_keys)
    config_class = _transformers(family.config_class)
    vision = dict(options.pop("vision", {}) or {})
    text = dict(options.pop("text", {}) or {})
    towers.check_keys("vision", vision, _transformers(family.vision_config_class)().to_dict())
    towers.check_keys("text", text, _transformers(family.text_config_class)().to_dict())
    unknown = sorted(set(options) - set(family.top_level_keys))
    if unknown:
        raise UserError(
            f"Unknown key {unknown[0]!r} in model.backbone_config. "
            f"Accepted keys: {', '.join(('model_type', 'text', 'vision', *family.top_level_keys))}."
        )
    if model_type == "siglip":  # the text head projects into the image embedding's space
        text.setdefault("projection_size", vision.get("hidden_size", 768))
    return config_class(text_config=text, vision_config=vision, **options)


def _pretrained_config(backbone: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(backbone, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error(backbone, error) from None
    _family(config.model_type, f"model.backbone={backbone!r}")
    return config


def backbone_spec(
    backbone: str | None, backbone_config: dict[str, Any] | None, trust_remote_code: bool = False
) -> BackboneSpec:
    """Image size, mean/std, text length and padding of the backbone, without loading weights.
    Code a backbone folder names (auto_map) runs only with `trust_remote_code`."""
    if backbone is None:
        config = _config_from_dict(backbone_config or {})
        family = FAMILIES[config.model_type]
        size = config.vision_config.image_size
        return BackboneSpec(
            image_size=size if isinstance(size, int) else int(size[0]),
            image_mean=family.image_mean,
            image_std=family.image_std,
            max_text_length=towers.text_positions(config.text_config),
            pad_to_max_length=family.pad_to_max_length,
            family=config.model_type,
        )
    config = _pretrained_config(backbone, trust_remote_code)
    family = FAMILIES[config.model_type]
    processor_class = family.image_processor_class
    if config.model_type == towers.DUAL:  # whatever processor its image tower came with
        processor_class = "AutoImageProcessor"
    try:
        processor = _transformers(processor_class).from_pretrained(
            backbone, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise _load_error(backbone, error) from None
    crop = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    size = int(crop.get("height") or crop.get("shortest_edge") or config.vision_config.image_size)
    if config.model_type == towers.DUAL:
        towers.check_pretrained(config, size, f"model.backbone={backbone!r}")
    return BackboneSpec(
        image_size=size,
        image_mean=tuple(processor.image_mean),
        image_std=tuple(processor.image_std),
        max_text_length=towers.text_positions(config.text_config),
        pad_to_max_length=family.pad_to_max_length,
        family=config.model_type,
        vocab_size=config.text_config.vocab_size,
        trust_remote_code=trust_remote_code,
    )


def image_processor(spec: BackboneSpec) -> Any:
    """The family's image processor for `spec` (what `mmtrain export` writes)."""
    size = spec.image_size
    processor_class = _transformers(FAMILIES[spec.family].image_processor_class)
    if spec.family == "clip":
        sizes = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
    else:
        sizes = {"size": {"height": size, "width": size}}
    return processor_class(
        image_mean=list(spec.image_mean), image_std=list(spec.image_std), **sizes
    )


def load_tokenizer(backbone: str, trust_remote_code: bool = False) -> Any:
    """The pretrained backbone's own tokenizer, from the same name or directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(backbone, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as error:
        raise _load_error(backbone, error) from None


def init_sincos_positions(model: nn.Module) -> bool:
    """Set the vision tower's position embeddings to a 2D sine-cosine grid (still trainable).

    Learned position embeddings start as small noise, and a ViT trained from scratch on a
    few thousand images then barely learns where things are (on `shapes`, a from-scratch
    tower stayed at chance telling left from right). A fixed 2D grid, as in MAE and MoCo v3,
    gives every patch its place from the first step. False (nothing set) when the vision
    tower is not CLIP's (a convolutional tower has no position table).
    """
    tower = model.vision_model  # a dual encoder's CLIPVisionModel wraps CLIP's tower
    embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
    if not isinstance(getattr(embeddings, "position_embedding", None), nn.Embedding):
        return False
    grid = int(math.isqrt(embeddings.num_patches))
    table_rows = embeddings.position_embedding.weight.shape[0]  # CLIP adds a class token
    first = table_rows - embeddings.num_patches
    dim = embeddings.embed_dim
    quarter = dim // 4
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    angles = [axis.flatten().float()[:, None] * omega for axis in (xs, ys)]
    table = torch.zeros(table_rows, dim)
    table[first:, : 4 * quarter] = torch.cat(
        [f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1
    )
    with torch.no_grad():
        embeddings.position_embedding.weight.copy_(table)
    return True


def build_backbone(
    backbone: str | None,
    backbone_config: dict[str, Any] | None,
    tokenizer: Any,
    position_init: PositionInit = "sincos",
    trust_remote_code: bool = False,
) -> nn.Module:
    """A CLIPModel, SiglipModel or VisionTextDualEncoderModel: pretrained weights, or random
    weights from `backbone_config`.

    A backbone built from a config takes its vocabulary size and special-token ids from the
    tokenizer, so the text tower pools at the tokenizer's end-of-text token, and (with
    `position_init="sincos"`) 2D sine-cosine vision position embeddings.
    """
    if backbone is not None:
        config = _pretrained_config(backbone, trust_remote_code)
        family = FAMILIES[config.model_type]
        if config.model_type == towers.DUAL:  # with the image tower's width checked (flat_width)
            towers.flat_width(config.vision_config, f"model.backbone={backbone!r}'s image tower")
        try:
            return _transformers(family.model_class).from_pretrained(
                backbone, config=config, trust_remote_code=trust_remote_code, **_attention(family)
            )
        except (OSError, ValueError) as error:
            raise _load_error(backbone, error) from None
        except pickle.UnpicklingError:  # torch.load(weights_only=True) refused a .bin
            raise UserError(
                f"Refusing to load the weights of model.backbone={backbone!r}: its .bin file "
                "holds Python objects other than tensors, and unpickling them could run code "
                "(nothing from it was used). Use a backbone from a source you trust, saved as "
                "model.safetensors (save_pretrained writes it)."
            ) from None
    config = _config_from_dict(backbone_config or {})
    text = config.text_config
    text.vocab_size = len(tokenizer)
    text.pad_token_id = tokenizer.pad_token_id
    text.bos_token_id = tokenizer.bos_token_id
    text.eos_token_id = tokenizer.eos_token_id
    family = FAMILIES[config.model_type]
    model = _transformers(family.model_class)._from_config(config, **_attention(family))
    if config.model_type == "siglip":
        with torch.no_grad():  # the paper's initial temperature 10 and bias -10
            model.logit_scale.fill_(math.log(10.0))
            model.logit_bias.fill_(-10.0)
    if position_init == "sincos" and not init_sincos_positions(model):
        log.info(
            "model.position_init=sincos applies to CLIP vision towers; the %s tower keeps its own.",
            config.vision_config.model_type,
        )
    return model


def _attention(family: Family) -> dict[str, str]:
    """PyTorch's fused attention for CLIP and SigLIP; a dual encoder's towers each take their
    own default (a convolutional tower has no attention to choose)."""
    return (
        {}
        if family.model_class == "VisionTextDualEncoderModel"
        else {"attn_implementation": "sdpa"}
    )


def encode_image(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch token states, projected pooled embedding) of normalised images."""
    out = model.vision_model(pixel_values=pixel_values)
    projection = getattr(model, "visual_projection", None)
    pooled, tokens = out.pooler_output, out.last_hidden_state
    if pooled.dim() == 4:  # a ResNet's pooled [B, C, 1, 1] map (towers.UNFLAT_POOLERS)
        pooled = pooled.flatten(1)
    if tokens.dim() == 4:  # a convolutional tower's feature map [B, C, H, W]: H * W tokens
        tokens = tokens.flatten(2).transpose(1, 2)
    return tokens, projection(pooled) if projection is not None else pooled


def encode_text(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(token states, projected pooled embedding) of tokenized text."""
    family = FAMILIES[model.config.model_type]
    mask = attention_mask if family.text_attention_mask else None
    out = model.text_model(input_ids=input_ids, attention_mask=mask)
    projection = getattr(model, "text_projection", None)
    pooled = out.pooler_output
    return out.last_hidden_state, projection(pooled) if projection is not None else pooled


def widths(model: nn.Module) -> dict[str, int]:
    """The towers' token widths and the shared embedding size."""
    config = model.config
    embed = getattr(config, "projection_dim", None) or config.vision_config.hidden_size
    return {
        "image_dim": config.vision_config.hidden_size,
        "text_dim": config.text_config.hidden_size,
        "embed_dim": embed,
    }
