"""Training-state checkpoints: atomic writes, RNG capture, retention and lookup.

A checkpoint holds tensors and plain values only (dicts, lists, numbers, strings), so it is
read with `torch.load(weights_only=True)`: a file that needs anything else, such as a
crafted pickle that would run a command, is refused before any of it is used.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmtrain.errors import UserError

log = logging.getLogger("mmtrain")


class Damaged(UserError):
    """A checkpoint file that exists but cannot be read (truncated, overwritten)."""


# The entries every training checkpoint has; `load` checks them.
ENTRIES = ("model", "optimizer", "scheduler", "scaler", "data", "rng", "config")

# Keys whose change makes a checkpoint's weights or data position meaningless.
SHAPE_SECTIONS = ("model", "data")
FREE_KEYS = ("data.num_workers",)  # may change between a run and its resume
# ... except where the data position depends on it: a webdataset stream is dealt to
# ranks x loader workers, so other workers would read other batches from the same position.
STREAMED = "webdataset"
# A sharded checkpoint (trainer.strategy=fsdp, `mmtrain.sharding`): a folder NAME.dcp of DCP
# files and STATE_FILE, a training checkpoint of everything but the model's and optimizer's
# tensors; its "format" entry says so.
SHARDED = ".dcp"
STATE_FILE = "train_state.pt"


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
    free = FREE_KEYS
    if old.get("data.name") == STREAMED:  # the readers are ranks x workers: both must stay
        free = ()
        ranks = [(config.get("trainer") or {}).get("nproc_per_node") for config in (saved, current)]
        if None not in ranks:  # a checkpoint of a release without the key: not compared
            old["trainer.nproc_per_node"], new["trainer.nproc_per_node"] = ranks
    differing = sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in free
    )
    if differing:
        details = "; ".join(
            f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now" for k in differing
        )
        if {"data.num_workers", "trainer.nproc_per_node"} & set(differing):
            details += (
                f"; data={STREAMED} deals its stream to ranks x loader workers, so other "
                "readers would train on other batches from the same position"
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
        "model": model.state_dict() if model is not None else {},  # None: a sharded model's
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": state["step"],
        "epoch": state["epoch"],
        "data": dict(state),  # the loop's TrainState: position in the data, best value, ...
        "rng": rng_state(),
        "config": config,
    }


def restore(
    saved: dict[str, Any], model, optimizer, scheduler, scaler, path: Path | None = None
) -> None:
    """Load a `snapshot` (read from `path`) into the given objects and restore the RNG
    states (the loop reads its own state from `saved["data"]`); a UserError when a part
    does not fit."""
    where = path or Path("the checkpoint")
    if model is not None:  # None: a sharded checkpoint's, loaded by `mmtrain.sharding`
        load_weights(model, saved, where, None)
    for name, part in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if part is None:
            continue
        try:
            part.load_state_dict(saved[name])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as error:
            raise UserError(
                f"The {name} state in {where} does not fit this run ({_first_line(error)}): "
                "it was written by a run with other settings. Resume with that run's config, "
                "or start a new run in another directory."
            ) from None
    set_rng_state(saved["rng"])


def load_weights(
    model: torch.nn.Module, saved: dict[str, Any], path: Path, config: dict[str, Any] | None
) -> None:
    """Load a checkpoint's weights into `model`; a UserError that names the model keys that
    differ from `config` (the run's) when the checkpoint was written for another model
    (another architecture, fusion, size or class count)."""
    try:
        model.load_state_dict(saved["model"])
        return
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        problem = [line.strip() for line in str(error).splitlines() if line.strip()]
        shown = problem[1] if len(problem) > 1 else problem[0] if problem else ""
        shown = shown if len(shown) <= 160 else shown[:160] + " ..."
    theirs = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    old = _flatten(theirs.get("model") or {}, "model.")
    new = _flatten((config or {}).get("model") or {}, "model.")
    differing = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    if "model.name" in differing:  # another architecture: its other keys are noise
        differing = ["model.name"]
    keys = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in differing[:6])
    raise UserError(
        f"The checkpoint {path} does not fit this run's model"
        + (f" ({keys})" if config is not None and keys else "")
        + f": {shown}. It was written by a run of another model (or another class count: "
        "labels.json); give a checkpoint of this run (its checkpoints/ folder), or use the run "
        "that wrote it (run=ITS_RUN_DIR)."
    ) from None


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from: python, numpy, torch CPU and (if present) CUDA."""
    numpy_state = np.random.get_state(legacy=False)  # a dict: plain values and one array
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(_tuples(state["python"]))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):  # written by this release; a tuple by 0.1/0.2
        numpy_state = {**numpy_state, "state": dict(numpy_state["state"])}
        key = numpy_state["state"]["key"]
        numpy_state["state"]["key"] = np.asarray(key, dtype=np.int64).astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """Python's RNG state with its tuples back (a checkpoint may hold them as lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any point leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; checkpoints are shared like other outputs
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(
            error, OSError | RuntimeError
        ):  # torch reports some write errors as RuntimeError
            raise _write_error(error, path, state) from None
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# What checkpoints written by mmtrain 0.1 and 0.2 hold besides tensors and plain values:
# numpy's RNG state, one uint32 array. Its element type is fixed by the allowed classes, so no
# object can be built from such a file. numpy's public API gives the array rebuilder (what an
# array pickles to); numpy 1.x names it numpy.core.multiarray, numpy 2 numpy._core.multiarray,
# and a file may come from either, whichever numpy reads it.
_reconstruct = np.empty(0, dtype=np.uint32).__reduce__()[0]
_LEGACY_GLOBALS = [
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType
]


def _nbytes(tree: Any) -> int:
    """The bytes of the tensors in a (nested) checkpoint: about its size on disk."""
    if isinstance(tree, torch.Tensor):
        return tree.nelement() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(_nbytes(v) for v in tree)
    return 0


def _write_error(error: OSError | RuntimeError, path: Path, state: dict[str, Any]) -> UserError:
    """What went wrong writing checkpoint `path`, as a message that says what to do."""
    needed = _nbytes(state)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < needed):
        room = f", {free / 1e6:.0f} MB free" if free is not None else ""
        return UserError(
            f"No space left on device while writing {path} (needs about {needed / 1e6:.0f} MB{room}). "
            "The checkpoints written before are intact. Free space, or lower "
            "trainer.checkpoint.keep_last, then resume with trainer.resume=auto."
        )
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    return UserError(
        f"Could not write the checkpoint {path} ({reason}). The checkpoints written before are "
        "intact; fix the cause (permissions, a failing disk) and resume with trainer.resume=auto."
    )


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files of checkpoint writes a killed process left in `folder`
    (call it only while holding the run directory's lock). A sharded checkpoint killed
    between its two renames is put back."""
    for old in sorted(Path(folder).glob(f".*{SHARDED}.old")):
        final = old.with_name(old.name[1 : -len(".old")])
        if not final.exists():
            os.replace(old, final)
    for stale in sorted(Path(folder).glob(f".*{SHARDED}.*")) + sorted(
        Path(folder).glob(".*.pt.*.tmp")
    ):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted checkpoint write", stale)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def load(path: Path) -> dict[str, Any]:
    """A training checkpoint written by mmtrain, read without running code from it; a
    UserError when it is missing, damaged, holds anything but tensors and plain values, or
    is not mmtrain's."""
    path = Path(path)
    if path.is_dir() and (path / STATE_FILE).is_file():  # a sharded checkpoint's own state
        path = path / STATE_FILE
    if not path.is_file():
        kind = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"Checkpoint {path} {kind}; give the path of a .pt file a run wrote.")
    try:
        with torch.serialization.safe_globals(_LEGACY_GLOBALS):
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise Damaged(
                f"Checkpoint {path} could not be read ({_first_line(error)}); it may be damaged."
            ) from None
        try:
            found = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path)[:5])
        except Exception:
            found = ""
        raise UserError(
            f"Refusing to load {path}: it holds Python objects other than tensors and plain values"
            f"{f' ({found})' if found else ''}, and unpickling them could run code. mmtrain's "
            "checkpoints never do: the file was not written by mmtrain or was altered. "
            "Nothing from it was used; use a checkpoint from a run you trust."
        ) from None
    except Exception as error:  # torch raises many types for a damaged file
        raise Damaged(
            f"Checkpoint {path} could not be read ({_first_line(error)}); it may be damaged."
        ) from None
    missing = [key for key in ENTRIES if not isinstance(saved, dict) or key not in saved]
    if missing:
        if (
            isinstance(saved, dict)
            and saved
            and all(isinstance(v, torch.Tensor) for v in saved.values())
        ):
            what = f"a bare state_dict of {len(saved)} tensors"
        elif isinstance(saved, dict):
            what = f"the entries {', '.join(map(str, list(saved)[:8])) or '(none)'}"
        else:
            what = f"a {type(saved).__name__}"
        raise UserError(
            f"{path} is not an mmtrain training checkpoint: it holds {what}, where mmtrain's "
            f"hold {', '.join(ENTRIES)}. Give a checkpoint from a run directory's checkpoints/ "
            "folder (last.pt, best.pt or step_N.pt); to start from other weights, use "
            "model.backbone=PATH_OR_NAME instead."
        )
    altered = [key for key in ENTRIES if not isinstance(saved[key], dict)]
    step = saved.setdefault("step", saved["data"].get("step", 0) if "data" not in altered else 0)
    if not isinstance(step, int) or isinstance(step, bool):
        altered.append("step")
    if altered:  # each entry is a mapping in every checkpoint mmtrain writes
        raise UserError(
            f"{path} is not an mmtrain training checkpoint as written: its "
            f"{', '.join(altered)} entr{'ies are' if len(altered) > 1 else 'y is'} not what "
            "mmtrain writes (a mapping; the step a whole number). "
            "The file was altered; use a checkpoint from a run directory's checkpoints/ folder."
        )
    return saved


def step_checkpoints(folder: Path, suffix: str = ".pt") -> list[Path]:
    """step_N.pt files (or `suffix`: step_N.dcp folders) in `folder`, oldest step first."""
    found = [
        (int(m.group(1)), p)
        for p in Path(folder).glob(f"step_*{suffix}")
        if (m := re.fullmatch(rf"step_(\d+){re.escape(suffix)}", p.name))
    ]
    return [path for _, path in sorted(found)]


def newest(folder: Path) -> Path | None:
    """The newest checkpoint in `folder`: last.pt (rewritten at every save) or last.dcp,
    else the highest step_N."""
    found = resume_candidates(folder)
    return found[0] if found else None


def resume_candidates(folder: Path, sharded: bool | None = None) -> list[Path]:
    """The checkpoints a resume may start from, newest first: last, then step_N by step; of
    the sharded kind (NAME.dcp), the single-file one (NAME.pt), or either (None)."""
    found = []
    for suffix in [SHARDED, ".pt"] if sharded is None else [SHARDED if sharded else ".pt"]:
        last = Path(folder) / f"last{suffix}"
        found += ([last] if last.exists() else []) + step_checkpoints(folder, suffix)[::-1]
    return found


def prune(folder: Path, keep_last: int | None) -> None:
    """Delete all but the newest `keep_last` step_N checkpoints of each kind (None keeps
    all); last and best are never deleted."""
    if keep_last is not None:
        for suffix in (".pt", SHARDED):
            steps = step_checkpoints(folder, suffix)
            for path in steps[: max(len(steps) - keep_last, 0)]:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
