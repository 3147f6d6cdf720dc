"""mmtrain predict run=RUN_DIR input=MANIFEST output=FILE.jsonl|.csv [checkpoint=PATH] [OVERRIDES]

One prediction per row of the input manifest (CSV or JSONL, image and text columns; labels
are not needed), in the input's order: the predicted label and each class's probability
(a classifier) or the image-text similarity (a contrastive model). data.on_bad_sample=skip
predicts the other rows when some are bad and marks those with their reason.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from mmtrain import registry
from mmtrain.commands.load import batches, load_run, on_device, parse_args
from mmtrain.config import source_options
from mmtrain.errors import UserError

log = logging.getLogger("mmtrain")
PREDICT_FORMATS = (".jsonl", ".csv")


def predict_run(args: list[str]) -> Path:
    """`mmtrain predict run=RUN_DIR input=MANIFEST output=FILE(.jsonl|.csv)`: one output row
    per input row, in order (bad rows under data.on_bad_sample=skip get their reason).

    The input is read as a manifest: with the run's own manifest settings (columns, image
    root, cache) when it trained on one, else with the defaults, and with any `data.KEY=`
    override that the manifest source takes (data.on_bad_sample=skip, data.image_root=...).
    Other overrides apply to the run's config (data.batch_size=256).
    """
    own, overrides = parse_args(args, ("run", "input", "output"), ("checkpoint",), __doc__)
    output = Path(own["output"]).expanduser()
    if output.suffix.lower() not in PREDICT_FORMATS:
        raise UserError(
            f"output={own['output']}: the format follows the extension; use .jsonl or .csv."
        )
    source = Path(own["input"]).expanduser()
    if not source.is_file():
        raise UserError(
            f"input={own['input']}: no such file ({source.resolve()}); give the CSV or JSONL "
            "manifest of the rows to predict (image and text columns; labels are not needed)."
        )
    keys = {o: o[5:].split("=")[0] for o in overrides if o.startswith("data.")}
    takes = registry.accepted("data", "manifest", dict.fromkeys(keys.values()))
    for_input = [o for o in overrides if keys.get(o) in takes]
    run = load_run(own["run"], [o for o in overrides if o not in for_input], own.get("checkpoint"))
    options = source_options(run.cfg) if run.cfg.data.name == "manifest" else {"name": "manifest"}
    options.update(OmegaConf.to_container(OmegaConf.from_dotlist(for_input)).get("data", {}))
    policy = options.get("on_bad_sample", "error")
    # No labels: every row is in the one class "0" (the manifest's unlabelled mode). Bad rows
    # are collected here and reported below, once, in the words of this command.
    options.update(train=None, val=str(source), test=None, label_column=None, on_bad_sample="skip")
    split = registry.build(
        "data", options, image_size=run.spec.image_size, class_names=["0"], num_classes=None
    )["val"]
    if split.bad_rows and policy == "error":
        listing = "\n".join(f"  {row}" for row in split.bad_rows)
        raise UserError(
            f"{len(split.bad_rows)} bad row(s) in {source}:\n{listing}\nFix or remove them, or "
            "add data.on_bad_sample=skip to predict the other rows (the skipped ones are "
            "marked in the output with their reason)."
        )
    model, device, autocast = on_device(run)
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
