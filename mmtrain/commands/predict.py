"""`mmtrain predict run=RUN_DIR input=MANIFEST output=FILE.jsonl|.csv`: one prediction per
input row, in the input's order."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import torch

from mmtrain import registry
from mmtrain.build import autocast_for, resolve_device, resolve_precision
from mmtrain.commands.load import batches, load_run, parse_args
from mmtrain.config import source_options
from mmtrain.errors import UserError

log = logging.getLogger("mmtrain")
PREDICT_FORMATS = (".jsonl", ".csv")


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
    # The input is read as a manifest: with the run's own manifest settings (columns, image
    # root, cache) when it trained on one, else with the defaults; labels are not needed.
    if run.cfg.data.name == "manifest":
        options = source_options(run.cfg)
    else:
        options = {"name": "manifest", "on_bad_sample": run.cfg.data.get("on_bad_sample", "error")}
    options.update(train=own["input"], val=own["input"], test=None, label_column=None)
    split = registry.build(
        "data", options, image_size=run.spec.image_size, class_names=None, num_classes=None
    )["val"]
    device = resolve_device(run.cfg.trainer.device)
    model, autocast = (
        run.model.to(device),
        autocast_for(resolve_precision(run.cfg.trainer.precision, device), device),
    )
    results: list[dict[str, Any]] = []
    with torch.no_grad():
        for batch in batches(run, split):
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
