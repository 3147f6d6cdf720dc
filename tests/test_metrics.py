"""The classifier's validation metrics: which class binary F1, precision, recall and AUROC
score (data.positive_label), and the parts of clip_fusion's loss."""

import logging

import pytest
import torch
from conftest import compose_train

from mmtrain.errors import UserError
from mmtrain.metrics import ClassificationMetrics, per_class_scores, positive_class
from mmtrain.spec import parse


@pytest.mark.parametrize(
    ("names", "given", "expected", "why"),
    [
        (["match", "mismatch"], None, 0, "chosen: it reads as positive"),  # sorted: match first
        (["0", "1"], None, 1, "chosen: it reads as positive"),
        (["No", "Yes"], None, 1, "chosen: it reads as positive"),
        (["negative", "positive"], None, 1, "chosen: it reads as positive"),
        (["TRUE", "false"], None, 0, "chosen: it reads as positive"),
        (["cat", "dog"], None, 1, "chosen: the second label"),
        (["match", "mismatch"], "mismatch", 1, "set by data.positive_label"),
        (["0", "1"], 0, 0, "set by data.positive_label"),  # the command line types it as a number
        (["false", "true"], False, 0, "set by data.positive_label"),  # and `false` as a bool
    ],
)
def test_the_positive_class_reads_as_positive_unless_set_and_the_log_says_which(
    names, given, expected, why, caplog
):
    with caplog.at_level(logging.INFO, logger="mmtrain"):
        assert positive_class(names, given) == expected
    line = next(r.getMessage() for r in caplog.records if "positive class" in r.getMessage())
    assert repr(names[expected]) in line and why in line


def test_a_positive_label_that_is_no_label_or_of_a_multiclass_task_is_refused():
    with pytest.raises(UserError, match=r"data.positive_label=matched is not one of the two"):
        positive_class(["match", "mismatch"], "matched")
    with pytest.raises(UserError, match=r"applies to a two-class task, but the data has 3"):
        positive_class(["a", "b", "c"], "a")
    assert positive_class(["a", "b", "c"], None) is None


@pytest.mark.parametrize("source", ["shapes", "manifest", "hf", "webdataset"])
def test_every_data_source_takes_positive_label_through_the_one_check(source):
    spec = parse(compose_train([f"data={source}", "data.positive_label=match"]))
    assert spec.batches.positive_label == "match"
    assert "positive_label" not in spec.data.options  # the source's factory never sees it
    with pytest.raises(UserError, match="data.positive_label must be"):
        parse(compose_train([f"data={source}", "data.positive_label=[a,b]"]))


def test_binary_scores_are_those_of_the_positive_class_and_agree_with_the_per_class_table():
    # Labels sorted as class names: 0 = "match", 1 = "mismatch"; the positive class is 0.
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    predicted = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.9, 0.8, 0.7, 0.6, 0.55, 0.65])
    probs = torch.where(predicted == 0, confidence, 1 - confidence)  # P(class 0)
    logits = torch.stack([probs.log(), (1 - probs).log()], dim=1)
    scores = {}
    for positive in (0, 1):
        metrics = ClassificationMetrics(2, torch.device("cpu"), positive)
        metrics.update({"loss": torch.tensor(0.3), "logits": logits}, {"labels": labels})
        scores[positive] = metrics.compute()
    # By hand, class 0: 3 of 4 found (recall 0.75), 3 of 5 predictions right (precision 0.6).
    assert scores[0]["recall"] == pytest.approx(0.75)
    assert scores[0]["precision"] == pytest.approx(0.6)
    assert scores[0]["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    table = per_class_scores(metrics.confusion.compute(), ["match", "mismatch"])
    for positive, name in ((0, "match"), (1, "mismatch")):
        for key in ("precision", "recall", "f1"):
            assert scores[positive][key] == pytest.approx(table[name][key], abs=1e-6)
    # Accuracy and (for two classes) AUROC do not depend on which class is positive.
    assert scores[0]["accuracy"] == scores[1]["accuracy"] == pytest.approx(0.7)
    assert scores[0]["auroc"] == pytest.approx(scores[1]["auroc"])


def test_clip_fusion_reports_its_loss_parts_and_they_add_up():
    from test_zeroshot import TINY_CLIP

    from mmtrain.data.tokenizer import build_word_tokenizer
    from mmtrain.models.backbone import BackboneSpec
    from mmtrain.models.classifier import clip_fusion

    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(["a red square", "a blue circle"])
    spec = BackboneSpec(16, (0.5,) * 3, (0.5,) * 3, 77)
    model = clip_fusion(
        tokenizer=tokenizer, spec=spec, backbone_config=TINY_CLIP, num_classes=2,
        fusion="concat", contrastive_weight=0.5,
    )  # fmt: skip
    tokens = tokenizer(["a red square", "a blue circle", "a red circle"], return_tensors="pt")
    batch = {
        "images": torch.randint(256, (3, 3, 16, 16), dtype=torch.uint8),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "labels": torch.tensor([1, 1, 0]),
        "paired": torch.tensor([True, True, False]),
    }
    with torch.no_grad():
        output = model(**batch)
    assert output["loss_ce"] > 0 and output["loss_contrastive"] > 0
    assert float(output["loss"]) == pytest.approx(
        float(output["loss_ce"] + 0.5 * output["loss_contrastive"]), rel=1e-6
    )
    with torch.no_grad():  # a batch with no genuine pair
        alone = model(**{**batch, "paired": torch.zeros(3, dtype=torch.bool)})
    assert float(alone["loss_contrastive"]) == 0 and float(alone["loss"]) == float(alone["loss_ce"])


def test_train_refuses_a_positive_label_that_is_no_label_before_training(tmp_path):
    from conftest import TINY, run_cli

    result = run_cli("train", *TINY, "data.positive_label=yes", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert "data.positive_label=yes is not one of the two labels (mismatch, match)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("checkpoints/*")) and not (tmp_path / "metrics.jsonl").exists()
