"""`mmtrain validate`: the config checks and every row's checks of a run, without training.

On a terminal it prints a table of the splits and one of the bad rows. Piped or redirected,
each bad row is one `FILE:LINE: reason: detail` line, unwrapped, for grep and scripts.
"""

from __future__ import annotations

from collections import Counter

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from mmtrain.build import build_data, check, check_num_classes, model_spec
from mmtrain.config import plain
from mmtrain.data.source import BadRow, SplitData


def validate_data(cfg: DictConfig, console: Console | None = None) -> list[BadRow]:
    """Check `cfg` and every row of every split as `train` would; print what was found;
    return the bad rows."""
    console = console or Console()
    check(cfg)
    if "on_bad_sample" in cfg.data:
        # "skip" collects every bad row instead of stopping at the first split with one.
        cfg = cfg.copy()
        OmegaConf.update(cfg, "data.on_bad_sample", "skip")
    spec = model_spec(cfg)
    splits = build_data(cfg, spec, full_check=True)  # a damaged cache is rebuilt
    bad = [row for split in splits.values() for row in split.bad_rows]
    if console.is_terminal:
        _print_tables(console, cfg, splits, bad, spec.image_size)
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
        check_num_classes(plain(cfg.model), names)
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
    console: Console, cfg: DictConfig, splits: dict[str, SplitData], bad: list[BadRow], size: int
) -> None:
    table = Table(title=f"data={cfg.data.name} at {size} px")
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
