"""A finished run, rebuilt from its directory alone, for `eval`, `predict` and `export`.

The run directory holds everything: the resolved config in .hydra/config.yaml, the
tokenizer in tokenizer/, the label names in labels.json and the weights of a checkpoint
(best.pt unless `checkpoint=PATH`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from mmtrain import checkpoint as ckpt
from mmtrain import registry
from mmtrain.build import (
    autocast_for,
    build_parts,
    check,
    model_spec,
    resolve_device,
    resolve_precision,
    seed_everything,
    text_length,
)
from mmtrain.config import loader_config, plain, trainer_config, upgrade
from mmtrain.data.loader import Collate, make_loader
from mmtrain.data.source import SplitData, load_class_names
from mmtrain.errors import UserError
from mmtrain.models.backbone import BackboneSpec

log = logging.getLogger("mmtrain")
CONFIG_GROUPS = ("data", "model", "optimizer", "scheduler", "trainer", "zeroshot", "experiment")


@dataclass
class TrainedRun:
    """A trained run, rebuilt: its config, tokenizer, label names and model with weights."""

    path: Path
    cfg: DictConfig
    spec: BackboneSpec
    tokenizer: Any
    class_names: list[str] | None
    model: nn.Module
    checkpoint: Path | None  # None: never trained (`mmtrain eval out=DIR`)
    step: int


def parse_args(
    args: list[str],
    required: tuple[str, ...],
    optional: tuple[str, ...],
    usage: str,
    groups: bool = False,
) -> tuple[dict[str, str], list[str]]:
    """Split `KEY=VALUE` arguments into this command's own keys and config overrides
    (anything with a dot, e.g. data.batch_size=128, and with `groups` a config group's
    option, e.g. model=clip_contrastive); `-h`/`--help` prints `usage`."""
    if "-h" in args or "--help" in args:
        print(usage.strip())
        raise SystemExit(0)
    own: dict[str, str] = {}
    overrides: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"Expected KEY=VALUE, got {arg!r}.")
        if key in required + optional:
            own[key] = value
        elif "." in key or (groups and key in CONFIG_GROUPS):
            overrides.append(arg)
        else:
            raise UserError(
                f"Unknown argument {key!r}; this command takes {', '.join(required + optional)} and config overrides (data.batch_size=...)."
            )
    missing = [key for key in required if key not in own]
    if missing:
        raise UserError(
            f"Missing {missing[0]}=...; this command needs {' '.join(f'{k}=...' for k in required)}."
        )
    return own, overrides


def load_run(run: str, overrides: list[str] = (), checkpoint: str | None = None) -> TrainedRun:
    """Rebuild a run's model from its directory (and `checkpoint`, default best.pt)."""
    path = Path(run).expanduser()
    config_file = path / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise UserError(
            f"run={run}: {config_file} not found; give the directory of a finished `mmtrain train` run (it holds .hydra/, checkpoints/, tokenizer/)."
        )
    cfg = OmegaConf.create(upgrade(OmegaConf.to_container(OmegaConf.load(config_file))))
    cfg.pop("logger", None)  # trackers follow training only: eval needs no W&B or MLflow
    if overrides:
        given = OmegaConf.from_dotlist(list(overrides))
        unknown = sorted(set(given) - set(cfg))
        if unknown:
            raise UserError(
                f"Unknown override group {unknown[0]!r}; overrides change the run's config, "
                f"whose groups are: {', '.join(map(str, cfg))} (e.g. data.batch_size=256)."
            )
        cfg = OmegaConf.merge(cfg, given)
    try:
        check(cfg)
    except UserError as error:
        raise UserError(
            f"run={run}: its config ({config_file}) does not fit this release of mmtrain: {error} "
            "If another release of mmtrain trained it, use that release; if an override above "
            "caused it, change the override."
        ) from None
    weights = Path(checkpoint).expanduser() if checkpoint else path / "checkpoints" / "best.pt"
    if not checkpoint and not weights.is_file():
        weights = path / "checkpoints" / "last.pt"
    if not weights.is_file():
        raise UserError(
            f"checkpoint={checkpoint}: no such file; give a .pt file from a run's checkpoints/ folder."
            if checkpoint
            else f"run={run} has no checkpoint (checkpoints/best.pt or last.pt): the run stopped "
            "before its first save. Give another file with checkpoint=PATH, or finish the run "
            "(`mmtrain train trainer.resume=auto hydra.run.dir=RUN_DIR`, with its overrides)."
        )
    saved = ckpt.load(weights)
    model_cfg = plain(cfg.model)
    spec = model_spec(cfg)
    from transformers import AutoTokenizer

    tokenizer_dir = path / "tokenizer"
    if not tokenizer_dir.is_dir():
        raise UserError(f"{tokenizer_dir} not found: the run directory is incomplete.")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    class_names = load_class_names(path)
    if "num_classes" in model_cfg:
        if class_names is None:
            raise UserError(f"{path / 'labels.json'} not found: the run directory is incomplete.")
        model_cfg["num_classes"] = len(class_names)
    model = registry.build("model", model_cfg, tokenizer=tokenizer, spec=spec)
    model.load_state_dict(saved["model"])
    log.info("loaded %s (step %d)", weights, saved["step"])
    return TrainedRun(path, cfg, spec, tokenizer, class_names, model.eval(), weights, saved["step"])


def untrained_run(
    overrides: list[str], out: Path, config_path: str | None
) -> tuple[TrainedRun, dict[str, SplitData]]:
    """A model built from conf/ and `overrides` without training (a pretrained
    `model.backbone`'s weights, or fresh ones), its tokenizer and labels saved into `out`,
    and the config's data splits."""
    from hydra import compose, initialize_config_dir, initialize_config_module

    path = config_path or str(Path(__file__).resolve().parents[2] / "conf")
    if path.startswith("pkg://"):
        context = initialize_config_module(path.removeprefix("pkg://"), version_base=None)
    else:
        context = initialize_config_dir(path, version_base=None)
    with context:
        cfg = compose("train", overrides=list(overrides))
    seed_everything(check(cfg).seed)  # fresh heads start as a training run's would
    parts = build_parts(cfg, out)
    run = TrainedRun(
        out, cfg, parts.spec, parts.tokenizer, parts.splits["train"].class_names,
        parts.model.eval(), None, 0,
    )  # fmt: skip
    return run, parts.splits


def on_device(run: TrainedRun) -> tuple[nn.Module, torch.device, Callable[[], Any]]:
    """The run's model on the device its trainer config names, with the autocast of its
    precision (what `eval` and `predict` run it with)."""
    trainer = trainer_config(run.cfg)
    device = resolve_device(trainer.device)
    autocast = autocast_for(resolve_precision(trainer.precision, device), device)
    return run.model.to(device), device, autocast


def batches(run: TrainedRun, split: SplitData) -> DataLoader:
    """The rows of `split` in order, in the run's batch size, without augmentation."""
    loader = loader_config(run.cfg)
    length = text_length(loader.max_text_length, run.spec)
    collate = Collate(run.tokenizer, length, pad_to_max_length=run.spec.pad_to_max_length)
    return make_loader(
        split,
        collate,
        batch_size=loader.batch_size,
        num_workers=loader.num_workers,
        shuffle=False,
        seed=0,
    )
