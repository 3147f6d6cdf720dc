"""A training run's objects from its spec: data aligned to the backbone, the tokenizer, the
model, the loaders, the optimizer and schedule, zero-shot prompts and the trackers.

What the model asks of the data (image size, mean/std, text length, padding) arrives as a
`BackboneSpec` read from the backbone's config before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mmtrain import distributed, loggers, registry, sharding
from mmtrain.data import augment as aug
from mmtrain.data.loader import Collate, make_loader
from mmtrain.data.negatives import NegativeSampler
from mmtrain.data.source import SplitData, bad_samples, save_class_names
from mmtrain.data.summary import summarize
from mmtrain.data.tokenizer import build_word_tokenizer, load_named_tokenizer, save_tokenizer
from mmtrain.devices import autocast_for, resolve_precision
from mmtrain.errors import UserError
from mmtrain.metrics import positive_class
from mmtrain.models.backbone import BackboneSpec, backbone_spec, load_tokenizer
from mmtrain.models.interface import Model
from mmtrain.models.towers import DUAL, check_vocabulary
from mmtrain.models.zeroshot import ZeroShotTask
from mmtrain.run import Run
from mmtrain.spec import Component, RunSpec, metric_names, total_steps
from mmtrain.watch import ChanceWatch

log = logging.getLogger("mmtrain")


# --- data, tokenizer and model ------------------------------------------------------------


def backbone(spec: RunSpec) -> BackboneSpec:
    """What the backbone asks of the data (size, mean/std, text length), loading no weights."""
    options = spec.model.options
    if spec.trust_remote_code:
        log.warning(
            "model.trust_remote_code=true: transformers may run the code that the backbone's or "
            "tokenizer's folder names (auto_map). Only for folders from a source you trust."
        )
    return backbone_spec(
        options.get("backbone"), options.get("backbone_config"), spec.trust_remote_code
    )


def data(
    spec: RunSpec,
    shape: BackboneSpec,
    class_names: list[str] | None = None,
    full_check: bool = False,
) -> dict[str, SplitData]:
    """The data source's splits at the backbone's image size; `class_names` (a run's
    labels.json) fixes the label mapping; `full_check` (validate) checks every cached pixel
    or decoded sample."""
    log.info("building data %s at %d px", spec.data.name, shape.image_size)
    splits = spec.data.build(
        image_size=shape.image_size,
        class_names=class_names,
        num_classes=spec.model.options.get("num_classes"),
        full_check=full_check,
    )
    for name, split in splits.items():
        log.info("  %s: %d pairs", name, len(split))
    return splits


def num_classes(spec: RunSpec, class_names: list[str]) -> int:
    """The number of classes: inferred from the data, or model.num_classes if it agrees."""
    count, given = len(class_names), spec.model.options.get("num_classes")
    if given not in (None, count):
        shown = ", ".join(class_names[:20]) + (" ..." if count > 20 else "")
        raise UserError(
            f"model.num_classes={given} but the data has {count} classes ({shown}); set "
            f"model.num_classes={count} or null to infer it."
        )
    return count


def tokenizer(spec: RunSpec, train_texts: list[str], shape: BackboneSpec | None = None) -> Any:
    """The tokenizer model.tokenizer names, else the pretrained backbone's own, else a
    word-level one built from the training texts (a backbone built from a config takes its
    vocabulary size from the tokenizer); `shape` (the backbone's) checks that it fits."""
    name = spec.model.options.get("backbone")
    if spec.tokenizer is not None:
        named = load_named_tokenizer(spec.tokenizer, spec.trust_remote_code)
        log.info("tokenizer: model.tokenizer=%s, %d tokens", spec.tokenizer, len(named))
        if shape is not None:
            check_vocabulary(named, shape.vocab_size, f"model.tokenizer={spec.tokenizer!r}")
        return named
    if name is not None:
        own = load_tokenizer(name, spec.trust_remote_code)
        if shape is not None and shape.family == DUAL:  # two towers saved side by side
            check_vocabulary(own, shape.vocab_size, f"model.backbone={name!r}")
        return own
    built = build_word_tokenizer(train_texts)
    log.info("built a word-level tokenizer from the training texts: %d tokens", len(built))
    return built


def model(spec: RunSpec, tok: Any, shape: BackboneSpec, class_names: list[str] | None) -> Model:
    """The model of `spec.model`, with the data's number of classes where it takes one."""
    options = dict(spec.model.options)
    if "num_classes" in options:
        options["num_classes"] = num_classes(spec, class_names or [])
    scored = positive(spec, class_names)
    log.info("building model %s", spec.model.name)
    chosen = dataclasses.replace(spec.model, options=options)
    built = chosen.build(tokenizer=tok, spec=shape, positive_class=scored)
    trainable = sum(p.numel() for p in built.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in built.parameters() if not p.requires_grad)
    log.info(
        "  %s parameters: %s trainable, %s frozen",
        f"{trainable + frozen:,}", f"{trainable:,}", f"{frozen:,}",
    )  # fmt: skip
    return built


def positive(spec: RunSpec, class_names: list[str] | None) -> int | None:
    """The class a classifier's binary metrics score (data.positive_label, checked against
    the labels); None for a model that reports no such metrics."""
    given = spec.batches.positive_label
    if not registry.accepted("model", spec.model.name, {"positive_class": None}):
        if given is not None:
            log.warning(
                "data.positive_label=%s is not used: model %s reports no per-class metrics.",
                given, spec.model.name,
            )  # fmt: skip
        return None
    return positive_class(class_names or [], given)


def zeroshot(spec: RunSpec, split: SplitData, tok: Any, length: int) -> ZeroShotTask | None:
    """Zero-shot classification of `split`'s images as the zeroshot group says, when the
    model embeds images and texts and the split has image classes; else None."""
    if not spec.traits.embeds:
        return None
    task = spec.zeroshot.build(classes=split.zeroshot_classes(), tokenizer=tok, max_length=length)
    if task is not None:
        log.info(
            "zero-shot classification: %d classes, %d prompt templates (%r%s)",
            len(task.class_names), len(task.templates), task.templates[0],
            ", ..." if len(task.templates) > 1 else "",
        )  # fmt: skip
    return task


def references(
    spec: RunSpec, shape: BackboneSpec, tok: Any, length: int
) -> list[tuple[str, SplitData, ZeroShotTask]]:
    """zeroshot.reference: each labelled manifest read at the backbone's size (its captions
    made from its labels, so it needs no text column) and its zero-shot task, named by the
    file's stem; none when the model does not embed or zero-shot is off."""
    files = spec.zeroshot.options.get("reference") or []
    if not spec.traits.embeds or not files:
        return []
    found = []
    for file in files:
        options = {"name": "manifest", "train": str(file), "val": str(file)}
        reader = Component.checked("data", {**options, "caption_from_label": "{}"})
        try:
            split = reader.build(image_size=shape.image_size)["val"]
        except UserError as error:
            raise UserError(
                f"zeroshot.reference={file}: {error} A reference set is a manifest (CSV or "
                "JSONL) with an image and a label (class name) per row; its images are "
                "classified zero-shot among its labels."
            ) from None
        if split.zeroshot_classes() is None:
            raise UserError(
                f"zeroshot.reference={file}: it has {len(split.class_names)} class; a reference "
                "set needs at least two labels to classify among."
            )
        # Its own class names in the run's prompt templates (zeroshot.class_names names the
        # run's classes, not these).
        task = ZeroShotTask(split.class_names, spec.prompt_templates(), split.labels, tok, length)
        log.info(
            "zero-shot reference %s: %d images, %d classes", file, len(split), len(task.labels)
        )
        found.append((Path(str(file)).stem, split, task))
    return found


# --- a training run -----------------------------------------------------------------------


@dataclass
class Parts:
    """What a training run is built from before its loaders and optimizer: data aligned to
    the backbone, its tokenizer, the model, and how batches are made."""

    spec: RunSpec
    shape: BackboneSpec
    splits: dict[str, SplitData]
    tokenizer: Any
    model: Model
    collate: Collate  # validation and test batches
    train_collate: Collate  # training batches: text augmentation and hard negatives
    # Applied on the training device to each training batch: (batch, key) -> batch.
    augment: aug.ImageAugment
    zeroshot: ZeroShotTask | None  # zero-shot classification of the val split
    # zeroshot.reference: (name, split, task) of other labelled sets scored zero-shot.
    references: list[tuple[str, SplitData, ZeroShotTask]] = dataclasses.field(default_factory=list)


def parts(spec: RunSpec, run_dir: Path | None, class_names: list[str] | None = None) -> Parts:
    """Data aligned to the backbone, the tokenizer and label names (saved to `run_dir`), the
    model, and the training split's augmentation and hard negatives. `class_names` fixes the
    label mapping (a resumed run passes its labels.json)."""
    shape = backbone(spec)
    splits = data(spec, shape, class_names)
    for name in ("train", "val"):
        if name not in splits:
            raise UserError(
                f"The data source {spec.data.name!r} must provide train and val splits."
            )
        if len(splits[name]) == 0:
            raise UserError(
                f"The {name} split has no usable rows"
                f"{' (every row is bad)' if splits[name].bad_rows else ''}; "
                "run `mmtrain validate` with the same overrides to see why."
            )
    train = splits["train"]
    tok = tokenizer(spec, train.texts, shape)
    net = model(spec, tok, shape, train.class_names)
    if run_dir is not None:
        save_tokenizer(tok, run_dir)
        save_class_names(train.class_names, run_dir)
    length = shape.text_length(spec.batches.max_text_length)
    summarize(splits, tok, length)
    entries, seed = spec.augment, spec.trainer.seed
    for kind, chosen in entries.items():
        if chosen:
            log.info("training %s: %s", kind.replace("_", " "), ", ".join(e[0] for e in chosen))
    text_augment = aug.TextAugment(entries[aug.TEXT], seed) if entries[aug.TEXT] else None
    pad = shape.pad_to_max_length
    return Parts(
        spec, shape, splits, tok, net, Collate(tok, length, pad_to_max_length=pad),
        Collate(tok, length, text_augment, _negatives(spec, train), pad_to_max_length=pad),
        aug.ImageAugment(entries[aug.IMAGE], seed, shape.image_size),
        zeroshot(spec, splits["val"], tok, length), references(spec, shape, tok, length),
    )  # fmt: skip


def _negatives(spec: RunSpec, train: SplitData) -> NegativeSampler | None:
    """The hard-negative sampler of data.hard_negatives, tried once on the first row."""
    batches = spec.batches
    if not batches.hard_negatives:
        return None
    log.info(
        "hard negatives: %d per image from %s", batches.hard_negatives, batches.negative_sampler
    )
    negatives = NegativeSampler(batches.negative_sampler, batches.hard_negatives, spec.trainer.seed)
    # A sampler that cannot serve this data says so now, not from a loader worker.
    negatives(train.texts[0], 0, 0, train.negatives[0] if train.negatives else None)
    return negatives


def loader(built: Parts, split: str, *, train: bool, device: torch.device) -> DataLoader:
    """The DataLoader of `split`: shuffled by (seed, epoch) for training, in order otherwise;
    this rank's share of it under DDP."""
    spec = built.spec
    return make_loader(
        built.splits[split], built.train_collate if train else built.collate,
        batch_size=spec.batches.batch_size, num_workers=spec.batches.num_workers,
        shuffle=train, seed=spec.trainer.seed, pin_memory=device.type == "cuda",
        rank=distributed.rank(), world_size=distributed.world_size(),
        whole=train and built.augment.cuts_whole_pictures,
    )  # fmt: skip


def _in_order(built: Parts, split: SplitData, device: torch.device) -> DataLoader:
    """The rows of `split` in order, in validation batches (this rank's share under DDP)."""
    spec = built.spec
    return make_loader(
        split, built.collate, batch_size=spec.batches.batch_size,
        num_workers=spec.batches.num_workers, shuffle=False, seed=spec.trainer.seed,
        pin_memory=device.type == "cuda", rank=distributed.rank(),
        world_size=distributed.world_size(),
    )  # fmt: skip


def training_run(
    spec: RunSpec, run_dir: Path | None, device: torch.device, class_names: list[str] | None
) -> Run:
    """Everything a training run steps, on `device`. Only the main process passes `run_dir`
    (where the tokenizer and labels are saved); a resumed run passes its `class_names`."""
    built = parts(spec, run_dir, class_names)
    precision = resolve_precision(spec.trainer.precision, device)
    net = built.model.to(device)
    if spec.trainer.strategy == "fsdp":  # before the optimizer: sharding swaps the parameters
        layers = sharding.shard(net, precision)
        kinds = sorted({type(layer).__name__.removeprefix("FSDP") for layer in layers})
        log.info("fsdp: %d tower layers (%s) and the root sharded over %d processes",
                 len(layers), ", ".join(kinds), distributed.world_size())  # fmt: skip
    train_loader = loader(built, "train", train=True, device=device)
    val_loader = loader(built, "val", train=False, device=device)
    steps_per_epoch, max_steps = total_steps(spec.trainer, len(train_loader))
    optimizer = _optimizer(spec, net)
    schedule = spec.scheduler.build(optimizer=optimizer, total_steps=max_steps)
    reported = metric_names(spec.traits)
    if built.zeroshot is not None:
        reported += [f"val/{name}" for name in built.zeroshot.metric_names()]
    if spec.monitor not in reported:
        why = (
            "the validation split has no image classes to score zero-shot"
            if built.zeroshot is None
            else "top-5 is reported only with more than 5 classes"
        )
        raise UserError(
            f"trainer.checkpoint.monitor={spec.monitor}: {why}; choose one of: "
            f"{', '.join(reported)}."
        )
    return Run(
        trainer=spec.trainer, device=device, precision=precision, model=net,
        traits=spec.traits, step_model=_step_model(spec, net, device),
        autocast=autocast_for(precision, device), optimizer=optimizer, scheduler=schedule,
        scaler=torch.amp.GradScaler(device.type, enabled=precision == "16"),
        train_loader=train_loader, val_loader=val_loader, batch_size=spec.batches.batch_size,
        augment=built.augment, zeroshot=built.zeroshot, steps_per_epoch=steps_per_epoch,
        max_steps=max_steps, monitor=spec.monitor, mode=spec.mode,
        # A streamed split's labels are not known before it is read: no hint then.
        watch=ChanceWatch(
            getattr(built.splits["val"], "labels", None), max_steps, _from_scratch_vit(spec, built)
        ),
        bad_samples=lambda: bad_samples(built.splits),
        references=[
            (name, _in_order(built, split, device), task) for name, split, task in built.references
        ],
    )  # fmt: skip


def _from_scratch_vit(spec: RunSpec, built: Parts) -> bool:
    """Whether the image tower is a ViT with random weights (CLIP's or SigLIP's, from a
    config): the one the "not learning" hint sends to experiment=small_data."""
    if spec.model.options.get("backbone") is not None:
        return False
    tower = getattr(getattr(built.model, "clip", None), "config", None)
    vision = getattr(tower, "vision_config", None)
    return getattr(vision, "model_type", None) in (
        "clip_vision_model",
        "siglip_vision_model",
        "vit",
    )


def _optimizer(spec: RunSpec, net: Model) -> torch.optim.Optimizer:
    """The optimizer over `net`, told the samples of one step (what `lr=auto` scales with)."""
    batches, trainer = spec.batches, spec.trainer
    samples = batches.batch_size * trainer.accumulate_grad_batches * distributed.world_size()
    return spec.optimizer.build(model=net, samples_per_step=samples)


def _step_model(spec: RunSpec, net: Model, device: torch.device) -> nn.Module:
    """What a training step calls: `net` under DDP across ranks (sharded by fsdp: itself),
    compiled if asked."""
    step_model = net
    if distributed.world_size() > 1 and not sharding.is_sharded(net):
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        step_model = DistributedDataParallel(
            net, device_ids=ids, find_unused_parameters=net.has_unused_parameters
        )
    if spec.trainer.compile:
        step_model = torch.compile(step_model)
    return step_model


def trackers(
    spec: RunSpec, run_dir: Path, resumed: bool, in_force: dict | None = None
) -> list[loggers.Sink]:
    """The experiment trackers of `spec.loggers` (rank 0 builds them), told the resolved
    config, the values in force (`Run.in_force`) and the metrics the run will log;
    `resumed` reopens the runs they tracked."""
    names = ["train/loss", *metric_names(spec.traits)]
    info = loggers.RunInfo.of(run_dir, spec.config, resumed, names, in_force)
    return loggers.build({sink.name: sink.options for sink in spec.loggers}, info)
