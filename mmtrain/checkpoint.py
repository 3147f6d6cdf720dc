"""Training-state checkpoints: atomic writes, RNG capture, retention and lookup."""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtrain.errors import UserError

# Keys whose change makes a checkpoint's weights or data position meaningless.
SHAPE_SECTIONS = ("model", "data")
FREE_KEYS = ("data.num_workers",)  # may change between a run and its resume


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume when the model or data config differs from the checkpoint's."""
    old = {k: v for s in SHAPE_SECTIONS for k, v in _flatten(saved.get(s, {}), f"{s}.").items()}
    new = {k: v for s in SHAPE_SECTIONS for k, v in _flatten(current.get(s, {}), f"{s}.").items()}
    differing = sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in FREE_KEYS
    )
    if differing:
        details = "; ".join(
            f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in differing
        )
        raise UserError(
            f"Cannot resume from {path}: the model or data config differs ({details}). "
            "Resume with the run's original overrides (see .hydra/overrides.yaml in its run directory), "
            "or start a new run in another directory. A key set on one side only can also mean that "
            "another release of mmtrain wrote the checkpoint; resume with that release."
        )


def snapshot(
    model, optimizer, scheduler, scaler, state: dict[str, Any], config: dict[str, Any]
) -> dict[str, Any]:
    """Everything a resumed run needs: weights, optimizer, schedule, scaler, loop state, RNGs, config."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": state["step"],
        "epoch": state["epoch"],
        "data": dict(state),  # the loop's TrainState: position in the data, best value, ...
        "rng": rng_state(),
        "config": config,
    }


def restore(saved: dict[str, Any], model, optimizer, scheduler, scaler) -> None:
    """Load a `snapshot` into the given objects and restore the RNG states (the loop reads
    its own state from `saved["data"]`)."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from: python, numpy, torch CPU and (if present) CUDA."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are shared like other outputs
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(path: Path) -> dict[str, Any]:
    """A checkpoint saved by mmtrain; a clear error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"Checkpoint {path} does not exist; give the path of a .pt file a run wrote."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises many types for a damaged file
        raise UserError(
            f"Checkpoint {path} could not be read ({error}); it may be damaged."
        ) from None


def step_checkpoints(folder: Path) -> list[Path]:
    """step_N.pt files in `folder`, oldest step first."""
    found = [
        (int(m.group(1)), p)
        for p in Path(folder).glob("step_*.pt")
        if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))
    ]
    return [path for _, path in sorted(found)]


def newest(folder: Path) -> Path | None:
    """The newest checkpoint in `folder`: last.pt (rewritten at every save), else the
    highest step_N.pt."""
    last = Path(folder) / "last.pt"
    if last.is_file():
        return last
    steps = step_checkpoints(folder)
    return steps[-1] if steps else None


def prune(folder: Path, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` step_N.pt files (None keeps all); last.pt and
    best.pt are never deleted."""
    if keep_last is not None:
        steps = step_checkpoints(folder)
        for path in steps[: max(len(steps) - keep_last, 0)]:
            path.unlink(missing_ok=True)
