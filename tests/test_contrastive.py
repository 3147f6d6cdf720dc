"""clip_contrastive: InfoNCE with hard negatives, retrieval metrics, negative samplers."""

import json
import random

import pytest
import torch
from conftest import TINY, read_jsonl, run_cli

from mmtrain.data.negatives import NegativeSampler, perturb, shapes
from mmtrain.data.shapes import COLOURS, POSITIONS, SHAPES
from mmtrain.errors import UserError
from mmtrain.metrics import RetrievalMetrics


def _attributes(text):
    return [v for values in (COLOURS, SHAPES, POSITIONS) for v in values if v in text]


def test_shapes_negatives_swap_exactly_one_attribute_and_are_reproducible():
    caption = "there is a red circle at the top left"
    sampler = NegativeSampler("shapes", 4, seed=7)
    negatives = sampler(caption, epoch=2, index=11)
    assert negatives == sampler(caption, epoch=2, index=11)
    assert negatives != sampler(caption, epoch=3, index=11)
    assert len(negatives) == 4 and len(set(negatives)) == 4
    truth = _attributes(caption)
    for negative in negatives:
        changed = [a for a, b in zip(truth, _attributes(negative), strict=True) if a != b]
        assert len(changed) == 1, negative


def test_shapes_sampler_refuses_unrelated_text_and_perturb_changes_it():
    with pytest.raises(UserError, match="data.negative_sampler=perturb"):
        shapes("a photo of a dog", random.Random(0), 2)
    out = perturb("a small brown dog runs on the beach", random.Random(0), 3)
    assert len(out) == 3 and all(text != "a small brown dog runs on the beach" for text in out)


def test_retrieval_recall_counts_identical_captions_as_hits():
    metrics = RetrievalMetrics(torch.device("cpu"))
    images = torch.eye(4)
    texts = torch.eye(4)[[0, 1, 3, 2]]  # rows 2 and 3 swapped: wrong unless captions match
    ids = torch.tensor([[2, 5, 3], [2, 6, 3], [2, 7, 3], [2, 7, 3]])  # captions 2 and 3 identical
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "paired": torch.ones(4, dtype=torch.bool),
    }
    metrics.update({"loss": torch.tensor(1.0), "image_embeds": images, "text_embeds": texts}, batch)
    values = metrics.compute()
    assert values["recall@1_i2t"] == 1.0 and values["recall@1_t2i"] == 1.0

    metrics = RetrievalMetrics(torch.device("cpu"))
    ids = torch.tensor([[2, 5, 3], [2, 6, 3], [2, 7, 3], [2, 8, 3]])  # all distinct now
    batch["input_ids"] = ids
    metrics.update({"loss": torch.tensor(1.0), "image_embeds": images, "text_embeds": texts}, batch)
    values = metrics.compute()
    assert values["recall@1_i2t"] == 0.5 and values["recall@5_i2t"] == 1.0
    assert sorted(values) == sorted(RetrievalMetrics.NAMES)  # what a monitor may name


def test_classification_metrics_report_the_names_they_declare():
    from mmtrain.metrics import ClassificationMetrics

    for classes in (2, 3):
        metrics = ClassificationMetrics(classes, torch.device("cpu"))
        logits = torch.randn(6, classes)
        labels = torch.arange(6) % classes
        metrics.update({"loss": torch.tensor(0.7), "logits": logits}, {"labels": labels})
        assert sorted(metrics.compute()) == sorted(ClassificationMetrics.NAMES)


def test_hard_negatives_add_columns_to_each_images_logits():
    from conftest import CONF, build_parts, data_loader
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=["model=clip_contrastive", "data.hard_negatives=3", *TINY])
    torch.manual_seed(0)
    parts = build_parts(cfg, None)
    batch = next(iter(data_loader(parts, "train", train=True, pin_memory=False)))
    assert batch["negative_input_ids"].shape[0] == 3 * batch["input_ids"].shape[0]
    model = parts.model.eval()
    with torch.no_grad():
        with_negatives = model(**batch)["loss"]
        plain = model(**{k: v for k, v in batch.items() if not k.startswith("negative")})["loss"]
    assert with_negatives > plain  # more competitors in every image's softmax


def test_contrastive_training_through_the_cli(tmp_path):
    result = run_cli(
        "train", "model=clip_contrastive", "data.hard_negatives=2", *TINY, "trainer.max_epochs=3",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "hard negatives: 2 per image from shapes" in (tmp_path / "train.log").read_text()
    events = read_jsonl(tmp_path / "metrics.jsonl")
    val = [e for e in events if "val/recall@1_i2t" in e]
    assert len(val) == 3
    for key in (
        "val/recall@1_i2t",
        "val/recall@1_t2i",
        "val/recall@5_i2t",
        "val/recall@5_t2i",
        "val/loss",
    ):
        assert 0 <= val[-1][key] <= 1 or key == "val/loss"
    losses = [e["train/loss"] for e in events if "train/loss" in e]
    assert losses[-1] < losses[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best"]["metric"] == "val/recall@1_i2t"


def test_a_sampler_that_cannot_serve_the_data_stops_before_training(tmp_path):
    result = run_cli(
        "train", "model=clip_contrastive", "data.hard_negatives=2", "data.negative_sampler=manifest",
        *TINY, "data.num_workers=2", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "needs a negatives column in the manifest (set data.negative_column)" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_manifest_negatives_come_from_their_column(tmp_path):
    from conftest import CONF, build_parts, data_loader
    from hydra import compose, initialize_config_dir
    from manifest_files import MODEL_TINY, learnable_rows, write_csv, write_jsonl

    folder = tmp_path / "data"
    train = learnable_rows(folder, "train", 12)
    for row in train:
        row["negatives"] = "|".join(
            f"a picture that is mostly {c}" for c in ("red", "green", "blue") if c != row["label"]
        )
    write_csv(folder / "train.csv", train, columns=("image", "text", "label", "negatives"))
    write_jsonl(folder / "val.jsonl", learnable_rows(folder, "val", 6))
    overrides = [
        "data=manifest", f"data.train={folder / 'train.csv'}", f"data.val={folder / 'val.jsonl'}",
        "data.negative_column=negatives", "data.batch_size=4", "model=clip_contrastive",
        "data.hard_negatives=2", "data.negative_sampler=manifest",
        *[o for o in MODEL_TINY if not o.startswith("model.head")],
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=overrides)
    parts = build_parts(cfg, None)
    batch = next(iter(data_loader(parts, "train", train=True, pin_memory=False)))
    negatives = parts.tokenizer.batch_decode(batch["negative_input_ids"], skip_special_tokens=True)
    for row, index in enumerate(batch["index"].tolist()):
        own = {
            f"a picture that is mostly {c}"
            for c in ("red", "green", "blue")
            if c != train[index]["label"]
        }
        assert set(negatives[2 * row : 2 * row + 2]) == own
