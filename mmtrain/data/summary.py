"""A short table of the data a run is about to train on, and warnings on what looks wrong.

Printed once before training: pairs per split, the classes and their balance, caption
lengths in tokens (median, max, and how many the text length truncates) and image sizes
as stored on disk. It warns on a split whose majority class holds more than
`MAJORITY_WARNING` of its rows (accuracy then says little) and on a class that validation
or test has but training never shows.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from PIL import Image

from mmtrain.data.source import SplitData

log = logging.getLogger("mmtrain")
MAJORITY_WARNING = 0.9
_SIZE_SAMPLE = 200  # image headers read per split (evenly spaced rows)


def _balance(labels: torch.Tensor, names: list[str]) -> str:
    counts = Counter(labels.tolist())
    total = max(len(labels), 1)
    ranked = [(names[c] if c < len(names) else str(c), n / total) for c, n in counts.most_common()]
    if len(ranked) <= 4:
        return "  ".join(f"{name} {share:.0%}" for name, share in ranked)
    (top, most), (_, least) = ranked[0], ranked[-1]
    return f"{len(ranked)} classes, {most:.0%} ({top}) .. {least:.0%}"


def _tokens(texts: list[str], tokenizer: Any, max_length: int) -> str:
    lengths = sorted(len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])
    if not lengths:
        return "-"
    truncated = sum(length > max_length for length in lengths)
    return f"{lengths[len(lengths) // 2]} / {lengths[-1]} / {truncated}"


def _sizes(split: SplitData) -> str:
    if not split.paths:
        size = split.images.shape[-1]
        return f"{size}x{size} (rendered)"
    step = max(1, len(split.paths) // _SIZE_SAMPLE)
    sizes = []
    for path in split.paths[::step]:
        with Image.open(path) as image:  # reads the header only
            sizes.append(image.size)
    sizes.sort(key=lambda wh: wh[0] * wh[1])
    shown = [f"{w}x{h}" for w, h in (sizes[0], sizes[len(sizes) // 2], sizes[-1])]
    return shown[0] if len(set(shown)) == 1 else f"{shown[0]} .. {shown[1]} .. {shown[2]}"


def summarize(splits: dict[str, SplitData], tokenizer: Any, max_length: int) -> list[str]:
    """Log the table of `splits` (captions measured with `tokenizer` against `max_length`
    tokens); return the warnings, which are logged too. Streamed splits (shards), which are
    read while training, are not scanned for it."""
    splits = {name: split for name, split in splits.items() if hasattr(split, "labels")}
    if "train" not in splits:
        return []
    names = splits["train"].class_names
    rows = [("split", "pairs", "classes (share of rows)", "tokens med/max/cut", "image size")]
    for split_name, split in splits.items():
        rows.append(
            (
                split_name,
                str(len(split)),
                _balance(split.labels, names),
                _tokens(split.texts, tokenizer, max_length),
                _sizes(split),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    log.info("data summary (captions cut at %d tokens):", max_length)
    for row in rows:
        log.info(
            "  %s",
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(),
        )

    warnings = []
    trained = set(splits["train"].labels.tolist())
    for split_name, split in splits.items():
        counts = Counter(split.labels.tolist())
        if not counts:
            continue
        label, count = counts.most_common(1)[0]
        if count / len(split) > MAJORITY_WARNING:
            warnings.append(
                f"the {split_name} split's class {names[label]!r} holds {count / len(split):.0%} "
                "of its rows: predicting it alone scores that accuracy, so watch val/f1 and "
                "val/auroc, or rebalance the split."
            )
        unseen = sorted(set(counts) - trained)
        if split_name != "train" and unseen:
            shown = ", ".join(repr(names[c]) for c in unseen[:10])
            warnings.append(
                f"the {split_name} split has {sum(counts[c] for c in unseen)} rows of classes "
                f"never seen in train ({shown}): the model cannot learn them; add training rows."
            )
        dropped = sum(row.reason == "unknown label" for row in split.bad_rows)
        if dropped:
            warnings.append(
                f"{dropped} {split_name} rows were dropped for a label never seen in train."
            )
    for warning in warnings:
        log.warning("data: %s", warning)
    return warnings
