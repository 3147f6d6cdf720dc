"""Zero-shot classification by prompts: templates, class embeddings, the metric, and a
contrastive run that reports it from step 0 through validation, eval and predict."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import read_jsonl, run_cli
from manifest_files import MODEL_TINY, write_jsonl, write_learnable
from PIL import Image

from mmtrain.data.tokenizer import build_word_tokenizer
from mmtrain.errors import UserError
from mmtrain.metrics import RetrievalMetrics, ZeroShotClasses, per_class_scores
from mmtrain.models.backbone import BackboneSpec, build_backbone
from mmtrain.models.contrastive import ContrastiveCLIP
from mmtrain.models.zeroshot import load_templates, prompt_embeddings, prompts

TINY_CLIP = {
    "projection_dim": 8,
    "vision": {"image_size": 16, "patch_size": 8, "hidden_size": 8, "intermediate_size": 16,
               "num_hidden_layers": 1, "num_attention_heads": 2},
    "text": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2},
}  # fmt: skip


def test_templates_built_in_from_a_file_or_a_list(tmp_path):
    assert len(load_templates("openai")) == 80 and len(set(load_templates("openai"))) == 80
    assert load_templates("simple")[0] == "itap of a {}." and len(load_templates("simple")) == 7
    path = tmp_path / "mine.txt"
    path.write_text("# my prompts\na photo of a {}.\n\n  a drawing of a {}.  \n")
    assert load_templates(str(path)) == ["a photo of a {}.", "a drawing of a {}."]
    assert load_templates(["a {} here"]) == ["a {} here"]


@pytest.mark.parametrize(
    ("templates", "message"),
    [
        ("missing.txt", "neither a built-in set (openai, simple, photo) nor a file"),
        (["a photo"], "must contain {} exactly once"),
        (["a {} or {}"], "must contain {} exactly once"),
        ([], "no prompt templates"),
        (["a {colour} {}"], "has the field {colour}, which a class name cannot fill"),
        (["a photo of a {0}."], "has the field {0}, which a class name cannot fill"),
        (["a {} with a { brace"], "is not a format string"),
    ],
)
def test_bad_templates_say_what_to_give(templates, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_templates(templates)


def test_template_files_that_are_not_utf8_text_or_hold_a_field_stop_when_the_spec_is_parsed(
    tmp_path,
):
    from conftest import compose_train

    from mmtrain.spec import parse

    files = {
        "latin1.txt": ("a photo of a {} caf\xe9.\n".encode("latin-1"), "is not UTF-8 text"),
        "binary.txt": (b"\x89PNG\r\n\x1a\n\0\0\0", "is a binary file"),
        "named.txt": (b"a {colour} photo of a {}.\n", "has the field {colour}"),
        "numbered.txt": (b"a photo of a {0}.\n", "has the field {0}"),
    }
    for name, (data, message) in files.items():
        (tmp_path / name).write_bytes(data)
        config = compose_train(["model=clip_contrastive", f"zeroshot.templates={tmp_path / name}"])
        with pytest.raises(UserError, match=re.escape(message)):
            parse(config)  # before any data, model or step: the spec's check
    with pytest.raises(UserError, match="is not a file"):
        load_templates(str(tmp_path))


def test_prompts_a_tokenizer_cannot_read_warn_once_with_the_share(caplog):
    captions = ["a red square on the left", "a blue circle at the top"]
    tokenizer = build_word_tokenizer(captions)
    classes = (torch.tensor([0, 1]), ["square", "circle"])
    with caplog.at_level("WARNING", logger="mmtrain"):
        task = prompts(classes=classes, tokenizer=tokenizer, max_length=16, templates="openai")
    warnings = [r.getMessage() for r in caplog.records if "zero-shot" in r.getMessage()]
    assert len(warnings) == 1
    ids = tokenizer(task.templates[0].format("square"), add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id in ids  # "bad" and "photo" are not caption words
    share = int(re.search(r"(\d+)% of the prompts' tokens", warnings[0]).group(1))
    assert 40 < share < 80
    assert "zeroshot.templates=simple" in warnings[0] and "model.backbone" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmtrain"):  # prompts in the captions' words
        prompts(classes=classes, tokenizer=tokenizer, max_length=16, templates=["a {} on the left"])
    assert not [r for r in caplog.records if "zero-shot" in r.getMessage()]


def test_class_names_must_name_every_class():
    classes = (torch.tensor([0, 1, 2]), ["a", "b", "c"])
    with pytest.raises(UserError, match="has 2 names but the data has 3 classes"):
        prompts(classes=classes, tokenizer=None, max_length=8, class_names=["x", "y"])
    task = prompts(classes=classes, tokenizer=None, max_length=8, class_names=["x", "y", "z"])
    assert task.class_names == ["x", "y", "z"] and len(task.templates) == 80
    assert prompts(classes=None, tokenizer=None, max_length=8) is None


def test_class_embedding_is_the_renormalised_mean_of_its_prompts():
    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(["a photo of a red cat", "a drawing of the blue dog"])
    model = ContrastiveCLIP(
        build_backbone(None, TINY_CLIP, tokenizer), BackboneSpec(16, (0.5,) * 3, (0.5,) * 3, 77)
    )
    templates = ["a photo of a {}", "a drawing of the {}"]
    got = prompt_embeddings(model, tokenizer, 16, ["cat", "dog"], templates, torch.device("cpu"))
    model.eval()
    for row, name in enumerate(["cat", "dog"]):
        each = []
        for template in templates:  # one prompt at a time: no padding at all
            tokens = tokenizer([template.format(name)], return_tensors="pt")
            each.append(model.embed_texts(tokens["input_ids"], tokens["attention_mask"])[0])
        mean = torch.stack(each).mean(0)
        assert torch.allclose(got[row], mean / mean.norm(), atol=1e-5)
    assert model.training is False  # it restores the mode it found (eval here)


def test_zeroshot_accuracy_looks_labels_up_by_row_index():
    weights = torch.eye(3)  # class c's embedding is axis c
    labels_of_rows = torch.tensor([2, 0, 1, 1, 0])  # rows of the split
    metrics = RetrievalMetrics(
        torch.device("cpu"), ZeroShotClasses(weights, labels_of_rows, list("abc"))
    )
    index = torch.tensor([4, 2, 0, 3])  # the batch holds rows 4, 2, 0, 3 (labels 0, 1, 2, 1)
    images = torch.tensor([[1.0, 0, 0], [0.1, 0.9, 0], [0.9, 0, 0.1], [0, 0.2, 1.0]])
    # predicted: 0 (right), 1 (right), 0 (wrong: label 2, second guess 2), 2 (wrong: 1 second)
    ids = torch.tensor([[1, 5], [1, 6], [1, 7], [1, 8]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": index}
    output = {"loss": torch.tensor(0.5), "image_embeds": images, "text_embeds": images}
    metrics.update(output, batch)
    values = metrics.compute()
    assert values["zeroshot_top1"] == 0.5
    assert "zeroshot_top5" not in values  # 3 classes: every class is in every top 5


def test_zeroshot_top5_is_reported_with_more_than_5_classes():
    metrics = RetrievalMetrics(
        torch.device("cpu"), ZeroShotClasses(torch.eye(7), torch.tensor([5, 4, 0]), list("abcdefg"))
    )
    # One image embedding for all three rows: classes ranked 0, 1, 2, 3, 4 | 5, 6.
    images = torch.tensor([[1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]]).expand(3, 7)
    ids = torch.tensor([[1, 5], [1, 6], [1, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.arange(3)}
    metrics.update(
        {"loss": torch.tensor(0.5), "image_embeds": images, "text_embeds": images}, batch
    )
    values = metrics.compute()
    # Labels 5 (ranked 6th: a miss), 4 (5th: a top-5 hit), 0 (first: a top-1 hit).
    assert values["zeroshot_top1"] == pytest.approx(1 / 3)
    assert values["zeroshot_top5"] == pytest.approx(2 / 3)


def test_per_class_scores_match_torchmetrics():
    from torchmetrics.classification import (
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    generator = torch.Generator().manual_seed(0)
    target = torch.randint(4, (200,), generator=generator)
    predicted = torch.where(
        torch.rand(200, generator=generator) < 0.6,
        target,
        torch.randint(4, (200,), generator=generator),
    )
    confusion = MulticlassConfusionMatrix(4)(predicted, target)
    scores = per_class_scores(confusion, list("abcd"))
    for name, metric in (
        ("precision", MulticlassPrecision),
        ("recall", MulticlassRecall),
        ("f1", MulticlassF1Score),
    ):
        expected = metric(4, average=None)(predicted, target)
        assert [scores[c][name] for c in "abcd"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert [scores[c]["support"] for c in "abcd"] == torch.bincount(target, minlength=4).tolist()


# --- a contrastive run on a colour manifest, with prompts that say the colour ---------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """clip_contrastive on colour images, validated before the first step and each epoch."""
    folder = tmp_path_factory.mktemp("zeroshot")
    train, val = write_learnable(folder / "data", train=96, val=48)
    templates = folder / "templates.txt"
    templates.write_text("a picture that is mostly {}\n")
    run_dir = folder / "run"
    result = run_cli(
        "train", "model=clip_contrastive", "data=manifest", f"data.train={train}",
        f"data.val={val}", "data.batch_size=16", *MODEL_TINY, "trainer.max_epochs=3",
        "optimizer.lr=3e-3", "trainer.val_before_training=true",
        f"zeroshot.templates={templates}", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return run_dir


def test_validation_reports_zeroshot_from_step_0_and_it_learns(run):
    val = [e for e in read_jsonl(run / "metrics.jsonl") if "val/loss" in e]
    assert [e["step"] for e in val] == [0, 6, 12, 18]
    assert all("val/zeroshot_top1" in e for e in val)
    assert not any("val/zeroshot_top5" in e for e in val)  # 3 classes: top-5 would always be 1
    assert val[-1]["val/zeroshot_top1"] > max(val[0]["val/zeroshot_top1"], 0.6)
    assert (
        "zero-shot classification: 3 classes, 1 prompt templates" in (run / "train.log").read_text()
    )


def test_eval_writes_zeroshot_scores_and_pictures(run):
    result = run_cli("eval", f"run={run}")
    assert result.returncode == 0, result.stderr
    written = json.loads((run / "eval_val.json").read_text())
    logged = next(
        e
        for e in read_jsonl(run / "metrics.jsonl")
        if e["step"] == written["step"] and "val/loss" in e
    )
    for name in ("zeroshot_top1", "recall@1_i2t", "recall@5_t2i"):
        assert written["metrics"][f"val/{name}"] == pytest.approx(logged[f"val/{name}"], abs=1e-5)
    per_class = written["zeroshot_per_class"]
    assert sorted(per_class) == ["blue", "green", "red"]
    assert sum(c["support"] for c in per_class.values()) == 48
    right = sum(c["recall"] * c["support"] for c in per_class.values())
    assert right / 48 == pytest.approx(written["metrics"]["val/zeroshot_top1"], abs=1e-4)
    assert written["pictures"] == ["retrieval_val.png", "zeroshot_confusion_val.png"]
    for name in written["pictures"]:
        with Image.open(run / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 300


def test_predict_writes_embeddings_in_input_order_and_top_k_matches(run, tmp_path):
    rows = read_jsonl(next((run.parent / "data").glob("val.jsonl")))[:6]
    data = run.parent / "data"
    for row in rows:
        row["image"] = str(data / row["image"])
    forward = write_jsonl(tmp_path / "forward.jsonl", rows)
    backward = write_jsonl(
        tmp_path / "backward.jsonl", rows[::-1] + [{"image": "gone.png", "text": "x"}]
    )
    result = run_cli(
        "predict", f"run={run}", f"input={forward}", f"output={tmp_path / 'f.safetensors'}"
    )
    assert result.returncode == 0, result.stderr
    result = run_cli(
        "predict", f"run={run}", f"input={backward}", f"output={tmp_path / 'b.npy'}",
        "embed=images", "data.on_bad_sample=skip",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    both = load_file(tmp_path / "f.safetensors")
    assert both["image_embeds"].shape == both["text_embeds"].shape == (6, 32)
    images = np.load(tmp_path / "b.npy")
    assert images.shape == (7, 32) and np.isnan(images[6]).all()  # the bad row keeps its place
    assert np.allclose(images[:6][::-1], both["image_embeds"].numpy(), atol=1e-5)

    result = run_cli(
        "predict", f"run={run}", f"input={forward}", f"output={tmp_path / 'p.jsonl'}", "k=2",
        "class_names=red,green,blue", f"candidates={write_candidates(tmp_path)}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    predicted = read_jsonl(tmp_path / "p.jsonl")
    assert len(predicted) == 6 and all(len(p["top_classes"]) == 2 for p in predicted)
    colours = [row["label"] for row in rows]
    right = sum(p["top_classes"][0] == c for p, c in zip(predicted, colours, strict=True))
    assert right >= 4  # zero-shot top-1 of this run is above 0.6 (test above)
    right = sum(p["top_texts"][0].endswith(c) for p, c in zip(predicted, colours, strict=True))
    assert right >= 4  # the candidates are the captions of the three colours, and a stray one
    assert all(set(p["top_images"]) <= set(range(6)) for p in predicted)
    # the image-text scores agree with the embeddings
    image, text = both["image_embeds"], both["text_embeds"]
    for p, i in zip(predicted, range(6), strict=True):
        assert p["similarity"] == pytest.approx(float(image[i] @ text[i]), abs=1e-5)
        assert p["top_image_scores"][0] == pytest.approx(float((image @ text[i]).max()), abs=1e-5)


def write_candidates(folder):
    path = folder / "candidates.txt"
    path.write_text(
        "".join(f"a picture that is mostly {c}\n" for c in ("green", "xyz", "red", "blue"))
    )
    return path


def test_bad_zeroshot_inputs_stop_before_training(tmp_path):
    result = run_cli(
        "train",
        "model=clip_contrastive",
        "zeroshot.templates=nowhere.txt",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 2 and "zeroshot.templates=nowhere.txt" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "checkpoints").exists()
    result = run_cli(
        "train", "model=clip_contrastive", "zeroshot=nothing", f"hydra.run.dir={tmp_path}"
    )
    assert (
        result.returncode == 2 and "zeroshot" in result.stderr and "Traceback" not in result.stderr
    )
    result = run_cli("eval", "split=val")
    assert result.returncode == 2 and "Missing run=" in result.stderr and "out=DIR" in result.stderr


def test_bad_predict_inputs_stop_with_a_message(run, tmp_path):
    val = next((run.parent / "data").glob("val.jsonl"))
    for args, message in (
        ([f"output={tmp_path / 'e.npy'}"], "add embed=images or embed=texts"),
        ([f"output={tmp_path / 'p.jsonl'}", "k=0"], "k=0: give a positive whole number"),
        (
            [f"output={tmp_path / 'p.jsonl'}", "candidates=none.txt"],
            "candidates=none.txt: no such file",
        ),
        ([f"output={tmp_path / 'e.safetensors'}", "embed=all"], "choose images, texts or both"),
    ):
        result = run_cli("predict", f"run={run}", f"input={val}", *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
