"""The task suite (benchmarks/suite.py) and the default recipe's parts: the step budget, the
fusion that keeps concat's features, the data summary and the not-learning hint."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
from conftest import CONF, TINY, read_jsonl, run_cli
from hydra import compose, initialize_config_dir
from suite import TASKS, render_pair, write_task

from mmtrain.data.manifest import manifest
from mmtrain.data.source import SplitData
from mmtrain.data.summary import summarize
from mmtrain.data.tokenizer import build_word_tokenizer
from mmtrain.errors import UserError
from mmtrain.models.fusion import Features, cross_attention_concat
from mmtrain.spec import parse, total_steps
from mmtrain.watch import ACCURACY_MARGIN, ChanceWatch


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_renders_the_same_pairs_and_honest_labels(task):
    pairs = [render_pair(task, 0, "train", i, size=32) for i in range(40)]
    again = render_pair(task, 0, "train", 7, size=32)
    assert (np.asarray(again.image) == np.asarray(pairs[7].image)).all()
    assert again.matching_text == pairs[7].matching_text
    classes = TASKS[task].classes
    for pair in pairs:
        assert pair.image.size == (32, 32)
        # A matching row names the class shown; a mismatching one names another class.
        assert (pair.matching_text == pair.caption) == (pair.label == 1)
        assert classes[pair.cls] in pair.caption
    labels = [pair.label for pair in pairs]
    assert 8 <= sum(labels) <= 32  # about half and half
    assert len({pair.cls for pair in pairs}) >= min(len(classes), 4)


def test_a_written_task_reads_as_a_manifest(tmp_path):
    folder = write_task("counting", tmp_path, train_size=12, val_size=6)
    assert write_task("counting", tmp_path, train_size=12, val_size=6) == folder  # reused
    with open(folder / "train.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and set(rows[0]) == {"image", "text", "label"}
    classes = json.loads((folder / "classes.json").read_text())
    assert classes["classes"] == list(TASKS["counting"].classes)
    splits = manifest(
        image_size=32, train=str(folder / "train.csv"), val=str(folder / "val.csv"),
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    assert len(splits["train"]) == 12 and len(splits["val"]) == 6
    assert splits["train"].labels.tolist() == [int(row["label"]) for row in rows]
    # stored whole at data.cache_scale x the model's size; cut to 32 px when loaded
    assert splits["train"].images.shape[:2] == (12, 3) and splits["train"].image_size == 32
    pairs = manifest(
        image_size=32, train=str(folder / "pairs_train.csv"), val=str(folder / "pairs_val.csv"),
        cache_dir=str(tmp_path / "cache"), on_bad_sample="skip",  # a class only val drew
    )  # fmt: skip
    assert set(pairs["train"].class_names) <= set(TASKS["counting"].classes)
    assert len(pairs["train"]) == 12


def test_a_bad_task_or_size_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="Unknown suite task 'glyph'.*glyphs"):
        write_task("glyph", tmp_path, 10, 10)
    with pytest.raises(UserError, match="at least 2 training"):
        write_task("glyphs", tmp_path, 1, 10)


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=list(overrides))


def test_small_sets_get_the_step_budget_unless_the_user_sets_one():
    default = parse(_cfg()).trainer
    assert total_steps(default, 47) == (47, 2000)  # 10 epochs would be 470 steps
    assert total_steps(default, 250) == (250, 2500)  # a larger set: its 10 epochs
    epochs_only = parse(_cfg("trainer.min_steps=null")).trainer
    assert total_steps(epochs_only, 47) == (47, 470)
    with pytest.raises(UserError, match="trainer.min_steps"):
        parse(_cfg("trainer.min_steps=0"))


def _features(batch=4, tokens=5, width=8, embed=6):
    torch.manual_seed(0)
    return Features(
        image_tokens=torch.randn(batch, 3, width),
        image_embed=torch.randn(batch, embed),
        text_tokens=torch.randn(batch, tokens, width),
        text_embed=torch.randn(batch, embed),
        text_mask=torch.ones(batch, tokens, dtype=torch.long),
    )


def test_the_default_fusion_keeps_concats_features_and_their_agreement():
    features = _features()
    fusion = cross_attention_concat(
        image_dim=8, text_dim=8, embed_dim=6, layers=1, heads=2, dropout=0.0
    )
    out = fusion(features)
    assert fusion.out_dim == out.shape[-1] == 8 + 3 * 6
    concat = torch.cat([features.image_embed, features.text_embed], dim=-1)
    assert torch.equal(out[:, 8:20], concat)
    cosine = torch.nn.functional.cosine_similarity(features.image_embed, features.text_embed)
    assert torch.allclose(out[:, 20:].sum(-1), cosine, atol=1e-6)
    with pytest.raises(UserError, match="fusion_heads=3 must divide the text width 8"):
        cross_attention_concat(image_dim=8, text_dim=8, embed_dim=6, layers=1, heads=3, dropout=0.0)


def _split(labels, texts=None, names=("no", "yes")):
    labels = torch.tensor(labels)
    texts = texts or ["a red circle"] * len(labels)
    return SplitData(
        torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8), texts, labels, list(names)
    )


def test_the_data_summary_counts_and_warns(caplog):
    tokenizer = build_word_tokenizer(["a red circle", "one two three four five six seven"])
    train = _split(
        [0, 1, 1, 0], ["a red circle", "one two three four five six seven"] * 2, ("a", "b", "c")
    )
    val = _split([0] * 19 + [2], names=("a", "b", "c"))
    with caplog.at_level(logging.INFO, logger="mmtrain"):
        warnings = summarize({"train": train, "val": val}, tokenizer, max_length=6)
    table = caplog.text
    # Tokens with CLIP's start and end: 5 and 9 (median of 5, 5, 9, 9: 9); 6 cuts two.
    assert "9 / 9 / 2" in table and "a 50%  b 50%" in table and "a 95%  c 5%" in table
    assert "8x8 (rendered)" in table
    assert len(warnings) == 2
    assert "val split's class 'a' holds 95%" in warnings[0]
    assert "1 rows of classes never seen in train ('c')" in warnings[1]
    balanced = summarize({"train": train, "val": _split([0, 1])}, tokenizer, max_length=16)
    assert balanced == []


def test_the_hint_comes_once_when_validation_stays_at_chance(caplog):
    watch = ChanceWatch(torch.tensor([0] * 53 + [1] * 47), max_steps=1000)
    assert watch.chance == pytest.approx(0.53)
    at_chance = {"val/accuracy": 0.54, "val/auroc": 0.49}
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        assert not watch.update(at_chance, 100)  # before 30% of the budget
        assert watch.update(at_chance, 300)
        assert not watch.update(at_chance, 400)  # once
    assert caplog.text.count("not learning yet") == 1
    assert "model.backbone" in caplog.text and "model.fusion=concat" in caplog.text
    learning = ChanceWatch(torch.tensor([0, 1] * 500), max_steps=1000)
    assert not learning.update({"val/accuracy": 0.5, "val/auroc": 0.7}, 100)
    assert not learning.update(at_chance, 500)  # it was above chance once: no hint
    # Margins widen to three standard errors on a small split: 0.56 on 100 rows is noise.
    assert watch.accuracy_margin == pytest.approx(3 * (0.53 * 0.47 / 100) ** 0.5)
    large = ChanceWatch(torch.tensor([0, 1] * 50_000), max_steps=1000)
    assert large.accuracy_margin == ACCURACY_MARGIN  # the stated floor on a large split


def test_a_run_that_cannot_learn_says_so_and_its_summary_holds_the_best(tmp_path):
    # lr 1e-12: the weights hardly move, so validation stays where an untrained model is.
    result = run_cli(
        "train", *TINY, "data.val_size=400", "trainer.max_epochs=4", "optimizer.lr=1e-12",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    log = (tmp_path / "train.log").read_text()
    assert log.count("not learning yet") == 1
    assert "data summary" in log and "tokens med/max/cut" in log
    summary = json.loads((tmp_path / "summary.json").read_text())
    events = [e for e in read_jsonl(tmp_path / "metrics.jsonl") if "val/accuracy" in e]
    best = next(e for e in events if e["step"] == summary["best"]["step"])
    assert summary["final"]["val/accuracy"] == best["val/accuracy"]
    last = {k: v for k, v in events[-1].items() if k not in ("step", "epoch")}
    assert summary.get("last", summary["final"]) == last


def test_only_the_matching_rows_of_a_matching_task_are_pairs(tmp_path):
    folder = write_task("glyphs", tmp_path, train_size=16, val_size=8)
    paths = {"train": str(folder / "train.csv"), "val": str(folder / "val.csv")}
    cache = str(tmp_path / "cache")
    splits = manifest(image_size=32, cache_dir=cache, **paths)
    labels = splits["train"].labels
    assert 0 < int(labels.sum()) < len(labels)
    assert torch.equal(splits["train"].paired, labels == 1)  # label 1: the caption is true
    every = manifest(image_size=32, cache_dir=cache, match_label=None, **paths)
    assert bool(every["train"].paired.all())
    chosen = manifest(image_size=32, cache_dir=cache, match_label="0", **paths)
    assert torch.equal(chosen["train"].paired, labels == 0)
    as_int = manifest(image_size=32, cache_dir=cache, match_label=1, **paths)  # data.match_label=1
    assert torch.equal(as_int["train"].paired, labels == 1)
    with pytest.raises(UserError, match="data.match_label=yes is not one of the training labels"):
        manifest(image_size=32, cache_dir=cache, match_label="yes", **paths)
    # A classification task (the class of the image) keeps every row as a pair.
    classes = manifest(
        image_size=32, cache_dir=cache,
        train=str(folder / "pairs_train.csv"), val=str(folder / "pairs_val.csv"), on_bad_sample="skip",
    )  # fmt: skip
    assert bool(classes["train"].paired.all())
