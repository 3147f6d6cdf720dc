"""Fine-tuning that keeps what the backbone knew: captions from labels (FLYP), weight-space
ensembles of the start and the fine-tuned run (WiSE-FT) and model soups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_train, read_jsonl, run_cli, save_tiny_clip
from manifest_files import COLOURS, learnable_rows, write_csv

from mmtrain.errors import UserError
from mmtrain.spec import parse

TEMPLATE = "a photo of {}."
FAST = ["trainer.max_epochs=3", "trainer.min_steps=null", "scheduler.warmup_steps=2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny CLIP saved as a pretrained model would be: model, tokenizer, image processor."""
    folder = tmp_path_factory.mktemp("pretrained")
    return save_tiny_clip(folder, [TEMPLATE.format(" ".join(COLOURS))], text_positions=16)


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
        f"zeroshot.reference=[{colours[2].split('=', 1)[1]}]",
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
    # The validation set named as a reference set too: scored alike, at every validation
    # (top-5 only above 5 classes).
    for row in validations:
        assert row["val/reference/val/zeroshot_top1"] == row["val/zeroshot_top1"]
        assert "val/reference/val/zeroshot_top5" not in row


def test_a_reference_set_without_labels_is_refused(pretrained, colours, tmp_path):
    from mmtrain import assemble

    rows = [{"image": str(Path(colours[1].split("=", 1)[1]).parent / "images" / "val_0.png")}]
    unlabelled = write_csv(tmp_path / "unlabelled.csv", rows, ("image",))
    spec = parse(
        compose_train(
            ["model=clip_contrastive", f"model.backbone={pretrained}", *colours]
            + [f"zeroshot.reference=[{unlabelled}]"]
        )
    )
    with pytest.raises(UserError, match=r"zeroshot.reference=.*unlabelled.csv.*no label column"):
        assemble.references(spec, assemble.backbone(spec), None, 16)


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


# --- WiSE-FT ------------------------------------------------------------------------------


def test_interpolation_mixes_the_towers_and_keeps_the_new_layers():
    from mmtrain.assemble import interpolated
    from mmtrain.models.finetune import average_weights

    start = {"clip.w": torch.zeros(3), "clip.ids": torch.arange(3), "head.w": torch.zeros(2)}
    tuned = {"clip.w": torch.full((3,), 4.0), "clip.ids": torch.arange(3) + 1, "head.w": torch.ones(2)}  # fmt: skip
    mixed = interpolated(start, tuned, 0.25)
    assert torch.equal(mixed["clip.w"], torch.full((3,), 1.0))
    assert torch.equal(mixed["head.w"], tuned["head.w"])  # no starting weights: as trained
    assert torch.equal(mixed["clip.ids"], tuned["clip.ids"])  # not floating point
    soup = average_weights([start, tuned, tuned], [1 / 3] * 3)
    assert torch.allclose(soup["head.w"], torch.full((2,), 2 / 3))
    with pytest.raises(ValueError, match="'head.w' has the shape"):
        average_weights([start, {**tuned, "head.w": torch.ones(3)}], [0.5, 0.5])


@pytest.fixture(scope="module")
def wise(flyp, tmp_path_factory) -> Path:
    """`mmtrain wise` of the FLYP run at alpha 0, 0.5 and 1."""
    out = tmp_path_factory.mktemp("wise")
    result = run_cli("wise", f"run={flyp}", "alpha=0,0.5,1", f"out={out}")
    assert result.returncode == 0, result.stderr
    return out


def test_wise_alphas_from_start_to_fine_tuned(flyp, wise, pretrained, tmp_path):
    from transformers import CLIPModel

    out = wise
    rows = json.loads((out / "wise.json").read_text())
    assert [row["alpha"] for row in rows] == [0, 0.5, 1]
    assert all("val/reference/val/zeroshot_top1" in row["metrics"] for row in rows)
    assert (out / "wise.png").stat().st_size > 0
    # alpha=0 is the pretrained backbone, alpha=1 the run's best weights, and each scores
    # what the run measured for them (before training and at its best step).
    start = CLIPModel.from_pretrained(pretrained).state_dict()
    weights = {
        a: torch.load(out / f"alpha_{a}" / "checkpoints" / "best.pt")["model"] for a in (0, 1)
    }
    best = torch.load(flyp / "checkpoints" / "best.pt")["model"]
    for name, tensor in start.items():
        assert torch.equal(weights[0][f"clip.{name}"], tensor), name
    for name, tensor in best.items():
        assert torch.equal(weights[1][name], tensor), name
    logged = {r["step"]: r for r in read_jsonl(flyp / "metrics.jsonl") if "val/loss" in r}
    summary = json.loads((flyp / "summary.json").read_text())
    for row, step in zip(rows[::2], (0, summary["best"]["step"]), strict=True):
        for name in ("val/loss", "val/zeroshot_top1"):
            assert row["metrics"][name] == pytest.approx(logged[step][name], abs=1e-5), name
    middle = rows[1]["metrics"]["val/loss"]
    assert middle != rows[0]["metrics"]["val/loss"] and middle != rows[2]["metrics"]["val/loss"]
    # An ensemble is a run directory the other commands take; eval scores the references too.
    result = run_cli("eval", f"run={out / 'alpha_0.5'}")
    assert result.returncode == 0, result.stderr
    scored = json.loads((out / "alpha_0.5" / "eval_val.json").read_text())["metrics"]
    for name in ("val/loss", "val/reference/val/zeroshot_top1"):
        assert scored[name] == pytest.approx(rows[1]["metrics"][name], abs=1e-5)


def test_wise_refuses_bad_alphas_and_runs_from_scratch_writing_nothing(flyp, tmp_path):
    import yaml

    from mmtrain.commands.wise import wise_run

    out = tmp_path / "out"
    for alpha in ("1.5", "-0.1", "half", "0.5,nan", ""):
        with pytest.raises(UserError, match="not a number in \\[0, 1\\]"):
            wise_run([f"run={flyp}", f"alpha={alpha}", f"out={out}"])
    scratch = tmp_path / "scratch"
    (scratch / ".hydra").mkdir(parents=True)
    config = yaml.safe_load((flyp / ".hydra" / "config.yaml").read_text())
    config["model"]["backbone"] = None
    (scratch / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match="trained from scratch"):
        wise_run([f"run={scratch}", "alpha=0.5", f"out={out}"])
    assert not out.exists()


# --- model soups --------------------------------------------------------------------------


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "best.pt")["model"]


def test_a_soup_averages_runs_and_greedy_keeps_what_helps(flyp, wise, tmp_path):
    from mmtrain.commands.soup import soup_run

    soup_run([str(flyp), str(wise / "alpha_0.5"), f"out={tmp_path / 'uniform'}"])
    # (tuned + (start + tuned) / 2) / 2 is WiSE-FT at 0.75.
    soup, start, tuned = _weights(tmp_path / "uniform"), _weights(wise / "alpha_0"), _weights(flyp)
    for name, tensor in soup.items():
        if tensor.is_floating_point():
            expected = 0.25 * start[name] + 0.75 * tuned[name]
            assert torch.allclose(tensor, expected, atol=1e-6), name
    made_of = json.loads((tmp_path / "uniform" / "averaged.json").read_text())
    assert made_of["method"] == "uniform soup" and len(made_of["runs"]) == 2
    assert "val/reference/val/zeroshot_top1" in made_of["metrics"]

    soup_run([str(wise / "alpha_0"), str(flyp), "greedy=true", f"out={tmp_path / 'greedy'}"])
    made_of = json.loads((tmp_path / "greedy" / "averaged.json").read_text())
    scores = made_of["candidates"]
    sign = 1 if made_of["mode"] == "max" else -1
    best = max(scores, key=lambda run: sign * scores[run])
    assert made_of["runs"][0] == best  # the best run first, the others only while they help
    assert sign * made_of["metrics"][made_of["monitor"]] >= sign * scores[best]
    if len(made_of["runs"]) == 1:
        assert torch.equal(
            _weights(tmp_path / "greedy")["clip.logit_scale"],
            _weights(Path(best))["clip.logit_scale"],
        )


def test_a_soup_of_different_backbones_or_a_single_run_is_refused(flyp, tmp_path):
    import yaml

    from mmtrain.commands.soup import soup_run

    other = tmp_path / "other"
    (other / ".hydra").mkdir(parents=True)
    config = yaml.safe_load((flyp / ".hydra" / "config.yaml").read_text())
    config["model"]["backbone"] = str(tmp_path / "another_backbone")
    (other / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "soup"
    with pytest.raises(UserError, match="model.backbone=.*another_backbone"):
        soup_run([str(flyp), str(other), f"out={out}"])
    with pytest.raises(UserError, match="at least two runs"):
        soup_run([str(flyp), f"out={out}"])
    assert not out.exists()


def test_a_reference_set_on_a_model_that_does_not_embed_is_refused(colours, tmp_path):
    config = compose_train([*colours, f"zeroshot.reference=[{colours[1].split('=', 1)[1]}]"])
    with pytest.raises(UserError, match=r"zeroshot.reference: model 'clip_fusion' .* export"):
        parse(config)
