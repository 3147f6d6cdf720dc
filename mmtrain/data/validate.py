"""`mmtrain validate`: the config checks and every row's checks of a run, without training."""

from __future__ import annotations

from collections import Counter

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from mmtrain.config import plain, validate
from mmtrain.data.source import BadRow
from mmtrain.models.backbone import backbone_spec
from mmtrain.setup import build_data, check_num_classes


def validate_data(cfg: DictConfig, console: Console | None = None) -> list[BadRow]:
    """Check `cfg` and every row of every split as `train` would; print a table of the
    splits and one of the bad rows; return the bad rows."""
    console = console or Console()
    validate(cfg)
    model_cfg = plain(cfg.model)
    spec = backbone_spec(model_cfg.get("backbone"), model_cfg.get("backbone_config"))
    # "skip" collects every bad row instead of stopping at the first split with one.
    splits = build_data(cfg, spec, on_bad_sample="skip")
    bad = [row for split in splits.values() for row in split.bad_rows]

    table = Table(title=f"data={cfg.data.name} at {spec.image_size} px")
    for column in ("split", "rows", "usable", "bad", "bad by reason"):
        table.add_column(
            column, justify="left" if column in ("split", "bad by reason") else "right"
        )
    for name, split in splits.items():
        reasons = Counter(row.reason for row in split.bad_rows)
        table.add_row(
            name,
            str(len(split) + len(split.bad_rows)),
            str(len(split)),
            str(len(split.bad_rows)),
            ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common()) or "-",
        )
    console.print(table)
    if "train" in splits:
        names = splits["train"].class_names
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        console.print(f"{len(names)} classes (id order): {shown}", highlight=False)
        check_num_classes(model_cfg, names)
    if bad:
        rows = Table(title=f"{len(bad)} bad row(s)")
        for column in ("split", "file", "line", "reason", "detail"):
            rows.add_column(column, overflow="fold")
        for row in bad:
            rows.add_row(row.split, row.file, str(row.line), row.reason, row.detail)
        console.print(rows)
        console.print(
            "Fix or remove these rows, or train with data.on_bad_sample=skip to drop them.",
            highlight=False,
        )
    else:
        console.print("Every row is usable.")
    return bad
