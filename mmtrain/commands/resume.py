"""`mmtrain resume RUN_DIR [KEY=VALUE ...]`: the `mmtrain train` arguments that continue a
run in its own directory, from the overrides it was started with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mmtrain import checkpoint as ckpt
from mmtrain.errors import UserError

USAGE = "mmtrain resume RUN_DIR [KEY=VALUE ...]"
# Overrides a run saves that say where and how it ran, not what it trains: resume sets them.
WHERE = ("trainer.resume=", "hydra.run.dir=", "hydra.sweep.dir=")


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UserError(
            f"Cannot read {path}: {error}; is it a run directory mmtrain wrote?"
        ) from None


def train_arguments(args: list[str]) -> list[str]:
    """The `mmtrain train` arguments that resume the run `args[0]` with the extra overrides
    `args[1:]`: its own config directories and overrides, then the extras, then
    trainer.resume=auto and hydra.run.dir=RUN_DIR. A folder that is not a run, or a run
    with no checkpoint, is a UserError."""
    if not args or "=" in args[0]:
        raise UserError(f"Give the run directory to continue: {USAGE}.")
    run_dir = Path(args[0]).expanduser().resolve()
    extra = args[1:]
    odd = [arg for arg in extra if "=" not in arg or arg.startswith("-")]
    if odd:
        raise UserError(
            f"{odd[0]!r}: after RUN_DIR, resume takes KEY=VALUE overrides only. {USAGE}"
        )
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not run_dir.is_dir() or not saved.is_file():
        what = "is not a directory" if not run_dir.is_dir() else "holds no .hydra/overrides.yaml"
        raise UserError(
            f"{run_dir} {what}: it is not a run directory of `mmtrain train`. Give the folder "
            "a run printed at its start (outputs/DATE/TIME, or a sweep job's multirun/DATE/TIME/N)."
        )
    if not ckpt.resume_candidates(run_dir / "checkpoints"):
        raise UserError(
            f"{run_dir} holds no checkpoint (checkpoints/last.pt or step_N.pt) to resume from: "
            "the run stopped before its first save. Start it again with mmtrain train (its "
            "overrides are in .hydra/overrides.yaml)."
        )
    overrides = _read_yaml(saved) or []
    kept = [str(o) for o in overrides if not str(o).startswith(WHERE)]
    return [
        *_config_dirs(run_dir),
        *kept,
        *extra,
        "trainer.resume=auto",
        f"hydra.run.dir={run_dir}",
    ]


def _config_dirs(run_dir: Path) -> list[str]:
    """The run's own config groups: --config-dir DIR (Hydra keeps it among the config
    sources) and hydra.searchpath=[...] overrides, from RUN_DIR/.hydra/hydra.yaml."""
    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return []
    hydra = (_read_yaml(hydra_file) or {}).get("hydra", {})
    found = []
    for source in hydra.get("runtime", {}).get("config_sources", []):
        if source.get("provider") == "command-line" and source.get("schema") == "file":
            found += ["--config-dir", str(source["path"])]
    hydra_overrides = hydra.get("overrides", {}).get("hydra", [])
    return found + [str(o) for o in hydra_overrides if str(o).startswith("hydra.searchpath=")]
