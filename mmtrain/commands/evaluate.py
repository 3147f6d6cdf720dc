"""mmtrain eval run=RUN_DIR [split=val|test] [checkpoint=PATH] [OVERRIDES]

A finished run's metrics on one split (default val), with its best checkpoint (else
last.pt, or checkpoint=PATH): printed as a table and written to RUN_DIR/eval_SPLIT.json.
Config overrides of the run may follow, e.g. data.batch_size=256 or data.test=test.csv.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.table import Table

from mmtrain.build import build_data
from mmtrain.commands.load import batches, load_run, on_device, parse_args
from mmtrain.errors import UserError
from mmtrain.loop import evaluate
from mmtrain.runlog import write_json

log = logging.getLogger("mmtrain")


def evaluate_run(args: list[str]) -> dict[str, float]:
    """`mmtrain eval run=RUN_DIR [split=val|test] [checkpoint=PATH] [overrides]`."""
    own, overrides = parse_args(args, ("run",), ("split", "checkpoint"), __doc__)
    split_name = own.get("split", "val")
    run = load_run(own["run"], overrides, own.get("checkpoint"))
    splits = build_data(run.cfg, run.spec, run.class_names)
    if split_name not in splits:
        raise UserError(
            f"split={split_name}: the run's data has no such split (it has {', '.join(splits)}); for a manifest, set data.{split_name}=PATH."
        )
    model, device, autocast = on_device(run)
    metrics = evaluate(
        model, model.metrics(device), batches(run, splits[split_name]), device, autocast
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
