"""Using a finished run: eval, predict and export; pretrained backbones and fine-tuning."""

import csv
import json

import pytest
import torch
from conftest import TINY, read_jsonl, run_cli, save_tiny_clip
from conftest import compose_train as _compose
from manifest_files import MODEL_TINY, write_jsonl, write_learnable
from PIL import Image

from mmtrain.assemble import trained
from mmtrain.data.tokenizer import build_word_tokenizer
from mmtrain.errors import UserError
from mmtrain.models.backbone import build_backbone
from mmtrain.optim import param_groups


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small colour-classification run on a manifest with string labels."""
    folder = tmp_path_factory.mktemp("commands")
    train, val = write_learnable(folder / "data", train=96, val=48)
    run_dir = folder / "run"
    result = run_cli(
        "train", "data=manifest", f"data.train={train}", f"data.val={val}", "data.batch_size=16",
        *MODEL_TINY, "trainer.max_epochs=3", "model.contrastive_weight=0", "optimizer.lr=3e-3",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return run_dir


def test_eval_reproduces_the_runs_own_validation(run):
    result = run_cli("eval", f"run={run}", "split=val")
    assert result.returncode == 0, result.stderr
    assert "val/accuracy" in result.stdout
    written = json.loads((run / "eval_val.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert written["step"] == summary["best"]["step"] and written["checkpoint"].endswith("best.pt")
    logged = next(
        e
        for e in read_jsonl(run / "metrics.jsonl")
        if e["step"] == written["step"] and "val/loss" in e
    )
    for name in ("loss", "accuracy", "f1", "auroc"):
        assert written["metrics"][f"val/{name}"] == pytest.approx(logged[f"val/{name}"], abs=1e-5)


def test_eval_writes_a_confusion_matrix_and_per_class_scores(run):
    result = run_cli("eval", f"run={run}")
    assert result.returncode == 0, result.stderr
    written = json.loads((run / "eval_val.json").read_text())
    assert written["pictures"] == ["confusion_val.png"]
    with Image.open(run / "confusion_val.png") as picture:
        assert picture.format == "PNG" and min(picture.size) > 300
    per_class = written["per_class"]
    assert sorted(per_class) == ["blue", "green", "red"]
    assert [per_class[c]["support"] for c in ("blue", "green", "red")] == [16, 16, 16]
    right = sum(c["recall"] * c["support"] for c in per_class.values())
    assert right / 48 == pytest.approx(written["metrics"]["val/accuracy"], abs=1e-4)
    for scores in per_class.values():
        p, r = scores["precision"], scores["recall"]
        assert scores["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0, abs=1e-5)


def test_a_classifier_run_has_no_embeddings_to_predict(run, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"image": "x.png", "text": "a"}])
    result = run_cli(
        "predict", f"run={run}", f"input={source}", f"output={tmp_path / 'e.npy'}",
        "embed=images", "data.on_bad_sample=skip",
    )  # fmt: skip
    assert result.returncode == 2 and "only a contrastive model" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_eval_of_a_missing_split_or_run_is_a_clear_error(run, tmp_path):
    result = run_cli("eval", f"run={run}", "split=test")
    assert (
        result.returncode == 2
        and "data.test=PATH" in result.stderr
        and "Traceback" not in result.stderr
    )
    result = run_cli("eval", f"run={tmp_path}")
    assert result.returncode == 2 and ".hydra/config.yaml not found" in result.stderr


def test_predict_writes_one_row_per_input_row_in_order(run, tmp_path):
    rows = [
        json.loads(line) for line in (run.parent / "data" / "val.jsonl").read_text().splitlines()
    ]
    rows.insert(3, {"image": "images/nowhere.png", "text": "a picture", "label": "red"})
    source = write_jsonl(run.parent / "data" / "predict.jsonl", rows)
    out = tmp_path / "predictions.jsonl"
    result = run_cli(
        "predict", f"run={run}", f"input={source}", f"output={out}", "data.on_bad_sample=skip"
    )
    assert result.returncode == 0, result.stderr
    predictions = read_jsonl(out)
    assert [p["row"] for p in predictions] == list(range(len(rows)))
    assert predictions[3]["status"] == "skipped" and predictions[3]["reason"] == "missing file"
    good = [(p, r) for p, r in zip(predictions, rows, strict=True) if p["status"] == "ok"]
    assert all(
        abs(sum(v for k, v in p.items() if k.startswith("prob_")) - 1) < 1e-4 for p, _ in good
    )
    accuracy = sum(p["label"] == r["label"] for p, r in good) / len(good)
    assert accuracy > 0.6  # three classes: chance is 1/3

    out_csv = tmp_path / "predictions.csv"
    assert (
        run_cli(
            "predict",
            f"run={run}",
            f"input={source}",
            f"output={out_csv}",
            "data.on_bad_sample=skip",
        ).returncode
        == 0
    )
    with open(out_csv) as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) and table[0]["label"] == predictions[0]["label"]

    result = run_cli("predict", f"run={run}", f"input={source}", f"output={out}")  # policy: error
    assert result.returncode == 2 and "predict.jsonl:4" in result.stderr


def test_predict_on_a_run_trained_on_shapes_reads_any_manifest(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    rows = [
        {"image": "images/val_0.jpg", "text": "a red circle in the top left"},
        {"image": "images/gone.png", "text": "a blue square in the bottom right"},
        {"image": "images/val_1.png", "text": "a green triangle in the top right"},
    ]
    write_learnable(tmp_path / "data", train=1, val=2)  # the images
    source = write_jsonl(tmp_path / "data" / "new.jsonl", rows)
    out = tmp_path / "predictions.jsonl"
    args = ("predict", f"run={run_dir}", f"input={source}", f"output={out}")

    result = run_cli(*args)  # a bad row: listed once, with what to do
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("new.jsonl:2: missing file") == 1
    assert "data.on_bad_sample=skip to predict the other rows" in result.stderr

    result = run_cli(*args, "data.on_bad_sample=skip")  # a manifest key: it reads the input
    assert result.returncode == 0, result.stderr
    predictions = read_jsonl(out)
    assert [p["status"] for p in predictions] == ["ok", "skipped", "ok"]
    assert {p["label"] for p in predictions if p["status"] == "ok"} <= {"mismatch", "match"}

    missing = run_cli(
        "predict", f"run={run_dir}", f"input={tmp_path / 'nope.csv'}", f"output={out}"
    )
    assert (
        missing.returncode == 2 and "input=" in missing.stderr and "no such file" in missing.stderr
    )
    odd = run_cli(*args, "foo.bar=1")
    assert odd.returncode == 2 and "Unknown override group 'foo'" in odd.stderr
    usage = run_cli("predict", "--help")
    assert usage.returncode == 0 and "mmtrain predict run=RUN_DIR" in usage.stdout


def test_export_loads_in_transformers_with_the_same_features(run, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    result = run_cli("export", f"run={run}", f"out={tmp_path / 'export'}")
    assert result.returncode == 0, result.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "export").iterdir()}
    assert set(modes.values()) == {0o644} and "model.safetensors" in modes  # readable by others
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o755
    exported = CLIPModel.from_pretrained(tmp_path / "export").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export")
    trained_model = trained(str(run)).model
    texts = tokenizer(
        ["a picture that is mostly red", "mostly blue"], padding=True, return_tensors="pt"
    )
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for ours, theirs in (
            (
                trained_model.clip.text_model(**texts).pooler_output,
                exported.text_model(**texts).pooler_output,
            ),
            (
                trained_model.clip.vision_model(pixel_values=pixels).pooler_output,
                exported.vision_model(pixel_values=pixels).pooler_output,
            ),
        ):
            assert torch.allclose(ours, theirs, atol=1e-6)
    description = json.loads((tmp_path / "export" / "mmtrain_head.json").read_text())
    assert description["class_names"] == ["blue", "green", "red"]
    from safetensors.torch import load_file

    head = load_file(tmp_path / "export" / "head.safetensors")
    assert torch.equal(head["head.4.weight"], trained_model.state_dict()["head.4.weight"])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny CLIP saved as a pretrained model would be: model, tokenizer, image processor."""
    from mmtrain.data.shapes import shapes

    folder = tmp_path_factory.mktemp("pretrained")
    texts = shapes(image_size=32, train_size=200, val_size=1, test_size=0)["train"].texts
    return save_tiny_clip(folder, texts, text_positions=32)


def test_pretrained_backbone_trains_with_its_own_tokenizer_and_vision_frozen(pretrained, tmp_path):
    shapes_data = [o for o in TINY if o.startswith(("data.", "trainer.", "scheduler."))]
    result = run_cli(
        "train", f"model.backbone={pretrained}", "model.freeze=vision", "model.contrastive_weight=0.5",
        *shapes_data, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "train.log").read_text()
    assert " frozen" in log and "built a word-level tokenizer" not in log
    # optimizer.lr=auto at 32 samples a step is 5e-4; the towers get 0.02 of it
    assert "learning rate 5.00e-04 (optimizer.lr=auto" in log
    assert (
        "fine-tuning recipe for the pretrained backbone: towers at lr 1.0e-05, new layers at lr 5.0e-04"
        in log
    )
    assert json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text()) == json.loads(
        (pretrained / "tokenizer.json").read_text()
    )
    from safetensors.torch import load_file

    original = load_file(pretrained / "model.safetensors")
    trained = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["model"]
    vision = [k for k in original if k.startswith("vision_model.")]
    text = [k for k in original if k.startswith("text_model.encoder")]
    assert vision and all(torch.equal(original[k], trained[f"clip.{k}"]) for k in vision)
    assert any(not torch.equal(original[k], trained[f"clip.{k}"]) for k in text)


def test_unreachable_backbone_name_suggests_a_local_directory(tmp_path):
    result = run_cli(
        "train", "model.backbone=openai/clip-vit-base-patch32", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.backbone=DIR" in result.stderr and "save_pretrained" in result.stderr


def test_param_groups_scale_the_backbone_and_spare_biases_norms_and_temperature():
    tokenizer = build_word_tokenizer(["a red circle"])
    from mmtrain.models.contrastive import ContrastiveCLIP

    clip = build_backbone(
        None,
        {
            "projection_dim": 8,
            "vision": {
                "image_size": 16,
                "patch_size": 8,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            },
            "text": {
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            },
        },
        tokenizer,
    )
    from mmtrain.models.backbone import BackboneSpec

    model = ContrastiveCLIP(clip, BackboneSpec(16, (0.5,) * 3, (0.5,) * 3, 77))
    groups = param_groups(model, weight_decay=0.1, lr=1e-3, backbone_lr_scale=0.1)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert (
        by_id[id(clip.logit_scale)]["weight_decay"] == 0.0
        and by_id[id(clip.logit_scale)]["lr"] == 1e-3
    )
    assert by_id[id(clip.text_model.final_layer_norm.weight)]["weight_decay"] == 0.0
    assert by_id[id(clip.visual_projection.weight)] == {
        **by_id[id(clip.visual_projection.weight)],
        "weight_decay": 0.1,
        "lr": pytest.approx(1e-4),
    }
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.slow  # two CLI runs (~35 s on a loaded 2-core machine)
def test_eval_of_an_untrained_pretrained_backbone_matches_the_runs_step_0(pretrained, tmp_path):
    shapes_data = [o for o in TINY if o.startswith("data.")]
    common = [
        "model=clip_contrastive",
        f"model.backbone={pretrained}",
        *shapes_data,
        "zeroshot.templates=photo",
    ]
    result = run_cli("eval", f"out={tmp_path / 'zs'}", *common)
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "zs" / "eval_val.json").read_text())
    assert written["checkpoint"] is None and written["step"] == 0
    assert "val/zeroshot_top1" in written["metrics"] and "retrieval_val.png" in written["pictures"]
    result = run_cli(
        "train", *common, "trainer.max_steps=1", "trainer.val_before_training=true",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["step"] == 0
    for name, value in written["metrics"].items():
        assert first[name] == pytest.approx(value, abs=1e-5), name


@pytest.mark.parametrize(
    ("backbone", "options", "towers", "head"),
    [
        ("pretrained", {}, 2e-5, 1e-3),  # the fine-tuning recipe
        (None, {}, 1e-3, 1e-3),  # from scratch: one rate
        ("pretrained", {"backbone_lr_scale": 0.1}, 1e-4, 1e-3),  # overridden
        ("pretrained", {"lr": 5e-4}, 1e-5, 5e-4),  # the recipe follows lr
    ],
)
def test_a_pretrained_backbone_gets_the_fine_tuning_rates(
    pretrained, backbone, options, towers, head
):
    from mmtrain import assemble, registry
    from mmtrain.models.backbone import load_tokenizer
    from mmtrain.spec import parse

    tiny = [o for o in TINY if o.startswith("model.")] if backbone is None else []
    overrides = [
        *tiny,
        *([f"model.backbone={pretrained}"] if backbone else []),
        "model.num_classes=2",
    ]
    cfg = _compose(overrides)
    tokenizer = (
        load_tokenizer(str(pretrained)) if backbone else build_word_tokenizer(["a red circle"])
    )
    spec = parse(cfg)
    model = spec.model.build(tokenizer=tokenizer, spec=assemble.backbone(spec))
    optimizer = registry.build("optimizer", {"name": "adamw", "lr": 1e-3, **options}, model=model)
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    backbone_ids = {id(p) for p in model.backbone_parameters() if p.requires_grad}
    assert backbone_ids and all(by_id[i] == pytest.approx(towers) for i in backbone_ids)
    head_rates = [lr for i, lr in by_id.items() if i not in backbone_ids]
    assert head_rates and all(lr == pytest.approx(head) for lr in head_rates)


def test_a_bad_backbone_lr_scale_is_refused(pretrained):
    from mmtrain.spec import parse

    with pytest.raises(UserError, match="Key 'backbone_lr_scale' of optimizer 'adamw' must be"):
        parse(_compose(["optimizer.backbone_lr_scale=-1"]))
