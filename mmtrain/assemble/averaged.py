"""Runs made by averaging weights (WiSE-FT, model soups): the weights of a finished run as
a plain model holds them (LoRA adapters merged), the starting weights of a fine-tuned run,
and a run directory written for an average, which `eval`, `predict` and `export` accept."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from mmtrain import checkpoint as ckpt
from mmtrain.assemble.finished import Trained
from mmtrain.assemble.training import model
from mmtrain.data.source import save_class_names
from mmtrain.data.tokenizer import save_tokenizer
from mmtrain.errors import UserError
from mmtrain.models.finetune import average_weights, plain_backbone
from mmtrain.spec import RunSpec, parse

log = logging.getLogger("mmtrain")
BACKBONE = "clip."  # the towers' (and the temperature's) keys in every model's state


def plain_config(spec: RunSpec) -> dict[str, Any]:
    """The run's config with LoRA switched off: an average holds merged, plain weights."""
    config = copy.deepcopy(spec.config)
    lora = config.get("model", {}).get("lora")
    if isinstance(lora, dict) and lora.get("r") is not None:
        lora["r"] = None
    return config


def plain_state(run: Trained) -> dict[str, torch.Tensor]:
    """The run's weights as a model without LoRA holds them: adapters merged into the towers."""
    state = {k: v for k, v in run.model.state_dict().items() if not k.startswith(BACKBONE)}
    backbone = plain_backbone(run.model.clip).state_dict()
    state.update({BACKBONE + k: v for k, v in backbone.items()})
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def starting_state(run: Trained) -> dict[str, torch.Tensor]:
    """The weights `run`'s training started from (a run of a pretrained `model.backbone`):
    the backbone as loaded, the new layers freshly made."""
    backbone = run.spec.model.options.get("backbone")
    log.info("loading the starting weights of %s: %s", run.path, backbone)
    start = model(parse(plain_config(run.spec)), run.tokenizer, run.shape, run.class_names)
    return {k: v.detach().cpu().clone() for k, v in start.state_dict().items()}


def interpolated(
    start: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * start + alpha * tuned for the backbone; the new layers (fusion, head),
    which have no starting weights, as trained."""
    towers = [name for name in tuned if name.startswith(BACKBONE)]
    return average_weights([start, tuned], [1 - alpha, alpha], towers)


def uniform_average(states: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of the states (a uniform model soup)."""
    try:
        return average_weights(states, [1 / len(states)] * len(states))
    except ValueError as error:
        raise UserError(f"These runs cannot be averaged: {error}.") from None


def with_weights(run: Trained, state: Mapping[str, torch.Tensor]) -> Trained:
    """`run` rebuilt without LoRA (plain towers) and holding `state`."""
    spec = parse(plain_config(run.spec))
    net = model(spec, run.tokenizer, run.shape, run.class_names)
    net.load_state_dict(dict(state))
    return Trained(
        run.path, spec, run.shape, run.tokenizer, run.class_names, net.eval(), None, run.step
    )


def save_averaged(run: Trained, out: Path, made_of: dict[str, Any]) -> Path:
    """Write `run` (an average, from `with_weights`) as a run directory in `out`: its
    config, tokenizer, labels.json, checkpoints/best.pt and `averaged.json` (`made_of`:
    how it was made)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(OmegaConf.create(run.spec.config), out / ".hydra" / "config.yaml")
    save_tokenizer(run.tokenizer, out)
    if run.class_names is not None:
        save_class_names(run.class_names, out)
    state = {
        "model": run.model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {},
        "step": run.step, "epoch": 0, "data": {}, "rng": {}, "config": run.spec.config,
    }  # fmt: skip
    ckpt.save_atomic(state, out / "checkpoints" / "best.pt")
    (out / "averaged.json").write_text(json.dumps(made_of, indent=1) + "\n")
    log.info("wrote %s", out)
    return out
