"""A Hugging Face split streamed (data.streaming=true): rows read with `datasets`' streaming,
images decoded as they arrive, none held in memory or cached.

A streamed split is a `StreamSplit` whose "shards" are the `datasets` IterableDataset's own
shards (its files): epochs, shuffling, the readers' shares and exact mid-epoch resume are
those of `mmtrain.data.shard_stream`. Each row becomes a raw sample (`jpg` bytes, `txt`,
the label as json) that the webdataset `SampleChecker` checks and decodes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mmtrain.data.labels import Classes, classes_of
from mmtrain.data.samples import SampleChecker
from mmtrain.data.shard_stream import StreamSplit
from mmtrain.errors import UserError

log = logging.getLogger("mmtrain")


class HfStreamSplit(StreamSplit):
    """One split of a `datasets` IterableDataset, streamed; `len` is one epoch's rows."""

    def __init__(
        self, split: str, dataset: Any, samples: int, checker: SampleChecker,
        shuffle_buffer: int, on_bad_sample: str, columns: dict[str, str | None],
    ):  # fmt: skip
        shards = [str(i) for i in range(max(1, dataset.n_shards))]
        super().__init__(split, shards, samples, checker, shuffle_buffer, on_bad_sample)
        self.dataset, self.columns = dataset, columns

    @property
    def texts(self) -> list[str]:
        """Every text of the split (one pass over its text column, no image read)."""
        if self._texts is None:
            column = self.columns["text"]
            rows = self.dataset.select_columns([column])
            self._texts = [str(row[column] or "") for row in rows]
        return self._texts

    def read(self, shards: Iterable[str], handler: Any) -> Iterator[dict[str, Any]]:
        """The rows of the given shards of the dataset as raw samples, in file order."""
        count = max(1, self.dataset.n_shards)
        for shard in shards:
            part = self.dataset if count == 1 else self.dataset.shard(count, int(shard))
            for place, row in enumerate(part):
                sample = raw_sample(row, self.columns)
                sample.update(__place__=place, __url__=shard, __key__=f"{self.split}:{place}")
                yield sample


def raw_sample(row: dict[str, Any], columns: dict[str, str | None]) -> dict[str, Any]:
    """A `datasets` row (its image not decoded) as a raw sample of bytes for the checker."""
    sample: dict[str, Any] = {}
    image = row.get(columns["image"] or "")
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, str) and image.strip() and Path(image).is_file():
        image = Path(image).read_bytes()
    if isinstance(image, bytes) and image:
        sample["jpg"] = image  # any format: the checker decodes by content
    text = row.get(columns["text"] or "")
    if text is not None:
        sample["txt"] = str(text)
    label = columns["label"]
    if label is not None and row.get(label) is not None:
        sample["json"] = json.dumps({label: row[label]})
    return sample


def stream_splits(
    chosen: dict[str, Any], path: str, columns: dict[str, str | None], image_size: int,
    max_pixels: int, on_bad_sample: str, shuffle_buffer: int, samples_per_epoch: int | None,
    class_names: list[str] | None, num_classes: int | None, full_check: bool = False,
) -> dict[str, HfStreamSplit]:  # fmt: skip
    """The chosen splits (`datasets` IterableDatasets, or Datasets of a save_to_disk folder
    read as streams) as streamed splits. An epoch is data.samples_per_epoch training rows,
    else the split's size as `datasets` knows it, else one pass over its text column."""
    import datasets

    sizes: dict[str, int | None] = {}
    for name, dataset in list(chosen.items()):
        sizes[name] = _known_size(dataset)
        if isinstance(dataset, datasets.Dataset):
            dataset = dataset.to_iterable_dataset()
        image = columns["image"]
        if isinstance((dataset.features or {}).get(image), datasets.Image):
            dataset = dataset.cast_column(image, datasets.Image(decode=False))
        chosen[name] = dataset
    classes, origin = _stream_classes(
        chosen.get("train"), columns["label"], class_names, num_classes
    )
    if not classes.names:
        raise UserError(
            f"The train split of {path} has no usable label in column {columns['label']!r}."
        )
    log.info("  data.streaming=true: images decoded as they stream, none cached")
    log.info("  classes from %s", origin)
    checker = SampleChecker(classes, columns["label"], image_size, max_pixels)
    splits = {}
    for name, dataset in chosen.items():
        samples = samples_per_epoch if name == "train" and samples_per_epoch else sizes[name]
        if samples is None:  # unknown to `datasets`: one pass over the text column
            samples = sum(1 for _ in dataset.select_columns([columns["text"]]))
            log.info("  %s: %d rows counted (one pass over its text column)", name, samples)
        splits[name] = HfStreamSplit(
            name, dataset, samples, checker, shuffle_buffer, on_bad_sample, columns
        )
        if full_check:  # mmtrain validate: every row decoded once, the bad ones listed
            splits[name].check_all()
    return splits


def _known_size(dataset: Any) -> int | None:
    """The rows of a split when `datasets` knows them without reading it."""
    if hasattr(dataset, "__len__"):
        return len(dataset)
    info = getattr(dataset, "info", None)
    split = getattr(dataset, "split", None)
    known = (getattr(info, "splits", None) or {}).get(str(split)) if split else None
    return getattr(known, "num_examples", None) or None


def _stream_classes(
    train: Any, label: str | None, class_names: list[str] | None, num_classes: int | None
) -> tuple[Classes, str]:
    """(the classes, where they came from): a run's labels.json, no label column (one
    class), a ClassLabel feature's names, model.num_classes, else one pass over the training
    split's label column (no image read)."""
    if class_names is not None:
        return Classes.given(class_names), "the run's labels.json"
    if label is None:
        return Classes(["0"], ids=True), "data.label_column=null: one class"
    feature = (train.features or {}).get(label)
    if feature is not None and hasattr(feature, "names"):
        return Classes(list(feature.names), ids=True), f"the ClassLabel column {label!r}"
    if num_classes is not None:
        return Classes([str(i) for i in range(num_classes)], ids=True), (
            f"model.num_classes={num_classes}"
        )
    labels = [row[label] for row in train.select_columns([label])]
    return classes_of(labels), f"one pass over the training labels ({label!r})"
