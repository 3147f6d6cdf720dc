"""Streaming a webdataset split: the samples of an epoch, dealt to ranks and loader workers.

The training stream of an epoch is fixed by (seed, epoch) and the readers (ranks x loader
workers): the shards are permuted by (seed, epoch) and dealt to the readers, each reader
shuffles its samples in a buffer seeded by (seed, epoch, reader) and yields the same number
of full batches, so the DataLoader's round-robin order is fixed too. A resumed run re-reads
the epoch's samples before its position without decoding them and continues with the very
batch it stopped before (see `StreamLoader`). Shards drawn with replacement (`Mixture`:
data.resampled, data.sources) are drawn by a generator seeded by (seed, epoch, reader), so
their stream is as fixed as a permutation's. The `webdataset` source
(`mmtrain.data.shards`) makes the `StreamSplit`s; `stream_loader` is their loader.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmtrain.data.samples import (
    SampleChecker,
    ShardUnreachable,
    require_webdataset,
    scan,
    shard_samples,
)
from mmtrain.data.source import BadRow
from mmtrain.errors import UserError

log = logging.getLogger("mmtrain")
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
STOPPED = (
    "The run stops here; its checkpoints are whole: once the shard can be read, resume it "
    "with `mmtrain resume RUN_DIR`."
)
SHARD_STRIDE = 10_000_000  # sample index = shard number * SHARD_STRIDE + place in the shard


@dataclass(frozen=True)
class Mixture:
    """Shards drawn with replacement (data.resampled): each draw picks a shard set by its
    weight (data.sources), then one of its shards, each as likely."""

    sets: list[list[str]]
    weights: list[float]

    def draw(self, rng: random.Random, count: int) -> Iterator[str]:
        """`count` shards drawn with `rng`."""
        places = range(len(self.sets))
        for _ in range(count):
            yield rng.choice(self.sets[rng.choices(places, weights=self.weights)[0]])


class StreamSplit:
    """One split streamed from shards: what `SplitData` is for a cached manifest. `len` is
    the samples of one epoch; `texts` are read (once, on first use) only for a tokenizer
    built from the training texts."""

    def __init__(
        self, split: str, shards: list[str], samples: int, checker: SampleChecker,
        shuffle_buffer: int, on_bad_sample: str, texts: list[str] | None = None,
        mixture: Mixture | None = None, retries: int = 0,
    ):  # fmt: skip
        self.split, self.shards, self.samples, self.checker = split, shards, samples, checker
        self.mixture, self.retries = mixture, retries
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
        """Every text of the split's shards (read once, on first use)."""
        if self._texts is None:
            self._texts = scan(self.shards, None, self.retries)[2]
        return self._texts

    @property
    def bad_rows(self) -> list[BadRow]:
        """The bad samples found so far: listed by `check_all`, counted while streaming."""
        found = list(self.found_bad)
        for reason, count in zip(REASONS, self.counts[:], strict=True):
            found += [BadRow(self.split, "(streamed)", 0, reason, "")] * count
        return found

    def read(self, shards: Iterable[str], handler: Any) -> Iterator[dict[str, Any]]:
        """The raw samples of `shards`, each with `__place__` and `__url__` (a streamed
        Hugging Face split reads its own: `mmtrain.data.hf_stream`)."""
        return shard_samples(shards, handler, self.retries)

    def check_all(self) -> None:
        """Decode every sample once (`mmtrain validate`) and list the bad ones."""
        for sample in self.read(self.shards, self._tar_problem):
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

    def _raw(self, shards: Iterable[str]) -> Iterator[dict[str, Any]]:
        def unreadable(error: Exception) -> bool:
            self.split.count_bad("unreadable shard", str(error))
            return True

        samples = self.split.read(shards, unreadable)
        # A sample's index names it in every epoch and run: its shard's place in the list
        # of shards, and its place in that shard.
        number = {str(shard): i for i, shard in enumerate(self.split.shards)}
        for sample in samples:
            place = sample["__place__"]
            sample["__index__"] = number.get(sample.get("__url__"), 0) * SHARD_STRIDE + place
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
        mixture = self.split.mixture
        draws = random.Random(f"{self.seed}:{self.epoch}:{reader}:shards")
        while yielded < quota:
            if mixture is not None:  # drawn with replacement: as many as could be needed
                mine = mixture.draw(draws, quota + len(shards))
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
        return (sample["__index__"], image, text, label, True, epoch, None, None)


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
        if (
            stream.train and split.mixture is None and len(split.shards) < readers
        ):  # evaluation: idle readers are fine
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
        except (BadSample, ShardUnreachable) as error:
            # From a worker its message holds the worker's traceback: keep the last line.
            kind = type(error)
            message = str(error).rsplit(f"{kind.__name__}: ", 1)[-1].strip()
            if kind is ShardUnreachable:
                raise ShardUnreachable(f"{message} {STOPPED}") from None
            raise UserError(message) from None


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
