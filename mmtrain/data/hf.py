"""`hf`: image-text pairs from a Hugging Face dataset, read with `datasets`.

`data.path` is a local folder (`imagefolder` with metadata.jsonl, parquet files, or a
`save_to_disk` folder), a parquet file, or a dataset name on the hub (when it is reachable).
Columns are named as for manifests; every row gets the manifest's checks, and the images
(bytes in parquet, files in an imagefolder) go through the same decoded-image cache.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from mmtrain.data.cache import cache_options, cached_images
from mmtrain.data.cached import decoded_on_read
from mmtrain.data.manifest import Checker, Row, _bad_row_report, _label_key, class_names_of
from mmtrain.data.source import BadRow, SplitData
from mmtrain.errors import UserError
from mmtrain.registry import register
from mmtrain.rules import Bounds

log = logging.getLogger("mmtrain")
INSTALL = "pip install 'mmtrain[hf]'"


def require_datasets() -> Any:
    """The `datasets` module, or a UserError with the install command."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"data=hf needs the Hugging Face datasets library: {INSTALL}") from None
    return datasets


def open_dataset(path: str, data_files: Any = None) -> Any:
    """A DatasetDict (or Dataset) from a save_to_disk folder, a folder or file that
    `load_dataset` reads (imagefolder, parquet, csv/json), or a hub name."""
    datasets = require_datasets()
    local = Path(str(path)).expanduser()
    try:
        if local.is_dir() and any(
            (local / name).is_file() for name in ("dataset_dict.json", "state.json")
        ):
            return datasets.load_from_disk(str(local))
        if local.is_file():
            kind = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}.get(
                local.suffix
            )
            if kind is None:
                raise UserError(f"data.path={path}: a file must be .parquet, .csv or .jsonl.")
            return datasets.load_dataset(kind, data_files=str(local))
        if local.is_dir():
            return datasets.load_dataset(str(local), data_files=data_files)
        return datasets.load_dataset(str(path), data_files=data_files)
    except UserError:
        raise
    except Exception as error:  # datasets raises many types (hub offline, no files, bad format)
        raise UserError(
            f"Cannot load the dataset data.path={path}: {type(error).__name__}: {error}. Give a "
            "local folder (imagefolder with metadata.jsonl, parquet files, a save_to_disk "
            "folder), a .parquet file, or a dataset name when the hub is reachable."
        ) from None


def _split(found: Any, name: str, key: str) -> Any:
    if not hasattr(found, "keys"):  # a single Dataset: it is every split
        return found
    if name not in found:
        raise UserError(
            f"data.{key}={name}: the dataset has no split {name!r}; its splits are: "
            f"{', '.join(found.keys())}."
        )
    return found[name]


def _image_sources(dataset: Any, column: str) -> list[Path | bytes | None]:
    """Each row's image as a file path or encoded bytes (never decoded here)."""
    datasets = require_datasets()
    if isinstance(dataset.features.get(column), datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    sources: list[Path | bytes | None] = []
    for value in dataset[column]:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, bytes):
            sources.append(value)
        elif isinstance(value, str) and value.strip():
            sources.append(Path(value))
        else:
            sources.append(None)
    return sources


@register("data", "hf")
def hf(
    *,
    image_size: int,
    path: str | None = None,
    data_files: Any = None,
    train_split: str = "train",
    val_split: str = "validation",
    test_split: str | None = None,
    image_column: str = "image",
    text_column: str = "text",
    label_column: str | None = "label",
    cache_dir: str | None = None,
    cache: bool = True,
    cache_workers: Annotated[int, Bounds(ge=0)] | None = None,
    cache_scale: Annotated[float, Bounds(ge=1, le=4)] = 1.143,
    max_image_pixels: Annotated[int, Bounds(ge=1)] = 100_000_000,
    on_bad_sample: Literal["error", "skip"] = "error",
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    full_check: bool = False,
) -> dict[str, SplitData]:
    """Image-text pairs of the Hugging Face dataset `path` (splits `train_split`,
    `val_split`, optional `test_split`), checked and cached as manifests are; decoded images
    are cached in `cache_dir` (default: `.mmtrain_cache/` in the current folder)."""
    if path is None:
        raise UserError(
            "data=hf needs data.path: a local folder (imagefolder with metadata.jsonl, parquet "
            "files, a save_to_disk folder), a .parquet file, or a dataset name."
        )
    options = cache_options(cache, cache_workers, cache_scale, full_check)
    found = open_dataset(path, data_files)
    wanted = {"train": train_split, "val": val_split, "test": test_split}
    if class_names is not None:
        wanted["train"] = (
            None if train_split not in getattr(found, "keys", lambda: [])() else train_split
        )
    splits_in = {k: _split(found, v, f"{k}_split") for k, v in wanted.items() if v is not None}
    columns = {"image": image_column, "text": text_column, "label": label_column}
    for name, dataset in splits_in.items():
        missing = [c for c in columns.values() if c is not None and c not in dataset.column_names]
        if missing:
            raise UserError(
                f"The {name} split of {path} has no column {missing[0]!r}; its columns are: "
                f"{', '.join(dataset.column_names)}. Name the right one with "
                f"data.{next(k for k, v in columns.items() if v == missing[0])}_column=COLUMN."
            )

    labels_of = {name: _labels(ds, label_column) for name, ds in splits_in.items()}
    if class_names is not None:
        names, integer = list(class_names), class_names == [str(i) for i in range(len(class_names))]
    else:
        feature = splits_in["train"].features.get(label_column) if label_column else None
        if feature is not None and hasattr(feature, "names"):  # a ClassLabel: its own names
            names, integer = list(feature.names), True
        else:
            keys = [k for k in (_label_key(v) for v in labels_of["train"]) if k is not None]
            names, integer = class_names_of(keys, num_classes)
    if not names:
        raise UserError(
            f"The train split of {path} has no usable label in column {label_column!r}."
        )
    folder = Path(cache_dir).expanduser().resolve() if cache_dir else Path.cwd() / ".mmtrain_cache"

    splits: dict[str, SplitData] = {}
    for name, dataset in splits_in.items():
        where = f"{path}[{wanted[name]}]"
        checker = Checker(where, Path("."), names, integer)
        texts = dataset[text_column]
        rows = [Row(i, None, texts[i], labels_of[name][i]) for i in range(len(dataset))]
        sources = _image_sources(dataset, image_column)
        problems, labels = [], []
        for row, source in zip(rows, sources, strict=True):
            label, label_problem = checker.label(row)
            labels.append(label)
            problem = checker.text(row) or label_problem
            if source is None:
                problem = ("missing image", "the image is empty")
            elif isinstance(source, Path) and not source.is_file():
                problem = ("missing file", f"{source} does not exist")
            problems.append(problem)
        sources = [s if p is None else None for s, p in zip(sources, problems, strict=True)]
        fingerprint = f"hf:{getattr(dataset, '_fingerprint', '')}:{where}:{len(dataset)}".encode()
        if options["enabled"]:
            images = cached_images(
                sources, hashlib.sha256(fingerprint).digest(), folder, image_size, max_image_pixels,
                options["workers"], options["verify"], options["scale"],
            )  # fmt: skip
        else:
            images = decoded_on_read(sources, image_size, max_image_pixels, options["scale"])
        bad, good = [], []
        for i, problem in enumerate(problems):
            problem = images.problems[i] or problem
            if problem is None:
                good.append(i)
            else:
                bad.append(BadRow(name, where, i, *problem))
        splits[name] = SplitData(
            images=images.images,
            texts=[rows[i].text for i in good],
            labels=torch.tensor([labels[i] for i in good], dtype=torch.long),
            class_names=names,
            index=None if len(good) == len(rows) else torch.tensor(good, dtype=torch.long),
            bad_rows=bad,
            aspects=images.aspects,
            image_size=image_size,
        )
    bad = [row for split in splits.values() for row in split.bad_rows]
    if bad and on_bad_sample == "error":
        raise UserError(_bad_row_report(bad).replace("in the manifests", "in the dataset"))
    if bad:
        counts = Counter(row.reason for row in bad)
        log.warning(
            "skipped %d bad row(s) (data.on_bad_sample=skip): %s",
            len(bad), ", ".join(f"{reason}: {n}" for reason, n in counts.most_common()),
        )  # fmt: skip
    return splits


def _labels(dataset: Any, column: str | None) -> list[Any]:
    return [0] * len(dataset) if column is None else list(dataset[column])
