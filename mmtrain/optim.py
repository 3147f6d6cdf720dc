"""Optimizer and learning-rate schedule factories (the `optimizer` and `scheduler` groups)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any, Literal

import torch
from torch import nn

from mmtrain.errors import UserError
from mmtrain.registry import register
from mmtrain.rules import Bounds

log = logging.getLogger("mmtrain")
NO_DECAY_TYPES = (nn.LayerNorm, nn.Embedding, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float,
    backbone_lr_scale: float,
    layer_decay: float | None = None,
) -> list[dict]:
    """Trainable parameters grouped by backbone or head, with or without weight decay, and
    learning-rate scale.

    Biases, norm and embedding weights and scalars (CLIP's temperature) get no weight decay;
    the backbone's learning rate is `lr * backbone_lr_scale`. With `layer_decay` (BEiT, timm,
    open_clip), a tower parameter's learning rate is further scaled by
    `layer_decay ** (layers + 1 - layer_id)`: layer_id 0 for the embeddings, i + 1 for
    transformer layer i, layers + 1 for what follows (final norm, pooling head, projection).
    """
    no_decay: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, NO_DECAY_TYPES) or name.endswith("bias") or param.ndim < 2:
                no_decay.add(id(param))
    backbone = {id(p) for p in model.backbone_parameters()}
    depths = {}
    if layer_decay is not None:
        depths = model.layer_depths()
    groups: dict[tuple[bool, bool, float], list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            scale = 1.0  # the head, the temperature, and every parameter without layer_decay
            if id(param) in depths:
                depth, layers = depths[id(param)]
                scale = layer_decay ** (layers + 1 - depth)
            key = (id(param) in backbone, id(param) in no_decay, scale)
            groups.setdefault(key, []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if undecayed else weight_decay,
            "lr": lr * (backbone_lr_scale if in_backbone else 1.0) * scale,
        }
        for (in_backbone, undecayed, scale), params in sorted(groups.items())
    ]


@register("optimizer", "adamw")
def adamw(
    *,
    model: nn.Module,
    samples_per_step: int | None = None,
    lr: Annotated[float, Bounds(gt=0)] | Literal["auto"] = "auto",
    weight_decay: Annotated[float, Bounds(ge=0)] = 0.05,
    betas: Annotated[tuple[float, float], Bounds(ge=0, lt=1)] = (0.9, 0.999),
    eps: Annotated[float, Bounds(gt=0)] = 1e-8,
    backbone_lr_scale: Annotated[float, Bounds(ge=0)] | Literal["auto"] = "auto",
    layer_decay: Annotated[float, Bounds(gt=0, le=1)] | None = None,
    probe_steps: Annotated[int, Bounds(ge=0)] = 0,
) -> torch.optim.AdamW:
    """AdamW over `param_groups` (layer-wise lr decay with `layer_decay`); the fused kernel
    on CUDA. `backbone_lr_scale=auto` is the fine-tuning recipe for a pretrained backbone
    (`FINETUNE_BACKBONE_SCALE`) and 1.0 for one trained from scratch or through adapters.
    `lr=auto` scales `AUTO_LR` per `AUTO_LR_SAMPLES` with the samples of an optimizer step.
    `probe_steps` (LP-FT) marks the towers' groups: the schedule holds them at lr 0 for
    their first `probe_steps` steps (`probed`)."""
    lr = _resolved_lr(lr, samples_per_step)
    backbone_lr_scale = _backbone_scale(model, backbone_lr_scale, lr)
    groups = param_groups(model, weight_decay, lr, backbone_lr_scale, layer_decay)
    if not groups:
        raise UserError(
            "No trainable parameters: model.freeze froze everything the optimizer could train."
        )
    if probe_steps:
        _mark_probe(groups, set(map(id, model.backbone_parameters())), probe_steps, lr)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=on_cuda or None)


def _mark_probe(groups: list[dict], backbone: set[int], probe_steps: int, lr: float) -> None:
    """Mark the towers' parameter groups with `probe_steps` (read by `probed`), and say so."""
    towers = [g for g in groups if id(g["params"][0]) in backbone]
    for group in towers:
        group["probe_steps"] = probe_steps
    if not towers:
        log.warning("optimizer.probe_steps=%d: no tower trains (model.freeze).", probe_steps)
        return
    log.info(
        "linear probe first (optimizer.probe_steps=%d): the towers stay at lr 0 for %d steps "
        "while the new layers train at lr %.1e; then the towers train at lr %.1e after a "
        "warmup of scheduler.warmup_steps.",
        probe_steps, probe_steps, lr, max(g["lr"] for g in towers),
    )  # fmt: skip


# `optimizer.lr=auto`: 1e-3 per 64 samples, scaled linearly with the samples an optimizer step
# sees (data.batch_size x trainer.accumulate_grad_batches x processes): the linear scaling rule
# (Goyal et al. 2017) by which DeiT and MAE set AdamW's rate. A run's rate then follows its
# batch: 5e-4 at the manifest's 32, 1e-3 at the shapes' 64, 4e-3 at 256.
AUTO_LR, AUTO_LR_SAMPLES = 1e-3, 64


def _resolved_lr(lr: float | str, samples_per_step: int | None) -> float:
    """optimizer.lr, with `auto` resolved (and said in the log); without a batch to scale
    with (an optimizer built outside a run), `auto` is `AUTO_LR`."""
    if lr != "auto":
        return lr
    samples_per_step = samples_per_step or AUTO_LR_SAMPLES
    resolved = AUTO_LR * samples_per_step / AUTO_LR_SAMPLES
    log.info(
        "learning rate %.2e (optimizer.lr=auto: %g per %d samples x %d samples per step); "
        "override with optimizer.lr=NUMBER.",
        resolved, AUTO_LR, AUTO_LR_SAMPLES, samples_per_step,
    )  # fmt: skip
    return resolved


# Pretrained towers fine-tune at about 1e-5 to 5e-5 (CLIP/SigLIP fine-tuning practice): with
# a new-layer rate of 1e-3 (lr=auto at 64 samples a step), 0.02 gives them 2e-5. A from-scratch rate would
# wreck the pretrained features in the first hundred steps.
FINETUNE_BACKBONE_SCALE = 0.02


def _backbone_scale(model: nn.Module, scale: float | str, lr: float) -> float:
    """optimizer.backbone_lr_scale, with `auto` resolved (and said in the log)."""
    if scale == "auto":
        if not model.finetunes_pretrained_towers:
            return 1.0
        scale = FINETUNE_BACKBONE_SCALE
        log.info(
            "fine-tuning recipe for the pretrained backbone: towers at lr %.1e, new layers at "
            "lr %.1e (optimizer.backbone_lr_scale=auto -> %g), after the scheduler's warmup; no "
            "weight decay on norms, biases and the temperature. Override with "
            "optimizer.backbone_lr_scale=NUMBER.",
            lr * scale, lr, scale,
        )  # fmt: skip
    return scale


def _checked_warmup(warmup_steps: int, total_steps: int) -> int:
    if warmup_steps >= total_steps:
        capped = total_steps // 10
        log.warning(
            "scheduler.warmup_steps=%d is not below the run's %d steps; warming up for %d instead.",
            warmup_steps,
            total_steps,
            capped,
        )
        return capped
    return warmup_steps


def probed(schedule: torch.optim.lr_scheduler.LambdaLR, warmup_steps: int) -> Any:
    """`schedule` with LP-FT for the groups the optimizer marked with `probe_steps` N (the
    towers): lr 0 for steps 0..N-1, then a warmup of their own over `warmup_steps`, then the
    schedule's factor like every group. The factors are pure functions of the step, so a
    run resumed before or after the switch steps as one never stopped; the log says when the
    towers start."""
    optimizer = schedule.optimizer
    probes = [group.get("probe_steps", 0) for group in optimizer.param_groups]
    if not any(probes):
        return schedule
    base, said = schedule.lr_lambdas[0], []

    def after_probe(probe_steps: int) -> Callable[[int], float]:
        def factor(step: int) -> float:
            if step < probe_steps:
                return 0.0
            if step == probe_steps and not said:
                said.append(step)
                log.info("after step %d: the towers start training (optimizer.probe_steps)", step)
            return min(1.0, (step - probe_steps + 1) / max(1, warmup_steps)) * base(step)

        return factor

    lambdas = [base if n == 0 else after_probe(n) for n in probes]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


@register("scheduler", "cosine")
def cosine(
    *,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: Annotated[int, Bounds(ge=0)] = 0,
    min_lr_ratio: Annotated[float, Bounds(ge=0, le=1)] = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for `warmup_steps`, then cosine decay to `min_lr_ratio * lr`."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    warmup_steps = _checked_warmup(warmup_steps, total_steps)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio
    )
    return probed(schedule, warmup_steps)


@register("scheduler", "constant")
def constant(
    *,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: Annotated[int, Bounds(ge=0)] = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for `warmup_steps`, then the optimizer's learning rate."""
    from transformers.optimization import get_constant_schedule_with_warmup

    warmup_steps = _checked_warmup(warmup_steps, total_steps)
    return probed(get_constant_schedule_with_warmup(optimizer, warmup_steps), warmup_steps)
