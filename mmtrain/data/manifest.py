"""`manifest`: the user's own image-text pairs, listed in CSV or JSONL files.

Each row names an image file (relative to `data.image_root`, else to the manifest's own
folder), a text and a label. Labels are class ids or class names, by the one rule of
`mmtrain.data.labels`: class ids when every training label is a canonical non-negative
integer, else class names mapped to ids in sorted order. Every row is checked
(`mmtrain.data.rows`); a row that cannot be used (missing or broken image, empty text,
missing or unknown label) is a `BadRow` with its file, line and reason. Under
`on_bad_sample=error` (the default) every bad row of every split is listed and nothing is
trained; under `skip` they are dropped and counted. No row is ever changed to make it fit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from mmtrain.data.cache import cache_options, decoded_images
from mmtrain.data.cached import CachedImages
from mmtrain.data.labels import Classes, classes_of, resolve_label
from mmtrain.data.rows import (
    Checker,
    ManifestRow,
    check_fields,
    read_manifest,
    row_negatives,
    settle_bad_rows,
)
from mmtrain.data.source import BadRow, SplitData, matching_class
from mmtrain.errors import UserError
from mmtrain.registry import register
from mmtrain.rules import Bounds

log = logging.getLogger("mmtrain")


def _decode_split(
    rows: list[ManifestRow],
    manifest_bytes: bytes,
    checker: Checker,
    image_size: int,
    cache_dir: Path,
    max_image_pixels: int,
    cache: dict[str, Any],
) -> tuple[list[Path | None], CachedImages, list[tuple[str, str] | None]]:
    """(image paths, their decoded images, per row its problem but a label's): every check
    that decides whether a row is kept before the classes exist."""
    paths, problems = [], []
    for row in rows:
        image, problem = check_fields(checker, row)
        paths.append(image)
        problems.append(problem)
    cache = decoded_images(paths, manifest_bytes, cache_dir, image_size, max_image_pixels, cache)
    return paths, cache, [cache.problems[i] or problem for i, problem in enumerate(problems)]


def _split_data(
    split: str,
    path: Path,
    rows: list[ManifestRow],
    decoded: tuple[list[Path | None], CachedImages, list[tuple[str, str] | None]],
    classes: Classes,
    image_size: int,
    with_negatives: bool,
) -> SplitData:
    """The split's kept rows, each label resolved among `classes`; the others as bad rows."""
    paths, cache, problems = decoded
    checker = Checker(str(path), path.parent, classes)
    bad: list[BadRow] = []
    good: list[int] = []
    labels: list[int | None] = []
    for position, (row, problem) in enumerate(zip(rows, problems, strict=True)):
        label, label_problem = checker.label(row)
        labels.append(label)
        problem = problem or label_problem
        if problem is None:
            good.append(position)
        else:
            bad.append(BadRow(split, str(path), row.line, *problem))
    index = None if len(good) == len(rows) else torch.tensor(good, dtype=torch.long)
    return SplitData(
        images=cache.images,
        negatives=[row_negatives(rows[i].negatives) for i in good] if with_negatives else None,
        texts=[rows[i].text for i in good],
        labels=torch.tensor([labels[i] for i in good], dtype=torch.long),
        class_names=checker.class_names,
        index=index,
        bad_rows=bad,
        aspects=cache.aspects,
        image_size=image_size,
        paths=[str(paths[i]) for i in good],
    )


def _read_splits(
    given: dict[str, str | None], columns: dict[str, str | None]
) -> dict[str, tuple[Path, bytes, list[ManifestRow]]]:
    """Per split given, (its resolved path, its bytes, its rows)."""
    read: dict[str, tuple[Path, bytes, list[ManifestRow]]] = {}
    for split, name in given.items():
        if name is None:
            continue
        path = Path(str(name)).expanduser().resolve()
        if not path.is_file():
            raise UserError(
                f"data.{split}={name}: no such file ({path}). Relative paths are resolved "
                "against the directory mmtrain was started from."
            )
        read[split] = (path, *read_manifest(path, columns))
    return read


def _kept_labels(
    read: dict[str, tuple[Path, bytes, list[ManifestRow]]],
    decoded: dict[str, tuple[list[Path | None], CachedImages, list[tuple[str, str] | None]]],
) -> list[Any]:
    """The labels of the training rows kept by every check but the label's (all of them
    when none is kept: each is then reported as it is)."""
    if "train" not in read:
        return []
    rows, problems = read["train"][2], decoded["train"][2]
    kept = [row.label for row, problem in zip(rows, problems, strict=True) if problem is None]
    return kept or [row.label for row in rows]


def _classes(
    read: dict[str, tuple[Path, bytes, list[ManifestRow]]],
    kept: list[Any],
    label_column: str | None,
    class_names: list[str] | None,
    num_classes: int | None,
) -> Classes:
    """The run's classes (`class_names`) or those of the labels of the training rows that
    are `kept`: a row refused for its fields (a caption's unquoted comma shifts its tail
    into the label) makes no class."""
    if class_names is not None:
        classes = Classes.given(class_names)
    else:
        classes = classes_of(kept, num_classes)
    if not classes.names:
        raise UserError(
            f"The training manifest {read['train'][0]} has no usable label in column "
            f"{label_column!r}; every row needs an integer class id or a class name."
        )
    return classes


def caption_rows(
    read: dict[str, tuple[Path, bytes, list[ManifestRow]]], classes: Classes, template: str
) -> None:
    """Give every row the caption `template` makes of its label's class name (FLYP): a
    labelled image set trains contrastively, with captions that match the zero-shot
    prompts. A row whose label is not a class keeps its label in the caption; the label's
    own check reports it."""
    for _, _, rows in read.values():
        for row in rows:
            label, _ = resolve_label(row.label, classes)
            row.text = template.format(classes.names[label] if label is not None else row.label)


def _text_column(
    text_column: str, label_column: str | None, caption_from_label: str | None
) -> str | None:
    """The column captions are read from: none when they are made from the labels."""
    if caption_from_label is None:
        return text_column
    if label_column is None:
        raise UserError(
            f"data.caption_from_label={caption_from_label!r} makes captions from the labels, "
            "but data.label_column=null reads none; name the label column, or set "
            "data.caption_from_label=null to use the text column."
        )
    log.info("captions made from the labels: %r", caption_from_label)
    return None


def _unlabelled_or_captioned(
    read: dict[str, tuple[Path, bytes, list[ManifestRow]]],
    label_column: str | None,
    caption_from_label: str | None,
) -> None:
    """Rows without labels (`label_column` null) all in one class; with
    `caption_from_label`, captions of the labels as written until the classes exist (every
    row's text then passes the text check; its label is checked on its own)."""
    for _, _, rows in read.values():
        for row in rows:
            if label_column is None:
                row.label = 0
    if caption_from_label is not None:
        caption_rows(read, Classes([], ids=False), caption_from_label)


@register("data", "manifest")
def manifest(
    *,
    image_size: int,
    train: str | None = None,
    val: str | None = None,
    test: str | None = None,
    image_root: str | None = None,
    image_column: str = "image",
    text_column: str = "text",
    label_column: str | None = "label",
    negative_column: str | None = None,
    cache_dir: str | None = None,
    max_image_pixels: Annotated[int, Bounds(ge=1)] = 100_000_000,
    on_bad_sample: Literal["error", "skip"] = "error",
    cache: bool = True,
    cache_workers: Annotated[int, Bounds(ge=0)] | None = None,
    cache_scale: Annotated[float, Bounds(ge=1, le=4)] = 1.143,
    match_label: str | int | None = "auto",
    caption_from_label: str | None = None,
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    full_check: bool = False,
) -> dict[str, SplitData]:
    """Image-text pairs from CSV or JSONL manifests (`train`, `val`, optional `test`).

    `image_size` comes from the backbone. `class_names` (from a run's labels.json) fixes
    the label mapping instead of deriving it from the training labels; with it, `train`
    may be left out (`mmtrain predict` reads one manifest as `val`). Decoded images are
    cached in `cache_dir` (default: `.mmtrain_cache/` beside each manifest) by
    `cache_workers` processes (null: one per CPU, at most 8, or threads for < 256 images),
    whole at `cache_scale` x the model's size (the loader cuts the model's input), or
    decoded by the loader every epoch with `cache=False`; `full_check` (`mmtrain validate`)
    checks every cached pixel. `caption_from_label` (a template with one `{}`, "a photo of
    {}.") makes each row's caption from its class name; the text column is then not read.
    """
    if val is None or (train is None and class_names is None):
        raise UserError(
            "data=manifest needs data.train=PATH and data.val=PATH (CSV or JSONL files with "
            f"the columns {image_column!r}, {text_column!r}, {label_column!r}); "
            "data.test is optional."
        )
    text = _text_column(text_column, label_column, caption_from_label)
    columns = {"image": image_column, "text": text, "label": label_column}
    if negative_column:
        columns["negative"] = negative_column
    read = _read_splits({"train": train, "val": val, "test": test}, columns)
    if "train" in read and not read["train"][2]:
        raise UserError(f"The training manifest {read['train'][0]} has no rows.")
    _unlabelled_or_captioned(read, label_column, caption_from_label)
    options = cache_options(cache, cache_workers, cache_scale, full_check)
    decoded = {}
    for split, (path, data, rows) in read.items():
        root = Path(image_root).expanduser().resolve() if image_root else path.parent
        folder = Path(cache_dir).expanduser().resolve() if cache_dir else path.parent
        if not cache_dir:
            folder = folder / ".mmtrain_cache"
        checker = Checker(str(path), root, Classes([], ids=False))
        decoded[split] = _decode_split(
            rows, data, checker, image_size, folder, max_image_pixels, options
        )
    classes = _classes(read, _kept_labels(read, decoded), label_column, class_names, num_classes)
    if caption_from_label is not None:
        caption_rows(read, classes, caption_from_label)
    genuine = matching_class(classes.names, None if label_column is None else match_label)
    splits: dict[str, SplitData] = {}
    for split, (path, _, rows) in read.items():
        splits[split] = _split_data(
            split, path, rows, decoded[split], classes, image_size, bool(negative_column)
        )
        if genuine is not None:  # a matching task: only its matching rows are true pairs
            splits[split].paired = splits[split].labels == genuine
        if splits[split].bad_rows:
            log.info(
                "  %s: %d of %d rows of %s are bad",
                split, len(splits[split].bad_rows), len(rows), path.name,
            )  # fmt: skip
    settle_bad_rows([row for split in splits.values() for row in split.bad_rows], on_bad_sample)
    return splits
