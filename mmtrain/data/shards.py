"""`webdataset`: image-text pairs streamed from tar shards in open_clip's layout.

Shards are named as webdataset names them: local paths, `pipe:COMMAND` or `http(s)://`
URLs, brace patterns (`data/{00000..00099}.tar`), lists; training shards may be a weighted
mixture of sets (`sources`) drawn with replacement (`resampled`). What a sample
holds and how its label is read is `mmtrain.data.samples`; how an epoch streams through
ranks and loader workers, with exact mid-epoch resume, is `mmtrain.data.shard_stream`.

The classes come from a run's labels.json, else `classes.txt` beside the training shards
(class names in id order: a `cls` file then holds a class id, open_clip's convention, and
a json label a class name), else model.num_classes (labels are class ids), else one scan
of the training labels under the rule of `mmtrain.data.labels`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from mmtrain.data.labels import Classes, classes_of
from mmtrain.data.samples import (
    CLASSES_FILE,
    SIZES_FILE,
    SampleChecker,
    ShardUnreachable,
    expand_shards,
    is_url,
    read_classes_file,
    require_webdataset,
    scan,
    shard_samples,
)
from mmtrain.data.shard_stream import Mixture, StreamSplit
from mmtrain.errors import UserError
from mmtrain.registry import register
from mmtrain.rules import Bounds

log = logging.getLogger("mmtrain")


@dataclass
class ShardSet:
    """One entry of `data.sources`: shards (a brace pattern, URLs, a list) and the share of
    the training samples drawn from them (weights are relative: 2 and 1 give 2/3 and 1/3)."""

    urls: str | list[str]
    weight: Annotated[float, Bounds(gt=0)] = 1.0


def _sizes(shards: list[str]) -> int | None:
    """The total samples of local `shards` from the sizes.json beside them, if it lists each."""
    if any(is_url(s) for s in shards):
        return None
    path = Path(shards[0]).parent / SIZES_FILE
    if not path.is_file():
        return None
    try:
        sizes = json.loads(path.read_text())
        return sum(int(sizes[Path(s).name]) for s in shards)
    except (ValueError, KeyError, TypeError):
        log.warning("%s does not list every shard; counting the samples instead", path)
        return None


def _count(
    shards: dict[str, list[str]],
    label_key: str | None,
    scan_labels: bool,
    on_bad_sample: str,
    retries: int,
    epoch: int | None,
) -> tuple[dict[str, int], list[Any] | None, list[str] | None]:
    """(samples per split, the training labels and texts when they were scanned): a split
    is scanned once when no sizes.json counts it, or for its labels (`scan_labels`), but
    for training shards counted by `epoch` (data.samples_per_epoch). A damaged shard stops
    it (on_bad_sample=error) or has its unreadable tail skipped."""
    counts: dict[str, int] = {}
    texts, labels = None, None
    for split, paths in shards.items():
        known = epoch if split == "train" and epoch is not None else _sizes(paths)
        if known is None or (split == "train" and scan_labels):
            try:
                found, found_labels, found_texts, damaged = scan(paths, label_key, retries)
            except ShardUnreachable as error:
                raise UserError(f"data.{split}: {error}") from None
            _settle_damaged(split, damaged, on_bad_sample)
            log.info(
                "  scanned the %s shards once: %d shards, %d samples", split, len(paths), sum(found)
            )
            known = known if known is not None else sum(found)
            if split == "train":
                labels, texts = found_labels, found_texts
        counts[split] = known
    return counts, labels, texts


def _settle_damaged(split: str, damaged: list[str], on_bad_sample: str) -> None:
    """Shards that end in damage (truncated): a UserError under `error`; counted and their
    samples before the damage kept under `skip`."""
    if not damaged:
        return
    listing = "\n".join(f"  {line}" for line in damaged)
    if on_bad_sample == "error":
        raise UserError(
            f"{len(damaged)} {split} shard(s) cannot be read to their end (truncated or "
            f"damaged):\n{listing}\nWrite them again, or set data.on_bad_sample=skip to "
            "train on the samples before the damage."
        )
    log.warning(
        "skipped the unreadable tail of %d %s shard(s) (data.on_bad_sample=skip):\n%s",
        len(damaged), split, listing,
    )  # fmt: skip


def _classes(
    home: Path | None, label_key: str | None, num_classes: int | None, labels: list[Any] | None
) -> tuple[Classes, str]:
    """(the classes, where they came from) when no run's labels.json gives them."""
    if label_key is None:
        return Classes(["0"], ids=True), "data.label_key=null: one class"
    names = read_classes_file(home) if home is not None else None
    if names is not None:
        return Classes(names, ids=False), f"{home / CLASSES_FILE} ({len(names)} names)"
    if num_classes is not None:
        return Classes([str(i) for i in range(num_classes)], ids=True), (
            f"model.num_classes={num_classes}"
        )
    classes = classes_of(labels or [])
    return classes, f"one scan of the training labels ({len(classes.names)} classes)"


@register("data", "webdataset")
def webdataset(
    *,
    image_size: int,
    train: str | list[str] | None = None,
    val: str | list[str] | None = None,
    test: str | list[str] | None = None,
    sources: list[ShardSet] | None = None,
    resampled: bool | None = None,
    samples_per_epoch: Annotated[int, Bounds(ge=1)] | None = None,
    retries: Annotated[int, Bounds(ge=0)] = 3,
    shuffle_buffer: Annotated[int, Bounds(ge=1)] = 1000,
    label_key: str | None = "label",
    max_image_pixels: Annotated[int, Bounds(ge=1)] = 100_000_000,
    on_bad_sample: Literal["error", "skip"] = "error",
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    full_check: bool = False,
) -> dict[str, StreamSplit]:
    """Image-text pairs streamed from webdataset tar shards (`train` or a weighted mixture
    of `sources`, `val`, optional `test`: local paths, URLs, brace patterns or lists). An
    epoch is `samples_per_epoch` training samples (null: every sample, counted from
    sizes.json beside the shards or one scan; required for remote or `resampled` training
    shards). Labels: `cls`, else the json field `label_key` (null: no labels, one class);
    class names from a run's labels.json, classes.txt beside the shards, model.num_classes,
    or one scan."""
    require_webdataset()
    if val is None or (train is None and sources is None and class_names is None):
        raise UserError(
            "data=webdataset needs data.train=SHARDS (or data.sources) and data.val=SHARDS "
            "(brace patterns such as data/train-{00000..00099}.tar, lists of .tar files, or "
            "URLs: pipe:COMMAND, https://...); data.test is optional."
        )
    sets, mixture = _training_sets(train, sources, resampled, samples_per_epoch, retries)
    given = {"val": val, "test": test}
    shards = {k: expand_shards(v, k) for k, v in given.items() if v is not None}
    if sets:
        shards = {"train": [shard for group in sets for shard in group], **shards}
    local = [s for group in shards.values() for s in group if not is_url(s)]
    home = Path(local[0]).parent if local else None
    cls_ids = home is not None and (home / CLASSES_FILE).is_file()  # a cls file: a class id
    scan_labels = class_names is None and label_key is not None
    scan_labels = scan_labels and not cls_ids and num_classes is None
    by_epoch = samples_per_epoch if sets and (mixture or _remote(sets)) else None
    if by_epoch and scan_labels and _remote(sets):
        raise UserError(
            "The training shards are remote: mmtrain does not read them all to find the "
            "classes. Set model.num_classes=K (cls files hold class ids 0..K-1), or "
            "data.label_key=null for unlabelled pairs (contrastive models)."
        )
    counts, labels, texts = _count(shards, label_key, scan_labels, on_bad_sample, retries, by_epoch)
    if class_names is not None:
        classes, origin = Classes.given(class_names), "the run's labels.json"
    else:
        classes, origin = _classes(home, label_key, num_classes, labels)
    if not classes.names:
        raise UserError(
            f"The training shards hold no label (no cls file and no {label_key!r} json field); "
            "set data.label_key to the json field that holds it, or data.label_key=null for "
            "unlabelled pairs (contrastive models)."
        )
    log.info("  classes from %s", origin)
    checker = SampleChecker(classes, label_key, image_size, max_image_pixels, cls_ids)
    splits = {}
    for split, paths in shards.items():
        train_split = split == "train"
        samples = samples_per_epoch if train_split and samples_per_epoch else counts[split]
        splits[split] = StreamSplit(
            split, paths, samples, checker, shuffle_buffer, on_bad_sample,
            texts if train_split else None, mixture if train_split else None, retries,
        )  # fmt: skip
        if full_check:
            splits[split].check_all()
    return splits


def _remote(sets: list[list[str]]) -> bool:
    return any(is_url(shard) for group in sets for shard in group)


def _training_sets(
    train: str | list[str] | None,
    sources: list[ShardSet] | None,
    resampled: bool | None,
    samples_per_epoch: int | None,
    retries: int,
) -> tuple[list[list[str]], Mixture | None]:
    """(the training shard sets, their `Mixture` when shards are drawn with replacement).
    Remote sets are probed (their first shard is opened) before training."""
    if train is not None and sources is not None:
        raise UserError("Give data.train or data.sources (a weighted mixture), not both.")
    if sources is not None and resampled is False:
        raise UserError(
            "data.sources mixes its shard sets by drawing shards with replacement in "
            "proportion to their weights: set data.resampled=true (or leave it null)."
        )
    if train is None and sources is None:
        return [], None
    named = [("train", train)] if train is not None else []
    named += [(f"sources[{i}].urls", s.urls) for i, s in enumerate(sources or [])]
    sets = [expand_shards(urls, key) for key, urls in named]
    draw = resampled if resampled is not None else sources is not None
    if (draw or _remote(sets)) and samples_per_epoch is None:
        why = "drawn with replacement (data.resampled)" if draw else "remote (URLs)"
        raise UserError(
            f"The training shards are {why}: mmtrain cannot count an epoch by reading them "
            "all. Set data.samples_per_epoch=N (the training samples of one epoch)."
        )
    for (key, _), group in zip(named, sets, strict=True):
        if is_url(group[0]):
            try:
                next(shard_samples(group[:1], lambda error: True, retries), None)
            except ShardUnreachable as error:
                raise UserError(f"data.{key}: {error}") from None
    weights = [s.weight for s in sources] if sources is not None else [1.0]
    log.info(
        "  training shards: %d in %d set(s), %s", sum(map(len, sets)), len(sets),
        f"drawn with replacement, weights {weights}" if draw else "each read once an epoch",
    )  # fmt: skip
    return sets, (Mixture(sets, weights) if draw else None)
