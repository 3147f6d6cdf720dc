"""Gradient accumulation for contrastive losses over the whole batch's negatives.

Accumulating K micro-batches of a contrastive loss one by one scores each against its own
negatives only: not the objective of a batch K times as large. Here (GradCache, Gao et al.
2021; open_clip's `--accum-freq`) the micro-batches are first embedded without gradients,
the loss of the whole batch is computed from those cached embeddings, and its gradient with
respect to each embedding is then pushed through the towers micro-batch by micro-batch.
The gradient equals the big batch's, at the memory of one micro-batch plus the embeddings,
for one extra forward pass.

A model that supports it is a `FeatureCachingModel` (`mmtrain.models.interface`, registered
with `traits.accumulates_features`): `embed(**batch)` (the embeddings its loss needs, as a
dict), `objective(embeds, paired)` (the loss from them), `loss_parameters()` (parameters the
loss itself uses, e.g. the temperature) and a forward that takes `cached_grads` and returns
`replay_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from mmtrain import distributed
from mmtrain.models.interface import FeatureCachingModel


def replay_loss(
    embeds: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    loss_parameters: dict[str, nn.Parameter],
) -> torch.Tensor:
    """A surrogate whose gradient is the cached one: sum(embedding * its cached gradient),
    plus the loss parameters' cached gradients when `grads` holds them."""
    total = sum((embeds[key].float() * grads[key]).sum() for key in embeds)
    for name, param in loss_parameters.items():
        if name in grads:
            total = total + (param * grads[name]).sum()
    return total


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def accumulated_backward(
    model: FeatureCachingModel,
    step_model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    autocast: Callable[[], Any],
    scaler: torch.amp.GradScaler,
) -> torch.Tensor:
    """Backward of the contrastive loss of all `batches` taken as one batch; return that loss.

    `model` is the plain module (embedding without gradients, the loss); `step_model` is
    what a training step calls (DDP, compiled), through which gradients flow, synced across
    ranks on the last micro-batch only. Each micro-batch's second forward replays the
    random state of its first, so dropout draws the same masks both times.
    """
    device = next(model.parameters()).device
    states, cached = [], []
    with torch.no_grad():
        for batch in batches:
            states.append(_rng_state(device))
            with autocast():
                cached.append(model.embed(**batch))
    after = _rng_state(device)
    keys = list(cached[0])
    leaves = {k: torch.cat([c[k] for c in cached]).float().requires_grad_() for k in keys}
    paired = [batch["paired"] for batch in batches if "paired" in batch]
    params = {n: p for n, p in model.loss_parameters().items() if p.requires_grad}
    # Under DDP the loss gathers every rank's embeddings: the gradients here hold what all
    # ranks' losses ask of this rank's embeddings.
    loss = model.objective(leaves, torch.cat(paired) if len(paired) == len(batches) else None)
    grads = torch.autograd.grad(loss, [*leaves.values(), *params.values()])
    by_key = dict(zip([*keys, *params], grads, strict=True))
    sizes = {k: [len(c[k]) for c in cached] for k in keys}
    parts = {k: by_key[k].split(sizes[k]) for k in keys}
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        replay = {k: parts[k][i] for k in keys}
        if last:  # the loss parameters' gradient, once, inside the step that syncs
            replay.update({name: by_key[name] for name in params})
        _set_rng_state(states[i], device)
        sync = last or distributed.world_size() == 1
        with autocast(), nullcontext() if sync else step_model.no_sync():
            surrogate = step_model(**batch, cached_grads=replay)["loss"]
            scaler.scale(surrogate).backward()
    _set_rng_state(after, device)
    return loss.detach()
