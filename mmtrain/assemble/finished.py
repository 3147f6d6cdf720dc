"""A finished run rebuilt from its directory alone (config, tokenizer, label names,
weights), a model never trained, and the rows `mmtrain predict` reads: what `eval`,
`predict` and `export` work on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mmtrain import checkpoint as ckpt
from mmtrain import registry
from mmtrain.assemble.training import backbone, data, model, tokenizer
from mmtrain.data.loader import Collate, make_loader
from mmtrain.data.source import SplitData, load_class_names, save_class_names
from mmtrain.data.tokenizer import load_saved_tokenizer, save_tokenizer
from mmtrain.devices import autocast_for, resolve_device, resolve_precision, seed_everything
from mmtrain.errors import UserError
from mmtrain.models import towers
from mmtrain.models.backbone import BackboneSpec, image_processor
from mmtrain.models.finetune import plain_backbone
from mmtrain.models.interface import Model
from mmtrain.models.zeroshot import prompt_embeddings
from mmtrain.spec import Component, RunSpec, dotlist, of_run

log = logging.getLogger("mmtrain")


@dataclass
class Trained:
    """A finished run rebuilt from its directory (or a model never trained, `untrained`)."""

    path: Path
    spec: RunSpec
    shape: BackboneSpec
    tokenizer: Any
    class_names: list[str] | None
    model: Model
    checkpoint: Path | None  # None: never trained (`mmtrain eval out=DIR`)
    step: int

    def on_device(self) -> tuple[Model, torch.device, Callable[[], Any]]:
        """The model on the device its trainer config names, with the autocast of its
        precision (what `eval` and `predict` run it with)."""
        device = resolve_device(self.spec.trainer.device)
        precision = resolve_precision(self.spec.trainer.precision, device)
        return self.model.to(device), device, autocast_for(precision, device)

    def data(self) -> dict[str, SplitData]:
        """The run's data splits, with the run's label mapping."""
        return data(self.spec, self.shape, self.class_names)

    def batches(self, split: SplitData) -> DataLoader:
        """The rows of `split` in order, in the run's batch size, without augmentation."""
        pad = self.shape.pad_to_max_length
        collate = Collate(self.tokenizer, self.text_length(), pad_to_max_length=pad)
        batches = self.spec.batches
        return make_loader(
            split, collate, batch_size=batches.batch_size, num_workers=batches.num_workers,
            shuffle=False, seed=0,
        )  # fmt: skip

    def text_length(self) -> int:
        """The text length its batches and prompts are cut at."""
        return self.shape.text_length(self.spec.batches.max_text_length)

    def prompt_embeddings(
        self, names: list[str], prompts: list[str], device: torch.device
    ) -> torch.Tensor:
        """[C, D] class embeddings of `names` put into the `prompts` templates."""
        return prompt_embeddings(
            self.model, self.tokenizer, self.text_length(), names, prompts, device
        )

    def transformers_parts(self) -> tuple[nn.Module, Any]:
        """The transformers dual encoder (LoRA adapters merged) and its image processor:
        what `mmtrain export` saves."""
        vision = getattr(self.model.clip.config, "vision_config", None)
        if vision is not None and vision.model_type in towers.UNFLAT_POOLERS:
            log.warning(
                "The %r image tower pools to a [B, C, 1, 1] map, which transformers' "
                "VisionTextDualEncoderModel.get_image_features cannot project: flatten it "
                "first, visual_projection(vision_model(pixel_values=x).pooler_output.flatten(1)) "
                "(mmtrain predict and evaluate do).",
                vision.model_type,
            )
        return plain_backbone(self.model.clip), image_processor(self.shape)


def trained(run: str, overrides: list[str] = (), checkpoint: str | None = None) -> Trained:
    """Rebuild a run's model from its directory (and `checkpoint`, default best.pt, else
    last.pt), with config `overrides` applied."""
    path = Path(run).expanduser()
    spec = of_run(path, overrides)
    weights = Path(checkpoint).expanduser() if checkpoint else path / "checkpoints" / "best.pt"
    if not checkpoint and not weights.is_file():
        weights = path / "checkpoints" / "last.pt"
    if not weights.is_file():
        raise UserError(
            f"checkpoint={checkpoint}: no such file; give a .pt file from a run's checkpoints/ folder."
            if checkpoint
            else f"run={run} has no checkpoint (checkpoints/best.pt or last.pt): the run stopped "
            "before its first save, so there is nothing to load or resume. Give another file "
            "with checkpoint=PATH, or train the run again."
        )
    saved = ckpt.load(weights)
    shape = backbone(spec)
    tok = load_saved_tokenizer(path, spec.trust_remote_code)
    class_names = load_class_names(path)
    if "num_classes" in spec.model.options and class_names is None:
        raise UserError(f"{path / 'labels.json'} not found: the run directory is incomplete.")
    net = model(spec, tok, shape, class_names)
    ckpt.load_weights(net, saved, weights, spec.config)
    log.info("loaded %s (step %d)", weights, saved["step"])
    return Trained(path, spec, shape, tok, class_names, net.eval(), weights, saved["step"])


def untrained(spec: RunSpec, out: Path) -> tuple[Trained, dict[str, SplitData]]:
    """A model built from `spec` without training (a pretrained backbone's weights, or fresh
    ones, seeded as a training run's), its tokenizer and labels saved into `out`, and the
    spec's data splits."""
    seed_everything(spec.trainer.seed)
    shape = backbone(spec)
    splits = data(spec, shape)
    names = splits["train"].class_names
    tok = tokenizer(spec, splits["train"].texts, shape)
    net = model(spec, tok, shape, names)
    save_tokenizer(tok, out)
    save_class_names(names, out)
    return Trained(out, spec, shape, tok, names, net.eval(), None, 0), splits


def prediction_input(
    run: str, manifest: Path, overrides: list[str], checkpoint: str | None
) -> tuple[Trained, SplitData, str]:
    """A finished run and the rows of `manifest` to predict, read as a manifest: with the
    run's own manifest settings (columns, image root, cache) when it trained on one, and
    every `data.KEY=` override the manifest source takes (the others change the run's
    config). Returns the run, the rows (bad ones dropped and listed) and the bad-row policy."""
    keys = {o: o[5:].split("=")[0] for o in overrides if o.startswith("data.")}
    takes = registry.accepted("data", "manifest", dict.fromkeys(keys.values()))
    for_input = [o for o in overrides if keys.get(o) in takes]
    done = trained(run, [o for o in overrides if o not in for_input], checkpoint)
    source = done.spec.data
    options = dict(source.options) if source.name == "manifest" else {}
    options.update(dotlist(for_input).get("data", {}))
    policy = options.get("on_bad_sample", "error")
    # No labels: every row is in the one class "0" (the manifest's unlabelled mode). Bad rows
    # are collected here and reported by the caller, in its own words.
    # The input's own texts are predicted on, never captions made from labels.
    options.update(
        train=None, val=str(manifest), test=None, label_column=None, on_bad_sample="skip",
        caption_from_label=None,
    )  # fmt: skip
    reader = Component.checked("data", {"name": "manifest", **options})
    split = reader.build(image_size=done.shape.image_size, class_names=["0"], num_classes=None)
    return done, split["val"], policy
