"""Datasets, the resumable sampler and the collate function that tokenizes per batch."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mmtrain.data import geometry
from mmtrain.data.augment import TextAugment
from mmtrain.data.shard_stream import StreamSplit, stream_loader
from mmtrain.data.source import SplitData

# What the dataset yields per row and the collate stacks: (index, uint8 image, text, label,
# paired, epoch, negatives, aspect of a whole picture or None).
Item = tuple[int, torch.Tensor, str, int, bool, int | None, list[str] | None, float | None]


class PairDataset(Dataset):
    """The items of one split.

    A key is a row index, or (epoch, index) from a sampler with `tag_epoch`: the epoch is
    passed on so that text augmentation can depend on (seed, epoch, index) alone.
    A split of whole pictures (a cache) is cut here to the processor's centre square at the
    model's size, unless `whole`: then the picture is handed over as stored, with its aspect,
    for the device's random_resized_crop to cut (`mmtrain.data.augment`).
    """

    def __init__(self, split: SplitData, whole: bool = False):
        self.split, self.whole = split, whole and split.aspects is not None

    def _image(self, index: int) -> torch.Tensor:
        split = self.split
        image = split.image(index)
        if split.aspects is None or self.whole:
            return image
        box = geometry.centre_square(split.aspect(index))
        return geometry.crop(image, box, split.image_size)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> Item:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        split = self.split
        return (
            index,
            self._image(index),
            split.texts[index],
            int(split.labels[index]),
            bool(split.paired[index]),
            epoch,
            split.negatives[index] if split.negatives is not None else None,
            split.aspect(index) if self.whole else None,
        )


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation that depends only on (seed, epoch).

    `start` skips the first samples of the epoch without reading them, which is how a
    run resumed mid-epoch continues at the exact next batch. With `world_size` > 1 each
    rank takes every world_size-th index of the same permutation (padded to divide evenly).
    With `tag_epoch` it yields (epoch, index) pairs instead of indices.
    """

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        tag_epoch: bool = False,
        pad: bool = True,
    ):
        self.size, self.shuffle, self.seed, self.tag_epoch = size, shuffle, seed, tag_epoch
        self.rank, self.world_size, self.pad = rank, world_size, pad
        # Training pads so every rank takes the same number of steps; evaluation does not,
        # so no row is counted twice.
        self.per_rank = math.ceil(size / world_size) if pad else len(range(rank, size, world_size))
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the permutation of `epoch` and begin at its `start`-th sample (per rank)."""
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.pad:
            order += order[: self.per_rank * self.world_size - self.size]
        mine = order[self.rank :: self.world_size][self.start :]
        return iter([(self.epoch, index) for index in mine] if self.tag_epoch else mine)

    def __len__(self) -> int:
        return self.per_rank - self.start


class Collate:
    """Stack images and labels; tokenize texts padded to the batch's longest, rounded up to
    a multiple of 8 (tensor-core friendly) when the backbone's length allows, or to
    `max_length` when `pad_to_max_length` (SigLIP pools its text at the last position). With
    `text_augment`, each text is augmented first (keyed by its row's epoch and index)."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        text_augment: TextAugment | None = None,
        negatives: Callable[[str, int, int, list[str] | None], list[str]] | None = None,
        pad_to_max_length: bool = False,
    ):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.padding = "max_length" if pad_to_max_length else "longest"
        self.text_augment, self.negatives = text_augment, negatives
        # Both depend on (seed, epoch, index): the sampler must pass the epoch along.
        self.needs_epoch = text_augment is not None or negatives is not None
        # Rounding up must never pass the backbone's last text position.
        self.multiple = 8 if max_length % 8 == 0 else None

    def __call__(self, items: list[Item]) -> dict[str, torch.Tensor]:
        indices, images, texts, labels, paired, epochs, row_negatives, aspects = zip(
            *items, strict=True
        )
        captions = texts  # negatives are drawn from the caption before augmentation
        if self.text_augment is not None:
            texts = [
                self.text_augment(text, epoch or 0, index)
                for text, epoch, index in zip(texts, epochs, indices, strict=True)
            ]
        tokens = self._tokenize(list(texts))
        batch = {
            "index": torch.tensor(indices),
            "images": torch.stack(images),
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "labels": torch.tensor(labels),
            "paired": torch.tensor(paired),
        }
        if aspects[0] is not None:  # whole pictures, for the device's crop
            batch["aspects"] = torch.tensor(aspects, dtype=torch.float32)
        if self.negatives is not None:  # K hard-negative texts per row, row after row
            negatives = [
                negative
                for text, epoch, index, own in zip(
                    captions, epochs, indices, row_negatives, strict=True
                )
                for negative in self.negatives(text, epoch or 0, index, own)
            ]
            tokens = self._tokenize(negatives)
            batch["negative_input_ids"] = tokens["input_ids"]
            batch["negative_attention_mask"] = tokens["attention_mask"]
        return batch

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts,
            padding=self.padding,
            pad_to_multiple_of=self.multiple,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """Loader workers let the main process handle SIGINT/SIGTERM. Clusters, `timeout` and
    terminals signal the whole process group; a worker that died of it would end the run with
    an error instead of the main process's orderly stop (finish the step, save, exit).

    So a worker leaves the process group, ignores SIGINT, and of SIGTERMs (which may still
    come to every process of a job, as SLURM sends them) heeds only the main process's, the
    DataLoader's own way to end it: a thread reads each one's sender. (A worker also exits on
    its own when the main process is gone: at once, through the kernel, see `_die_with_parent`.)"""
    _die_with_parent()
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True).start()


def _die_with_parent() -> None:
    """Have the kernel kill this worker the moment its parent dies (Linux PR_SET_PDEATHSIG):
    a worker outliving a `kill -9` of the run would hold its memory and files for seconds
    (torch's own check of the parent runs every 5 s)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)


PR_SET_PDEATHSIG = 1


def _end_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # as asked: not a failure the DataLoader should report


def make_loader(
    split: SplitData,
    collate: Collate,
    *,
    batch_size: int,
    num_workers: int,
    shuffle: bool,
    seed: int,
    pin_memory: bool = False,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    whole: bool = False,
) -> DataLoader:
    """A DataLoader over `split` whose order is set by an EpochSampler (see `loader.sampler`);
    with `world_size` > 1, this rank's share of it. `whole`: a split of whole pictures hands
    them over uncut (see `PairDataset`). A streamed split gets a `StreamLoader`."""
    if isinstance(split, StreamSplit):
        return stream_loader(
            split, collate, batch_size=batch_size, num_workers=num_workers, shuffle=shuffle,
            seed=seed, pin_memory=pin_memory, rank=rank, world_size=world_size,
            worker_init_fn=_leave_stop_signals_to_the_main_process,
        )  # fmt: skip
    sampler = EpochSampler(
        len(split),
        shuffle=shuffle,
        seed=seed,
        rank=rank,
        world_size=world_size,
        tag_epoch=collate.needs_epoch,
        pad=shuffle,
    )
    return DataLoader(
        PairDataset(split, whole),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        worker_init_fn=_leave_stop_signals_to_the_main_process,
        # Its own generator: creating an iterator then never draws from the global RNG,
        # which would shift dropout noise between a resumed run and an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )


def close_workers(loader: DataLoader) -> None:
    """End `loader`'s persistent worker processes now, the orderly way (the DataLoader's own
    shutdown), rather than leaving them to the interpreter's exit."""
    loader = getattr(loader, "loader", loader)  # a StreamLoader's own DataLoader
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None
