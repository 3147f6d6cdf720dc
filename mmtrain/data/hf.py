"""`hf`: image-text pairs from a Hugging Face dataset, read with `datasets`.

`data.path` is a local folder (`imagefolder` with metadata.jsonl, parquet files, or a
`save_to_disk` folder), a parquet file, or a dataset name on the hub (when it is reachable).
Columns are named as for manifests; every row gets the manifest's checks and label rule
(`mmtrain.data.rows`, `mmtrain.data.labels`; a ClassLabel column's names are its classes,
its integers their ids), and the images (bytes in parquet, files in an imagefolder) go
through the same decoded-image cache. With data.streaming=true each split is read as a
stream instead, nothing held or cached (`mmtrain.data.hf_stream`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from mmtrain.data.cache import cache_options, decoded_images
from mmtrain.data.hf_stream import HfStreamSplit, stream_splits
from mmtrain.data.labels import Classes, classes_of
from mmtrain.data.rows import Checker, ManifestRow, settle_bad_rows
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


def open_dataset(
    path: str, data_files: Any = None, name: str | None = None, revision: str | None = None,
    streaming: bool = False,
) -> Any:  # fmt: skip
    """A DatasetDict (or Dataset) from a save_to_disk folder, a folder or file that
    `load_dataset` reads (imagefolder, parquet, csv/json), or a hub name (its configuration
    `name` at `revision`); `streaming`: IterableDatasets, read as they are iterated."""
    datasets = require_datasets()
    how = {"streaming": streaming}
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
            return datasets.load_dataset(kind, data_files=str(local), **how)
        if local.is_dir():
            return datasets.load_dataset(str(local), name, data_files=data_files, **how)
        return datasets.load_dataset(
            str(path), name, data_files=data_files, revision=revision, **how
        )
    except UserError:
        raise
    except Exception as error:  # datasets raises many types (hub offline, no files, bad format)
        raise UserError(
            f"Cannot load the dataset data.path={path}: {type(error).__name__}: {error}. Give a "
            "local folder (imagefolder with metadata.jsonl, parquet files, a save_to_disk "
            "folder), a .parquet file, or a dataset name when the hub is reachable."
        ) from None


def _dataset_split(found: Any, name: str, key: str) -> Any:
    """The split `name` of a DatasetDict (a single Dataset is every split)."""
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


def _labels(dataset: Any, column: str | None) -> list[Any]:
    return [0] * len(dataset) if column is None else list(dataset[column])


def _check_columns(splits: dict[str, Any], columns: dict[str, str | None], path: str) -> None:
    """A UserError naming the first column a split lacks, and the columns it has."""
    for name, dataset in splits.items():
        if dataset.column_names is None:  # a stream whose columns are not known up front
            continue
        missing = [c for c in columns.values() if c is not None and c not in dataset.column_names]
        if missing:
            raise UserError(
                f"The {name} split of {path} has no column {missing[0]!r}; its columns are: "
                f"{', '.join(dataset.column_names)}. Name the right one with "
                f"data.{next(k for k, v in columns.items() if v == missing[0])}_column=COLUMN."
            )


def _classes(
    train: Any, labels: list[Any], label_column: str | None, num_classes: int | None
) -> Classes:
    """The classes of the training split: a ClassLabel column's own names (its integers are
    their ids), else those its labels define."""
    feature = train.features.get(label_column) if label_column else None
    if feature is not None and hasattr(feature, "names"):
        return Classes(list(feature.names), ids=True)
    return classes_of(labels, num_classes)


def _row_problems(
    checker: Checker, rows: list[ManifestRow], sources: list[Path | bytes | None]
) -> tuple[list[int | None], list[tuple[str, str] | None]]:
    """Per row, its class id and None or the (reason, detail) of its first problem."""
    labels, problems = [], []
    for row, source in zip(rows, sources, strict=True):
        label, label_problem = checker.label(row)
        labels.append(label)
        problem = checker.text(row) or label_problem
        if source is None:
            problem = ("missing image", "the image is empty")
        elif isinstance(source, Path) and not source.is_file():
            problem = ("missing file", f"{source} does not exist")
        problems.append(problem)
    return labels, problems


def _load_split(
    name: str, dataset: Any, where: str, checker: Checker, labels: list[Any], text_column: str,
    image_column: str, folder: Path, image_size: int, max_pixels: int, options: dict[str, Any],
) -> SplitData:  # fmt: skip
    """One split of the dataset, checked, its images cached (or decoded on read)."""
    texts = dataset[text_column]
    rows = [ManifestRow(i, None, texts[i], labels[i]) for i in range(len(dataset))]
    sources = _image_sources(dataset, image_column)
    ids, problems = _row_problems(checker, rows, sources)
    sources = [s if p is None else None for s, p in zip(sources, problems, strict=True)]
    fingerprint = f"hf:{getattr(dataset, '_fingerprint', '')}:{where}:{len(dataset)}".encode()
    key = hashlib.sha256(fingerprint).digest()
    images = decoded_images(sources, key, folder, image_size, max_pixels, options)
    bad, good = [], []
    for i, problem in enumerate(problems):
        problem = images.problems[i] or problem
        if problem is None:
            good.append(i)
        else:
            bad.append(BadRow(name, where, i, *problem))
    return SplitData(
        images=images.images,
        texts=[rows[i].text for i in good],
        labels=torch.tensor([ids[i] for i in good], dtype=torch.long),
        class_names=checker.class_names,
        index=None if len(good) == len(rows) else torch.tensor(good, dtype=torch.long),
        bad_rows=bad,
        aspects=images.aspects,
        image_size=image_size,
    )


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
    subset: str | None = None,
    revision: str | None = None,
    streaming: bool = False,
    samples_per_epoch: Annotated[int, Bounds(ge=1)] | None = None,
    shuffle_buffer: Annotated[int, Bounds(ge=1)] = 1000,
    cache_dir: str | None = None,
    cache: bool | None = None,
    cache_workers: Annotated[int, Bounds(ge=0)] | None = None,
    cache_scale: Annotated[float, Bounds(ge=1, le=4)] = 1.143,
    max_image_pixels: Annotated[int, Bounds(ge=1)] = 100_000_000,
    on_bad_sample: Literal["error", "skip"] = "error",
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    full_check: bool = False,
) -> dict[str, SplitData] | dict[str, HfStreamSplit]:
    """Image-text pairs of the Hugging Face dataset `path` (configuration `subset`
    at `revision`; splits `train_split`, `val_split`, optional `test_split`), checked and
    cached as manifests are; decoded images are cached in `cache_dir` (default:
    `.mmtrain_cache/` in the current folder). `streaming`: read as streams, nothing cached
    (`mmtrain.data.hf_stream`)."""
    if path is None:
        raise UserError(
            "data=hf needs data.path: a local folder (imagefolder with metadata.jsonl, parquet "
            "files, a save_to_disk folder), a .parquet file, or a dataset name."
        )
    if streaming and cache:
        raise UserError(
            "data.streaming=true reads images as they stream and caches none: data.cache=true "
            "does not go with it. Drop data.cache (or set data.cache=false), or set "
            "data.streaming=false to cache the decoded images."
        )
    options = cache_options(cache is not False, cache_workers, cache_scale, full_check)
    found = open_dataset(path, data_files, subset, revision, streaming)
    wanted = {"train": train_split, "val": val_split, "test": test_split}
    if class_names is not None:
        wanted["train"] = (
            None if train_split not in getattr(found, "keys", lambda: [])() else train_split
        )
    chosen = {k: _dataset_split(found, v, f"{k}_split") for k, v in wanted.items() if v}
    _check_columns(
        chosen, {"image": image_column, "text": text_column, "label": label_column}, path
    )
    if streaming:
        columns = {"image": image_column, "text": text_column, "label": label_column}
        return stream_splits(
            chosen, path, columns, image_size, max_image_pixels, on_bad_sample, shuffle_buffer,
            samples_per_epoch, class_names, num_classes, full_check,
        )  # fmt: skip
    labels_of = {name: _labels(ds, label_column) for name, ds in chosen.items()}
    if class_names is not None:
        classes = Classes.given(class_names)
    else:
        classes = _classes(chosen["train"], labels_of["train"], label_column, num_classes)
    if not classes.names:
        raise UserError(
            f"The train split of {path} has no usable label in column {label_column!r}."
        )
    folder = Path(cache_dir).expanduser().resolve() if cache_dir else Path.cwd() / ".mmtrain_cache"
    splits: dict[str, SplitData] = {}
    for name, dataset in chosen.items():
        where = f"{path}[{wanted[name]}]"
        splits[name] = _load_split(
            name, dataset, where, Checker(where, Path("."), classes), labels_of[name], text_column,
            image_column, folder, image_size, max_image_pixels, options,
        )  # fmt: skip
    bad = [row for split in splits.values() for row in split.bad_rows]
    settle_bad_rows(bad, on_bad_sample, "in the dataset")
    return splits
