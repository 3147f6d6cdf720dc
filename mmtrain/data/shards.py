"""`webdataset`: image-text pairs streamed from tar shards in open_clip's layout.

Each sample of a shard is a group of files with one key: an image (`jpg`, `jpeg`, `png` or
`webp`), a caption (`txt`), and optionally a label: `cls` (an integer class id) or `json`
(its `data.label_key` field, a class id or a class name). Shards are named by a brace
pattern (`data/{00000..00099}.tar`) or listed.

The training stream of an epoch is fixed by (seed, epoch) and the readers (ranks x loader
workers): the shards are permuted by (seed, epoch) and dealt to the readers, each reader
shuffles its samples in a buffer seeded by (seed, epoch, reader) and yields the same number
of full batches, so the DataLoader's round-robin order is fixed too. A resumed run re-reads
the epoch's samples before its position without decoding them and continues with the very
batch it stopped before (see `StreamLoader`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import random
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmtrain.data.images import ImageProblem, load_image
from mmtrain.data.manifest import class_names_of
from mmtrain.data.source import BadRow
from mmtrain.errors import UserError
from mmtrain.registry import register
from mmtrain.rules import Bounds

log = logging.getLogger("mmtrain")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CLASSES_FILE = "classes.txt"  # beside the shards: one class name per line, in id order
SIZES_FILE = "sizes.json"  # beside the shards: {shard file name: samples} (open_clip's)
REASONS = (
    "missing image",
    "unreadable image",
    "image too large",
    "missing text",
    "empty text",
    "missing label",
    "invalid label",
    "label out of range",
    "unknown label",
    "unreadable shard",
)
INSTALL = "pip install 'mmtrain[webdataset]'"
SHARD_STRIDE = 10_000_000  # sample index = shard number * SHARD_STRIDE + place in the shard


def require_webdataset() -> Any:
    """The `webdataset` module, or a UserError with the install command."""
    try:
        import webdataset
    except ImportError:
        raise UserError(f"data=webdataset needs the webdataset library: {INSTALL}") from None
    return webdataset


def expand_shards(spec: str | list[str], key: str) -> list[Path]:
    """The shard files of a brace pattern (or a list of patterns); each must exist."""
    from braceexpand import braceexpand

    patterns = [spec] if isinstance(spec, str) else list(spec)
    paths = [Path(p).expanduser() for pattern in patterns for p in braceexpand(str(pattern))]
    missing = [str(p) for p in paths if not p.is_file()]
    if not paths or missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(
            f"data.{key}={spec}: "
            + (
                f"{len(missing)} shard file(s) do not exist ({shown})"
                if missing
                else "names no shard"
            )
            + ". Give a brace pattern such as data/{00000..00099}.tar, or a list of .tar files."
        )
    return [p.resolve() for p in paths]


class SampleChecker:
    """Turns one raw sample (a dict of bytes) into (image, text, label) or a problem."""

    def __init__(
        self,
        class_names: list[str],
        integer: bool,
        label_key: str | None,
        size: int,
        max_pixels: int,
    ):
        self.class_names, self.integer, self.label_key = class_names, integer, label_key
        self.ids = {name: i for i, name in enumerate(class_names)}
        self.size, self.max_pixels = size, max_pixels

    def label(self, sample: dict[str, Any]) -> tuple[int | None, tuple[str, str] | None]:
        if self.label_key is None:
            return 0, None
        value = raw_label(sample, self.label_key)
        if value is None:
            return None, ("missing label", f"no cls file and no {self.label_key!r} field in json")
        if isinstance(value, bool) or not isinstance(value, int | str):
            return None, ("invalid label", f"the label {value!r} is not an integer or a string")
        if self.integer and (isinstance(value, int) or value.strip().lstrip("-").isdigit()):
            number = int(value)
            if 0 <= number < len(self.class_names):
                return number, None
            return None, (
                "label out of range",
                f"the label {number} is not a class id in 0..{len(self.class_names) - 1}; "
                "set model.num_classes to the number of classes",
            )
        if str(value) in self.ids:
            return self.ids[str(value)], None
        return None, ("unknown label", f"the label {value!r} is not a known class name")

    def __call__(
        self, sample: dict[str, Any], decode: bool = True
    ) -> tuple[Any, tuple[str, str] | None]:
        """((image or None, text, label), None) or (None, (reason, detail))."""
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        image_key = next((k for k in IMAGE_KEYS if k in sample), None)
        if image_key is None:
            return None, ("missing image", f"{name} has no {'/'.join(IMAGE_KEYS)} file")
        text = sample.get("txt")
        if text is None:
            return None, ("missing text", f"{name} has no txt file")
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
        if not text.strip():
            return None, ("empty text", f"{name}: the text is empty")
        label, problem = self.label(sample)
        if problem is not None:
            return None, (problem[0], f"{name}: {problem[1]}")
        image = None
        if decode:
            try:
                data = io.BytesIO(sample[image_key])
                pixels = load_image(data, self.size, self.max_pixels, f"{name}.{image_key}")
            except ImageProblem as error:
                return None, (error.reason, error.detail)
            image = torch.from_numpy(pixels.copy())
        return (image, text, label), None


def raw_label(sample: dict[str, Any], label_key: str) -> int | str | None:
    """A sample's label as stored: the cls file's integer, else the json field."""
    if "cls" in sample:
        text = sample["cls"].decode() if isinstance(sample["cls"], bytes) else str(sample["cls"])
        return int(text.strip()) if text.strip().lstrip("-").isdigit() else text.strip()
    if "json" in sample:
        try:
            record = json.loads(sample["json"])
        except (ValueError, TypeError):
            return None
        return record.get(label_key) if isinstance(record, dict) else None
    return None


def scan(shards: list[Path], label_key: str | None) -> tuple[list[int], list[Any], list[str]]:
    """One pass over the shards' small members (images are skipped, not read): per shard its
    sample count, every label and every text."""
    counts, labels, texts = [], [], []
    for shard in shards:
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    entry = samples.setdefault(key, {})
                    if ext in ("txt", "cls", "json"):
                        entry[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as error:
            raise UserError(f"Cannot read the shard {shard}: {error}.") from None
        counts.append(len(samples))
        for entry in samples.values():
            texts.append(entry.get("txt", b"").decode("utf-8", errors="replace"))
            if label_key is not None:
                labels.append(raw_label(entry, label_key))
    return counts, labels, texts


class StreamSplit:
    """One split streamed from shards: what `SplitData` is for a cached manifest. `len` is
    the samples of one epoch; `texts` are read (once, on first use) only for a tokenizer
    built from the training texts."""

    def __init__(
        self, split: str, shards: list[Path], samples: int, checker: SampleChecker,
        shuffle_buffer: int, on_bad_sample: str, texts: list[str] | None = None,
    ):  # fmt: skip
        self.split, self.shards, self.samples, self.checker = split, shards, samples, checker
        self.shuffle_buffer, self.on_bad_sample = shuffle_buffer, on_bad_sample
        self.class_names = checker.class_names
        self._texts = texts
        self.negatives = None
        self.aspects = None  # images are decoded to the model's input as they stream
        self.found_bad: list[BadRow] = []  # filled by `check_all` (mmtrain validate)
        # Bad samples met while streaming, per reason: shared with the loader workers.
        self.counts = multiprocessing.get_context("fork").Array("q", len(REASONS))

    def __len__(self) -> int:
        return self.samples

    @property
    def texts(self) -> list[str]:
        if self._texts is None:
            self._texts = scan(self.shards, None)[2]
        return self._texts

    @property
    def bad_rows(self) -> list[BadRow]:
        """The bad samples found so far: listed by `check_all`, counted while streaming."""
        found = list(self.found_bad)
        for reason, count in zip(REASONS, self.counts[:], strict=True):
            found += [BadRow(self.split, "(streamed)", 0, reason, "")] * count
        return found

    def check_all(self) -> None:
        """Decode every sample once (`mmtrain validate`) and list the bad ones."""
        wds = require_webdataset()
        for sample in wds.tarfile_to_samples(handler=self._tar_problem)(
            [{"url": str(s)} for s in self.shards]
        ):
            _, problem = self.checker(sample)
            if problem is not None:
                where = str(sample.get("__url__", ""))
                self.found_bad.append(BadRow(self.split, where, 0, *problem))
        self.samples -= len(self.found_bad)

    def _tar_problem(self, error: Exception) -> bool:
        self.found_bad.append(BadRow(self.split, "", 0, "unreadable shard", str(error)))
        return True

    def count_bad(self, reason: str, detail: str) -> None:
        """A bad sample met while streaming: stop (error) or count and go on (skip)."""
        if self.on_bad_sample == "error":
            raise BadSample(
                f"bad sample in the {self.split} shards: {reason}: {detail}. Fix or remove it, "
                "or set data.on_bad_sample=skip to train without it (it is then counted); "
                "`mmtrain validate` lists every bad sample."
            )
        with self.counts.get_lock():
            self.counts[REASONS.index(reason)] += 1
        log.warning("skipped a bad sample: %s: %s", reason, detail)


class BadSample(UserError):
    """A bad sample met while streaming under data.on_bad_sample=error."""


class ShardStream(IterableDataset):
    """The rows of one epoch of a `StreamSplit`, as this loader worker reads them."""

    def __init__(
        self, split: StreamSplit, *, train: bool, seed: int, rank: int, world_size: int,
        batch_size: int, tag_epoch: bool,
    ):  # fmt: skip
        self.split, self.train, self.seed = split, train, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.tag_epoch = tag_epoch
        self.epoch, self.start_batch = 0, 0
        self.batches_per_reader = 0  # set by StreamLoader: every reader yields this many

    def _raw(self, shards: list[Path]) -> Iterator[dict[str, Any]]:
        wds = require_webdataset()

        def unreadable(error: Exception) -> bool:
            self.split.count_bad("unreadable shard", str(error))
            return True

        samples = wds.tarfile_to_samples(handler=unreadable)([{"url": str(s)} for s in shards])
        # A sample's index names it in every epoch and run: its shard's place in the list
        # of shards, and its place in that shard.
        number = {str(shard): i for i, shard in enumerate(self.split.shards)}
        url, within = None, 0
        for sample in samples:
            if sample.get("__url__") != url:
                url, within = sample.get("__url__"), 0
            sample["__index__"] = number.get(url, 0) * SHARD_STRIDE + within
            within += 1
            yield sample

    def __iter__(self) -> Iterator[tuple]:
        wds = require_webdataset()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        if self.train:
            # The DataLoader asks its worker 0 first: resumed at batch B, worker 0 plays the
            # part of the reader whose turn batch B is, and the others follow in turn.
            worker = (worker + self.start_batch) % workers
        readers, reader = self.world_size * workers, self.rank * workers + worker
        shards = list(self.split.shards)
        if self.train:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(shards)
        mine = shards[reader::readers]
        if not self.train:
            for sample in self._raw(mine):
                row = self._row(sample)
                if row is not None:
                    yield row
            return

        quota = self.batches_per_reader * self.batch_size
        # The batches this worker already delivered this epoch (the DataLoader takes them
        # from its workers in turn): their samples are read again but not decoded.
        done = max(0, math.ceil((self.start_batch - worker) / workers)) * self.batch_size
        rng = random.Random(f"{self.seed}:{self.epoch}:{reader}")
        yielded, passes = 0, 0
        while yielded < quota:
            shuffled = wds.shuffle(self.split.shuffle_buffer, rng=rng)(self._raw(mine))
            empty = True
            for sample in shuffled:
                empty = False
                if yielded < done:  # resume: skip without decoding
                    if self.split.checker(sample, decode=False)[1] is None:
                        yielded += 1
                    continue
                row = self._row(sample)
                if row is None:
                    continue
                yield row
                yielded += 1
                if yielded >= quota:
                    return
            passes += 1
            if empty or passes > 100:
                return
            # This reader's shards hold fewer good samples than its share of the epoch:
            # it reads them again (reshuffled), as open_clip's epochs do.
            if passes == 1:
                log.warning(
                    "data.samples_per_epoch asks reader %d for %d samples but its shards hold "
                    "fewer: it reads them again this epoch", reader, quota,
                )  # fmt: skip

    def _row(self, sample: dict[str, Any]) -> tuple | None:
        decoded, problem = self.split.checker(sample)
        if problem is not None:
            self.split.count_bad(*problem)
            return None
        image, text, label = decoded
        epoch = self.epoch if self.tag_epoch else None
        return (sample["__index__"], image, text, label, True, epoch, None)


class StreamLoader:
    """A DataLoader over a `ShardStream` with what the training loop asks of a loader:
    `len` (batches left in the epoch) and `sampler.set_epoch(epoch, start)`.

    Every reader (rank x worker) yields `batches_per_reader` full batches, so the
    DataLoader's round-robin order over its workers is the same in every run: resuming at
    batch B of an epoch, worker w skips the samples of its batches before B. The resumed
    run sees the same batches as one never stopped, as long as data.num_workers, the
    number of ranks and data.batch_size are unchanged."""

    def __init__(
        self,
        stream: ShardStream,
        collate: Any,
        num_workers: int,
        pin_memory: bool,
        worker_init_fn: Any = None,
    ):
        self.stream, self.sampler = stream, self
        readers = stream.world_size * max(1, num_workers)
        self.workers = max(1, num_workers)
        split = stream.split
        if stream.train and len(split.shards) < readers:  # evaluation: idle readers are fine
            raise UserError(
                f"The {split.split} split has {len(split.shards)} shard(s) for {readers} readers "
                f"(ranks x data.num_workers); each reader needs its own shards. Set "
                f"data.num_workers to at most {max(1, len(split.shards) // stream.world_size)}, "
                "or write more, smaller shards (`mmtrain shards`)."
            )
        if stream.train:
            per_reader = split.samples // (readers * stream.batch_size)
            if per_reader < 1:
                raise UserError(
                    f"data.samples_per_epoch={split.samples} is less than one batch per reader "
                    f"({readers} readers x data.batch_size={stream.batch_size}); raise it or "
                    "lower data.batch_size / data.num_workers."
                )
            stream.batches_per_reader = per_reader
        self.loader = DataLoader(
            stream,
            batch_size=stream.batch_size,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin_memory,
            # Not persistent: each epoch's workers get the dataset with its epoch and start.
            persistent_workers=False,
            worker_init_fn=worker_init_fn,
            # Its own generator: starting workers then never draws from the global RNG,
            # which would shift dropout noise between a resumed run and an uninterrupted one.
            generator=torch.Generator().manual_seed(stream.seed),
        )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Stream `epoch`, beginning after its first `start` samples (this rank's)."""
        self.stream.epoch, self.stream.start_batch = epoch, start // self.stream.batch_size

    def __len__(self) -> int:
        if not self.stream.train:
            return math.ceil(
                self.stream.split.samples / (self.stream.batch_size * self.stream.world_size)
            )
        return self.stream.batches_per_reader * self.workers - self.stream.start_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        try:
            yield from self.loader
        except BadSample as error:  # from a worker: its message holds the worker's traceback
            raise UserError(str(error).rsplit("BadSample: ", 1)[-1].strip()) from None


def stream_loader(
    split: StreamSplit, collate: Any, *, batch_size: int, num_workers: int, shuffle: bool,
    seed: int, pin_memory: bool, rank: int, world_size: int, worker_init_fn: Any = None,
) -> StreamLoader:  # fmt: skip
    """The loader of a streamed split: shuffled and sized by samples_per_epoch for training,
    every sample once, in shard order, for evaluation."""
    stream = ShardStream(
        split, train=shuffle, seed=seed, rank=rank, world_size=world_size,
        batch_size=batch_size, tag_epoch=collate.needs_epoch,
    )  # fmt: skip
    return StreamLoader(stream, collate, num_workers, pin_memory, worker_init_fn)


def _class_names(
    shards: list[Path], label_key: str | None, num_classes: int | None, labels: list[Any] | None
) -> tuple[list[str], bool, str]:
    """(class names in id order, integer ids?, where they came from)."""
    if label_key is None:
        return ["0"], True, "data.label_key=null: one class"
    names_file = shards[0].parent / CLASSES_FILE
    if names_file.is_file():
        names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
        return names, False, f"{names_file} ({len(names)} names)"
    if num_classes is not None:
        return [str(i) for i in range(num_classes)], True, f"model.num_classes={num_classes}"
    keys = [str(v) for v in labels or [] if v is not None and not isinstance(v, bool)]
    names, integer = class_names_of(keys, None)
    return names, integer, f"one scan of the training labels ({len(names)} classes)"


@register("data", "webdataset")
def webdataset(
    *,
    image_size: int,
    train: str | list[str] | None = None,
    val: str | list[str] | None = None,
    test: str | list[str] | None = None,
    samples_per_epoch: Annotated[int, Bounds(ge=1)] | None = None,
    shuffle_buffer: Annotated[int, Bounds(ge=1)] = 1000,
    label_key: str | None = "label",
    max_image_pixels: Annotated[int, Bounds(ge=1)] = 100_000_000,
    on_bad_sample: Literal["error", "skip"] = "error",
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    full_check: bool = False,
) -> dict[str, StreamSplit]:
    """Image-text pairs streamed from webdataset tar shards (`train`, `val`, optional
    `test`: brace patterns or lists). An epoch is `samples_per_epoch` training samples
    (null: every sample, counted from sizes.json beside the shards or one scan). Labels:
    `cls`, else the json field `label_key` (null: no labels, one class); class names from
    a run's labels.json, classes.txt beside the shards, model.num_classes, or one scan."""
    require_webdataset()
    if val is None or (train is None and class_names is None):
        raise UserError(
            "data=webdataset needs data.train=SHARDS and data.val=SHARDS (brace patterns such "
            "as data/train-{00000..00099}.tar, or lists of .tar files); data.test is optional."
        )
    given = {"train": train, "val": val, "test": test}
    shards = {k: expand_shards(v, k) for k, v in given.items() if v is not None}
    counts: dict[str, int] = {}
    texts, labels = None, None
    for split, paths in shards.items():
        known = _sizes(paths)
        needs_labels = split == "train" and class_names is None and label_key is not None
        needs_labels = needs_labels and not (paths[0].parent / CLASSES_FILE).is_file()
        needs_labels = needs_labels and num_classes is None
        if known is None or needs_labels:
            found, found_labels, found_texts = scan(paths, label_key)
            log.info(
                "  scanned the %s shards once: %d shards, %d samples", split, len(paths), sum(found)
            )
            known = known if known is not None else sum(found)
            if split == "train":
                labels, texts = found_labels, found_texts
        counts[split] = known
    if class_names is not None:
        names, integer, origin = (
            list(class_names),
            class_names == [str(i) for i in range(len(class_names))],
            "the run's labels.json",
        )
    else:
        names, integer, origin = _class_names(shards["train"], label_key, num_classes, labels)
    if not names:
        raise UserError(
            f"The training shards hold no label (no cls file and no {label_key!r} json field); "
            "set data.label_key to the json field that holds it, or data.label_key=null for "
            "unlabelled pairs (contrastive models)."
        )
    log.info("  classes from %s", origin)
    checker = SampleChecker(names, integer, label_key, image_size, max_image_pixels)
    splits = {}
    for split, paths in shards.items():
        samples = counts[split]
        if split == "train" and samples_per_epoch is not None:
            samples = samples_per_epoch
        splits[split] = StreamSplit(
            split, paths, samples, checker, shuffle_buffer, on_bad_sample,
            texts if split == "train" else None,
        )  # fmt: skip
        if full_check:
            splits[split].check_all()
    return splits


def _sizes(shards: list[Path]) -> int | None:
    """The total samples of `shards` from the sizes.json beside them, if it lists each."""
    path = shards[0].parent / SIZES_FILE
    if not path.is_file():
        return None
    try:
        sizes = json.loads(path.read_text())
        return sum(int(sizes[s.name]) for s in shards)
    except (ValueError, KeyError, TypeError):
        log.warning("%s does not list every shard; counting the samples instead", path)
        return None
