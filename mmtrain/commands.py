"""`mmtrain eval`, `predict` and `export`: what a finished run is used for.

Each rebuilds the model from the run directory alone: the resolved config in
.hydra/config.yaml, the tokenizer in tokenizer/, the label names in labels.json and the
weights of a checkpoint (best.pt unless `checkpoint=PATH`).
"""

from __future__ import annotations

import csv
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

import mmtrain.setup  # noqa: F401  (registers every component)
from mmtrain import checkpoint as ckpt
from mmtrain import registry
from mmtrain.config import plain, source_options
from mmtrain.data.loader import Collate, make_loader
from mmtrain.data.source import SplitData, load_class_names
from mmtrain.errors import UserError
from mmtrain.models.backbone import BackboneSpec, backbone_spec
from mmtrain.runlog import write_json
from mmtrain.setup import build_data, resolve_device, resolve_precision, text_length

log = logging.getLogger("mmtrain")
PREDICT_FORMATS = (".jsonl", ".csv")


@dataclass
class Run:
    """A trained run, rebuilt: its config, tokenizer, label names and model with weights."""

    path: Path
    cfg: DictConfig
    spec: BackboneSpec
    tokenizer: Any
    class_names: list[str] | None
    model: nn.Module
    checkpoint: Path
    step: int


def parse_args(
    args: list[str], required: tuple[str, ...], optional: tuple[str, ...]
) -> tuple[dict[str, str], list[str]]:
    """Split `KEY=VALUE` arguments into this command's own keys and config overrides
    (anything with a dot, e.g. data.batch_size=128)."""
    own: dict[str, str] = {}
    overrides: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise UserError(f"Expected KEY=VALUE, got {arg!r}.")
        if key in required + optional:
            own[key] = value
        elif "." in key:
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


def load_run(run: str, overrides: list[str] = (), checkpoint: str | None = None) -> Run:
    """Rebuild a run's model from its directory (and `checkpoint`, default best.pt)."""
    path = Path(run).expanduser()
    config_file = path / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise UserError(
            f"run={run}: {config_file} not found; give the directory of a finished `mmtrain train` run (it holds .hydra/, checkpoints/, tokenizer/)."
        )
    cfg = OmegaConf.load(config_file)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    weights = Path(checkpoint).expanduser() if checkpoint else path / "checkpoints" / "best.pt"
    if not checkpoint and not weights.is_file():
        weights = path / "checkpoints" / "last.pt"
    saved = ckpt.load(weights)
    model_cfg = plain(cfg.model)
    spec = backbone_spec(model_cfg.get("backbone"), model_cfg.get("backbone_config"))
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
    return Run(path, cfg, spec, tokenizer, class_names, model.eval(), weights, saved["step"])


def _batches(run: Run, split: SplitData) -> Any:
    collate = Collate(run.tokenizer, text_length(run.cfg, run.spec))
    return make_loader(
        split,
        collate,
        batch_size=run.cfg.data.batch_size,
        num_workers=run.cfg.data.num_workers,
        shuffle=False,
        seed=0,
    )


def _autocast(run: Run, device: torch.device) -> Any:
    precision = resolve_precision(run.cfg.trainer.precision, device)
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
    return (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext


def evaluate_run(args: list[str]) -> dict[str, float]:
    """`mmtrain eval run=RUN_DIR [split=val|test] [checkpoint=PATH] [overrides]`."""
    from mmtrain.loop import evaluate

    own, overrides = parse_args(args, ("run",), ("split", "checkpoint"))
    split_name = own.get("split", "val")
    run = load_run(own["run"], overrides, own.get("checkpoint"))
    splits = build_data(run.cfg, run.spec, run.class_names)
    if split_name not in splits:
        raise UserError(
            f"split={split_name}: the run's data has no such split (it has {', '.join(splits)}); for a manifest, set data.{split_name}=PATH."
        )
    device = resolve_device(run.cfg.trainer.device)
    model = run.model.to(device)
    metrics = evaluate(
        model,
        model.metrics(device),
        _batches(run, splits[split_name]),
        device,
        _autocast(run, device),
    )
    metrics = {name.replace("val/", f"{split_name}/"): value for name, value in metrics.items()}
    result = {
        "split": split_name,
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "metrics": metrics,
    }
    write_json(run.path / f"eval_{split_name}.json", result)
    table = Table(title=f"{run.path} - {split_name} split, {run.checkpoint.name} (step {run.step})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, f"{value:.4f}")
    Console().print(table)
    log.info("wrote %s", run.path / f"eval_{split_name}.json")
    return metrics


def predict_run(args: list[str]) -> Path:
    """`mmtrain predict run=RUN_DIR input=MANIFEST output=FILE(.jsonl|.csv)`: one output row
    per input row, in order (bad rows under data.on_bad_sample=skip get their reason)."""
    own, overrides = parse_args(args, ("run", "input", "output"), ("checkpoint",))
    output = Path(own["output"]).expanduser()
    if output.suffix.lower() not in PREDICT_FORMATS:
        raise UserError(
            f"output={own['output']}: the format follows the extension; use .jsonl or .csv."
        )
    run = load_run(own["run"], overrides, own.get("checkpoint"))
    options = (
        source_options(run.cfg.data) if run.cfg.data.name == "manifest" else {"name": "manifest"}
    )
    options.update(train=own["input"], val=own["input"], test=None, label_column=None)
    split = registry.build(
        "data",
        options,
        image_size=run.spec.image_size,
        on_bad_sample=run.cfg.data.on_bad_sample,
        class_names=None,
        num_classes=None,
    )["val"]
    device = resolve_device(run.cfg.trainer.device)
    model, autocast = run.model.to(device), _autocast(run, device)
    results: list[dict[str, Any]] = []
    with torch.no_grad():
        for batch in _batches(run, split):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
            results += _prediction_rows(out, run.class_names)
    # Rows kept and rows dropped (data.on_bad_sample=skip) back in the input's order.
    kept = set(split.index.tolist() if split.index is not None else range(len(split)))
    predictions, dropped = iter(results), iter(sorted(split.bad_rows, key=lambda row: row.line))
    rows: list[dict[str, Any]] = []
    for position in range(len(split) + len(split.bad_rows)):
        if position in kept:
            rows.append({"row": position, "status": "ok", **next(predictions)})
        else:
            bad = next(dropped)
            rows.append(
                {"row": position, "status": "skipped", "reason": bad.reason, "line": bad.line}
            )
    _write_rows(rows, output)
    log.info("wrote %d predictions to %s", len(rows), output)
    return output


def _prediction_rows(
    out: dict[str, torch.Tensor], class_names: list[str] | None
) -> list[dict[str, Any]]:
    if "logits" in out:
        probs = out["logits"].float().softmax(-1).cpu()
        names = class_names or [str(i) for i in range(probs.shape[1])]
        return [
            {
                "label": names[int(p.argmax())],
                **{f"prob_{name}": round(float(v), 6) for name, v in zip(names, p, strict=True)},
            }
            for p in probs
        ]
    return [{"similarity": round(float(s), 6)} for s in out["similarity"].float().cpu()]


def _write_rows(rows: list[dict[str, Any]], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix.lower() == ".jsonl":
        output.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def export_run(args: list[str]) -> Path:
    """`mmtrain export run=RUN_DIR out=DIR`: a folder `CLIPModel.from_pretrained` and
    `AutoTokenizer.from_pretrained` load, plus the head (safetensors) and its config."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    own, overrides = parse_args(args, ("run", "out"), ("checkpoint",))
    run = load_run(own["run"], overrides, own.get("checkpoint"))
    out = Path(own["out"]).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    run.model.clip.save_pretrained(out)
    run.tokenizer.save_pretrained(out)
    size = run.spec.image_size
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(run.spec.image_mean),
        image_std=list(run.spec.image_std),
    ).save_pretrained(out)
    head = {
        name: tensor.contiguous()
        for name, tensor in run.model.state_dict().items()
        if not name.startswith("clip.")
    }
    model_cfg = plain(run.cfg.model)
    description = {
        "mmtrain_model": model_cfg["name"],
        "model_config": {
            k: v for k, v in model_cfg.items() if k not in ("backbone", "backbone_config")
        },
        "class_names": run.class_names,
        "checkpoint": str(run.checkpoint),
        "step": run.step,
        "head_weights": "head.safetensors" if head else None,
        "inputs": "uint8 images normalised with the processor's mean/std; text from the tokenizer",
    }
    if head:
        save_file(head, out / "head.safetensors")
    (out / "mmtrain_head.json").write_text(json.dumps(description, indent=2) + "\n")
    log.info("exported %s to %s", run.checkpoint, out)
    return out
