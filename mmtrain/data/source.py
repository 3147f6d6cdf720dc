"""What a data source returns: per split, images as uint8 tensors, texts and labels."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmtrain.errors import UserError
from mmtrain.runlog import read_json

LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class BadRow:
    """A manifest row that cannot be used: where it is and why."""

    split: str
    file: str
    line: int
    reason: str  # a short kind, the key of summary.json's bad_samples.by_reason
    detail: str  # what exactly is wrong with this row

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}: {self.detail}"


@dataclass
class SplitData:
    """One split, decoded: `images` is uint8 [M, 3, H, W] at the model's resolution.

    `paired[i]` is True when text i genuinely describes image i (every row of a manifest of
    real pairs; only the matching rows of `shapes`). `index[i]`, when set, is the position
    of row i's image in `images` (a cache that also holds the images of dropped rows);
    otherwise row i's image is `images[i]`. `bad_rows` are the rows that were dropped.
    """

    images: torch.Tensor
    texts: list[str]
    labels: torch.Tensor
    class_names: list[str]
    paired: torch.Tensor | None = None
    index: torch.Tensor | None = None
    bad_rows: list[BadRow] = field(default_factory=list)
    negatives: list[list[str]] | None = None  # per row, from a manifest's negative column
    # What each row's image shows, (class ids, names), when `labels` say something else
    # (shapes' labels say whether the caption matches; its image classes are the shapes).
    image_classes: tuple[torch.Tensor, list[str]] | None = None
    # Set when `images` holds whole pictures (a cache): per stored image its width/height,
    # and the model's input size the loader cuts them to (`mmtrain.data.geometry`).
    aspects: torch.Tensor | None = None
    image_size: int | None = None
    paths: list[str] | None = None  # per row, the image file it was decoded from (manifests)

    def __post_init__(self) -> None:
        if self.paired is None:
            self.paired = torch.ones(len(self.texts), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.texts)

    def zeroshot_classes(self) -> tuple[torch.Tensor, list[str]] | None:
        """(class id of each row's image, class names) for zero-shot classification:
        `image_classes` if set, else the labels when there are at least two classes."""
        if self.image_classes is not None:
            return self.image_classes
        return (self.labels, self.class_names) if len(self.class_names) >= 2 else None

    def image(self, row: int) -> torch.Tensor:
        """The uint8 [3, H, W] image of row `row` as stored."""
        return self.images[row if self.index is None else int(self.index[row])]

    def aspect(self, row: int) -> float:
        """Width / height of row `row`'s picture (1 when images are stored as cut)."""
        if self.aspects is None:
            return 1.0
        return float(self.aspects[row if self.index is None else int(self.index[row])])


# Two class names that read as "the caption does not / does describe the image".
MATCHING_PAIRS = ({"0", "1"}, {"false", "true"}, {"no", "yes"}, {"mismatch", "match"})


def matching_class(class_names: list[str], match_label: str | int | None) -> int | None:
    """The class id whose rows are genuine pairs (the rows a contrastive term aligns), or
    None when every row is one.

    `match_label`: `auto` picks the second name of a matching task's two classes (`1`,
    `true`, `yes`, `match`, any case), else every row; `null` is every row; any other value
    names the class.
    """
    if match_label is None:
        return None
    if match_label == "auto":
        lowered = [name.lower() for name in class_names]
        if set(lowered) not in MATCHING_PAIRS:
            return None
        return next(i for i, name in enumerate(lowered) if name in ("1", "true", "yes", "match"))
    if str(match_label) not in class_names:
        raise UserError(
            f"data.match_label={match_label} is not one of the training labels "
            f"({', '.join(class_names[:20])}); name the label that marks a caption as describing "
            "its image, or use auto, or null for every row."
        )
    return class_names.index(str(match_label))


def bad_samples(splits: dict[str, SplitData]) -> dict[str, Any]:
    """summary.json's `bad_samples`: rows dropped, in all, and per reason."""
    reasons = Counter(row.reason for split in splits.values() for row in split.bad_rows)
    return {"skipped": sum(reasons.values()), "by_reason": dict(reasons.most_common())}


def save_class_names(class_names: list[str], run_dir: Path) -> Path:
    """Write `run_dir/labels.json`: the class names in id order, for every later command."""
    path = Path(run_dir) / LABELS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(class_names, indent=1) + "\n")
    return path


def load_class_names(run_dir: Path) -> list[str] | None:
    """The class names a run trained with (id order), or None when it saved none."""
    path = Path(run_dir) / LABELS_FILE
    if not path.is_file():
        return None
    try:
        names = read_json(path, list)
    except UserError as error:
        raise UserError(
            f"{error} It maps the model's outputs to class names; restore it from a copy of "
            "the run (or from the run's training data's labels, in id order)."
        ) from None
    return [str(name) for name in names]
