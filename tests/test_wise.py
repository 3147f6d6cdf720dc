"""Fine-tuning that keeps what the backbone knew: captions from labels (FLYP), weight-space
ensembles of the start and the fine-tuned run (WiSE-FT) and model soups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_train, read_jsonl, run_cli
from manifest_files import COLOURS, learnable_rows, write_csv

from mmtrain.errors import UserError
from mmtrain.spec import parse

TEMPLATE = "a photo of {}."
FAST = ["trainer.max_epochs=3", "trainer.min_steps=null", "scheduler.warmup_steps=2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny CLIP saved as a pretrained model would be: model, tokenizer, image processor."""
    from transformers import CLIPImageProcessor

    from mmtrain.data.tokenizer import build_word_tokenizer
    from mmtrain.models.backbone import build_backbone

    folder = tmp_path_factory.mktemp("pretrained")
    tokenizer = build_word_tokenizer([TEMPLATE.format(" ".join(COLOURS))])
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
    config = {
        "projection_dim": 32,
        "vision": {**tower, "image_size": 32, "patch_size": 8},
        "text": {**tower, "max_position_embeddings": 16},
    }
    torch.manual_seed(0)
    build_backbone(None, config, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> list[str]:
    """data= overrides of a colour-classification set whose manifests have no text column."""
    folder = tmp_path_factory.mktemp("colours")
    paths = {}
    for split, count in (("train", 96), ("val", 30)):
        rows = [
            {"image": r["image"], "label": r["label"]} for r in learnable_rows(folder, split, count)
        ]
        paths[split] = write_csv(folder / f"{split}.csv", rows, ("image", "label"))
    train, val = paths["train"], paths["val"]
    return ["data=manifest", f"data.train={train}", f"data.val={val}", "data.batch_size=16"]


@pytest.fixture(scope="module")
def flyp(pretrained, colours, tmp_path_factory) -> Path:
    """A FLYP run: the pretrained CLIP fine-tuned contrastively on captions made of labels."""
    run = tmp_path_factory.mktemp("flyp")
    result = run_cli(
        "train", "model=clip_contrastive", f"model.backbone={pretrained}", *colours, *FAST,
        f"data.caption_from_label='{TEMPLATE}'", "trainer.val_before_training=true",
        "optimizer.lr=3e-3", "optimizer.backbone_lr_scale=1.0", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return run


# --- captions from labels (FLYP) ----------------------------------------------------------


def test_captions_from_labels_train_contrastively_and_prompt_zero_shot_alike(flyp):
    log = (flyp / "train.log").read_text()
    assert f"captions made from the labels: {TEMPLATE!r}" in log
    assert f"1 prompt templates ({TEMPLATE!r})" in log
    validations = [r for r in read_jsonl(flyp / "metrics.jsonl") if "val/zeroshot_top1" in r]
    assert validations[0]["step"] == 0
    # Chance is 1/3; the start is an untrained CLIP, fine-tuning teaches it the colours.
    assert validations[-1]["val/zeroshot_top1"] > max(0.8, validations[0]["val/zeroshot_top1"])


def test_a_caption_template_without_one_placeholder_or_labels_is_refused(colours):
    for template in ("a photo", "{} and {}"):
        with pytest.raises(UserError, match=r"data.caption_from_label.*exactly once"):
            parse(compose_train([*colours, f"data.caption_from_label='{template}'"]))
    from mmtrain.data.manifest import manifest

    train = colours[1].split("=", 1)[1]
    with pytest.raises(UserError, match="label_column=null"):
        manifest(
            image_size=8, train=train, val=train, label_column=None, caption_from_label=TEMPLATE
        )
    # Without the template, the missing text column is an error that names it.
    with pytest.raises(UserError, match="no text column"):
        manifest(image_size=8, train=train, val=train)
