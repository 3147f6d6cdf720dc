"""Fine-tuning levers of a dual-encoder backbone: frozen towers or layers, per-layer
depths (layer-wise learning-rate decay), LoRA adapters (peft), gradient checkpointing, and
the weight averages of WiSE-FT and model soups (`average_weights`).

Generic over `mmtrain.models.backbone.FAMILIES`: towers named `vision_model` and
`text_model` whose blocks are `encoder.layers.N` (CLIP, SigLIP, Swin's stages),
`encoder.layer.N` (BERT), `layers.N` (ViT) or `encoder.stages.N` (ConvNeXt), projections
`visual_projection`/`text_projection`.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import nn

from mmtrain.errors import UserError
from mmtrain.rules import Bounds

log = logging.getLogger("mmtrain")

# Keys every dual-encoder model takes; their rules, declared once for every factory.
Freeze = Literal["none", "vision", "text", "both"]
UnfreezeLast = Annotated[int, Bounds(ge=0)] | None


@dataclass(frozen=True)
class Lora:
    """`model.lora`: LoRA adapters (peft) on the towers' attention projections."""

    r: Annotated[int, Bounds(ge=1)] | None = None  # the adapters' rank; null: no adapters
    alpha: Annotated[float, Bounds(gt=0)] | None = None  # scaling numerator (alpha / r); null: r
    dropout: Annotated[float, Bounds(ge=0, lt=1)] = 0.0
    # Module names (a list) or a regex; null: q/k/v/out projections of every tower layer.
    target_modules: list[str] | str | None = None
    use_dora: bool = False  # DoRA (peft): a learned magnitude per output beside the direction

    @property
    def on(self) -> bool:
        return self.r is not None


# Attention projections of the towers' transformer layers: CLIP's and SigLIP's
# (self_attn.q_proj ...), ViT's (attention.q_proj ... o_proj), BERT's and Swin's
# (attention.self.query ..., attention.output.dense). A regex, so SigLIP's attention-pooling
# head, whose out_proj nn.MultiheadAttention reads directly, is left alone. A convolutional
# tower has none: LoRA leaves it frozen. `{tower}` narrows it to the tower `model.freeze`
# leaves trained.
LORA_TARGETS = (
    r".*{tower}_model\.(encoder\.)?layers?\.\d+\.(blocks\.\d+\.)?"
    r"((self_attn|attention)\.(q_proj|k_proj|v_proj|out_proj|o_proj)"
    r"|attention\.(self|attention)\.(query|key|value)|attention\.output\.dense)"
)
TOWERS_TRAINED = {"none": "", "vision": "text", "text": "vision", "both": ""}


def freeze_towers(model: nn.Module, freeze: Freeze) -> None:
    """Stop gradients through the vision tower, the text tower, both, or neither."""
    for side in ("vision", "text"):
        if freeze in (side, "both"):
            for name, param in model.named_parameters():
                if _tower_of(name) == f"{side}_model":
                    param.requires_grad_(False)


def _tower_of(name: str) -> str | None:
    """The tower a backbone parameter belongs to (projections count with their tower)."""
    if "vision_model." in name or "visual_projection." in name:
        return "vision_model"
    if "text_model." in name or "text_projection." in name:
        return "text_model"
    return None


_LAYER = re.compile(
    r"(?P<tower>vision_model|text_model)\.(encoder\.)?(layers|layer|stages)\.(?P<index>\d+)\."
)


def layer_depth(name: str, num_layers: int) -> int:
    """BEiT's layer id of a tower parameter: 0 for the embeddings (and anything before the
    first layer), i + 1 for transformer layer i, num_layers + 1 after the last layer (final
    norm, pooling head, projection)."""
    match = _LAYER.search(name)
    if match:
        return int(match["index"]) + 1
    if ".embeddings." in name or ".embedder." in name or "pre_layrnorm" in name:  # ResNet: embedder
        return 0
    return num_layers + 1


def layer_counts(model: nn.Module) -> dict[str, int]:
    """The blocks of each tower (a hierarchical tower's stages), counted from its parameters."""
    counts = {"vision_model": 0, "text_model": 0}
    for name, _ in model.named_parameters():
        match = _LAYER.search(name)
        if match:
            counts[match["tower"]] = max(counts[match["tower"]], int(match["index"]) + 1)
    return counts


def tower_depths(model: nn.Module) -> dict[int, tuple[int, int]]:
    """{id(param): (layer id, the tower's layer count)} of every tower parameter."""
    counts = layer_counts(model)
    depths = {}
    for name, param in model.named_parameters():
        tower = _tower_of(name)
        if tower is not None:
            depths[id(param)] = (layer_depth(name, counts[tower]), counts[tower])
    return depths


def unfreeze_last(model: nn.Module, layers: int, freeze: str) -> None:
    """Train only the last `layers` transformer layers of each tower and what follows them
    (final norm, pooling head, projection); towers frozen by `freeze` stay frozen."""
    counts = list(layer_counts(model).values())
    if layers > max(counts):
        raise UserError(
            f"model.unfreeze_last_layers={layers}, but the towers have {counts[0]} (vision) and "
            f"{counts[1]} (text) layers; use at most {max(counts)}, or null to train every layer."
        )
    depths = tower_depths(model)
    for param in model.parameters():
        if id(param) in depths and param.requires_grad:
            depth, count = depths[id(param)]
            param.requires_grad_(depth > count - layers)
    freeze_towers(model, freeze)


def add_lora(model: nn.Module, lora: Lora, freeze: str = "none") -> nn.Module:
    """The backbone with LoRA (or DoRA) adapters (peft) on its attention projections: only
    the adapters train in the towers; the temperature (and SigLIP's bias) stay trainable. A
    tower frozen by `freeze` gets no adapters by default, and any given to it stay frozen
    (LiT-style: a frozen image tower, an adapted text tower)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError(
            "model.lora needs the peft library: pip install 'mmtrain[peft]' "
            "(or set model.lora.r=null to fine-tune without adapters)."
        ) from None
    targets = lora.target_modules or LORA_TARGETS.format(tower=TOWERS_TRAINED[freeze])
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha or lora.r,
        lora_dropout=lora.dropout,
        target_modules=list(targets) if not isinstance(targets, str) else targets,
        use_dora=lora.use_dora,
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as error:
        raise UserError(
            f"model.lora.target_modules={targets!r} matched no layer of the backbone ({error}). "
            "Name attention projections such as q_proj and v_proj, or leave it null for the default."
        ) from None
    adapted = {_tower_of(name) for name, _ in wrapped.named_parameters() if "lora_" in name}
    for tower in sorted({"vision_model", "text_model"} - adapted):
        log.warning(
            "model.lora: the %s tower has no layer model.lora.target_modules names (a "
            "convolutional tower has no attention projections): it stays frozen.",
            tower.split("_")[0],
        )
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if isinstance(param, nn.Parameter):
            param.requires_grad_(True)
    freeze_towers(wrapped, freeze)
    return wrapped


def prepare_backbone(
    model: nn.Module,
    freeze: str,
    unfreeze_last_layers: int | None,
    gradient_checkpointing: bool,
    lora: Lora | None,
) -> nn.Module:
    """Apply the memory levers: frozen towers or layers, LoRA adapters and gradient
    checkpointing (transformers' own, non-reentrant so frozen inputs still backpropagate)."""
    if unfreeze_last_layers is None:
        freeze_towers(model, freeze)
    else:
        unfreeze_last(model, unfreeze_last_layers, freeze)
    if gradient_checkpointing:
        checkpoint_activations(model)
    if lora is not None and lora.on:
        if unfreeze_last_layers is not None:
            raise UserError(
                "model.lora trains adapters instead of the backbone's weights; it does not combine "
                "with model.unfreeze_last_layers. Set model.lora.r=null or "
                "model.unfreeze_last_layers=null (model.freeze=vision|text does combine)."
            )
        model = add_lora(model, lora, freeze)
    return model


def checkpoint_activations(model: nn.Module) -> None:
    """transformers' gradient checkpointing, non-reentrant, on the model or (a dual encoder of
    two towers, which does not offer it itself) on each tower."""
    options = {"use_reentrant": False}
    parts = [model] if model.supports_gradient_checkpointing else []
    parts = parts or [model.vision_model, model.text_model]
    for part in parts:
        if not part.supports_gradient_checkpointing:
            raise UserError(
                f"model.gradient_checkpointing=true, but transformers' {type(part).__name__} "
                "does not support gradient checkpointing; set it to false (or pick another tower)."
            )
        if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5 names it so
            part.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            part.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def plain_backbone(model: nn.Module) -> nn.Module:
    """The transformers model itself: LoRA adapters merged into its weights, when present
    (what `mmtrain export` saves, so the export loads as a plain CLIPModel/SiglipModel)."""
    if hasattr(model, "merge_and_unload"):  # a peft model
        return copy.deepcopy(model).merge_and_unload()
    return model


def average_weights(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * states[i] for each of `keys` (default: every key), computed in
    float32 and kept in each tensor's dtype: a WiSE-FT interpolation ([start, tuned],
    [1 - alpha, alpha]) or a model soup (n runs, 1/n each). The other keys, and tensors
    that are not floating point (counters, position ids), come from the last state. States
    must hold the same keys with the same shapes (a ValueError names the first that differs)."""
    if len(states) != len(weights) or not states:
        raise ValueError("average_weights needs one weight per state, and at least one state")
    last = states[-1]
    for state in states[:-1]:
        if state.keys() != last.keys():
            differ = sorted(set(state) ^ set(last))
            raise ValueError(f"the weights differ in their keys, e.g. {differ[0]!r}")
        for name, tensor in state.items():
            if tensor.shape != last[name].shape:
                raise ValueError(
                    f"{name!r} has the shape {tuple(tensor.shape)} in one and "
                    f"{tuple(last[name].shape)} in another"
                )
    chosen = set(last) if keys is None else set(keys)
    averaged = {}
    for name, tensor in last.items():
        if name not in chosen or not tensor.is_floating_point():
            averaged[name] = tensor.clone()
            continue
        total = sum(w * s[name].float() for w, s in zip(weights, states, strict=True))
        averaged[name] = total.to(tensor.dtype)
    return averaged
