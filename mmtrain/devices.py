"""Where and how a run computes: its device, its precision and autocast, and its seeds."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from mmtrain.errors import UserError

AUTOCAST = {"bf16": torch.bfloat16, "16": torch.float16}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; `cuda` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "trainer.device=cuda but no CUDA GPU is visible; use trainer.device=auto or cpu."
        )
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` is bf16 autocast on a CUDA GPU that supports it (no scaler needed), else 32."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "32"


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    """A context-manager factory: autocast at `precision` on `device`, or nothing for 32."""
    dtype = AUTOCAST.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
