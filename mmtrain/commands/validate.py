"""`mmtrain validate`: the config checks and every row's checks of a run, without training.

On a terminal it prints a table of the splits and one of the bad rows. Piped or redirected,
each bad row is one `FILE:LINE: reason: detail` line, unwrapped, for grep and scripts.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from mmtrain import assemble
from mmtrain.data.source import BadRow, SplitData
from mmtrain.spec import parse


def validate_data(cfg: DictConfig, console: Console | None = None) -> list[BadRow]:
    """Check `cfg` and every row of every split as `train` would; print what was found;
    return the bad rows."""
    console = console or Console()
    spec = parse(cfg)
    if "on_bad_sample" in spec.data.options:
        # "skip" collects every bad row instead of stopping at the first split with one.
        source = dataclasses.replace(
            spec.data, options={**spec.data.options, "on_bad_sample": "skip"}
        )
        spec = dataclasses.replace(spec, data=source)
    shape = assemble.backbone(spec)
    splits = assemble.data(spec, shape, full_check=True)  # a damaged cache is rebuilt
    bad = [row for split in splits.values() for row in split.bad_rows]
    if console.is_terminal:
        _print_tables(console, spec.data.name, splits, bad, shape.image_size)
    else:
        for row in bad:
            print(row, flush=True)
        for name, split in splits.items():
            console.print(
                f"{name}: {len(split) + len(split.bad_rows)} rows, {len(split)} usable, "
                f"{len(split.bad_rows)} bad",
                highlight=False,
                soft_wrap=True,
            )
    if "train" in splits:
        names = splits["train"].class_names
        shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        console.print(f"{len(names)} classes (id order): {shown}", highlight=False, soft_wrap=True)
        assemble.num_classes(spec, names)
        assemble.positive(spec, names)  # data.positive_label names one of two labels
    if bad:
        console.print(
            f"{len(bad)} bad row(s). Fix or remove them, or train with data.on_bad_sample=skip "
            "to drop them.",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print("Every row is usable.")
    return bad


def _print_tables(
    console: Console, source: str, splits: dict[str, SplitData], bad: list[BadRow], size: int
) -> None:
    table = Table(title=f"data={source} at {size} px")
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
    if bad:
        rows = Table(title=f"{len(bad)} bad row(s)")
        for column in ("split", "file", "line", "reason", "detail"):
            rows.add_column(column, overflow="fold")
        for row in bad:
            rows.add_row(row.split, row.file, str(row.line), row.reason, row.detail)
        console.print(rows)
