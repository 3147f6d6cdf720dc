"""`data=manifest` on real image files: formats, labels, odd images, bad rows, the CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from conftest import build_parts, data_loader, run_cli
from conftest import compose_train as _compose
from manifest_files import (
    COLOURS,
    MODEL_TINY,
    colour_image,
    learnable_rows,
    write_csv,
    write_jsonl,
    write_learnable,
    write_messy,
)
from PIL import Image

from mmtrain import registry
from mmtrain.data.images import ImageProblem, load_image
from mmtrain.data.manifest import manifest
from mmtrain.data.source import load_class_names
from mmtrain.errors import UserError
from mmtrain.spec import parse


def _mean_colour(image: torch.Tensor) -> np.ndarray:
    return image.float().mean(dim=(1, 2)).numpy()


def test_csv_and_jsonl_with_own_columns_and_image_root(tmp_path):
    images = tmp_path / "pictures"
    rows = learnable_rows(images, "train", 6)
    renamed = [{"img": r["image"], "caption": r["text"], "y": r["label"]} for r in rows]
    lists = tmp_path / "lists"
    lists.mkdir()
    train = write_csv(lists / "train.csv", renamed, columns=("img", "caption", "y"))
    val = write_jsonl(lists / "val.jsonl", renamed[:3])
    splits = manifest(
        image_size=16,
        train=str(train),
        val=str(val),
        image_root=str(images),
        image_column="img",
        text_column="caption",
        label_column="y",
    )
    assert set(splits) == {"train", "val"}
    train_split = splits["train"]
    assert train_split.class_names == ["blue", "green", "red"]  # sorted training labels
    assert train_split.texts == [r["text"] for r in rows]
    assert train_split.labels.tolist() == [["blue", "green", "red"].index(r["label"]) for r in rows]
    assert train_split.images.dtype == torch.uint8 and train_split.images.shape == (
        6,
        3,
        18,
        18,
    )  # whole, x1.143
    for row, image in zip(rows, train_split.images, strict=True):
        assert np.abs(_mean_colour(image) - COLOURS[row["label"]]).max() < 20
    assert splits["val"].texts == [r["text"] for r in rows[:3]]


def test_paths_default_to_the_manifest_folder_and_integer_labels(tmp_path):
    rows = learnable_rows(tmp_path, "train", 4)
    for index, row in enumerate(rows):
        row["label"] = index % 2
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    splits = manifest(image_size=8, train=str(train), val=str(train))
    assert splits["train"].class_names == ["0", "1"]
    assert splits["train"].labels.tolist() == [0, 1, 0, 1]
    # model.num_classes larger than the labels seen: ids stay, more classes
    splits = manifest(image_size=8, train=str(train), val=str(train), num_classes=4)
    assert splits["train"].class_names == ["0", "1", "2", "3"]


def test_every_bad_row_is_listed_with_file_line_and_reason(tmp_path):
    messy = write_messy(tmp_path)
    with pytest.raises(UserError) as error:
        manifest(image_size=16, train=str(messy["train"]), val=str(messy["val"]))
    message = str(error.value)
    assert f"{len(messy['bad'])} bad row(s)" in message
    for (split, line), reason in messy["bad"].items():
        assert f"{messy[split]}:{line}: {reason}" in message, (split, line, reason)
    assert "nowhere.png does not exist" in message
    assert "'purple' is not one of the training labels (blue, green, red)" in message
    assert "data.on_bad_sample=skip" in message
    # good rows are never listed
    for line in (2, 3, 4, 5, 6, 7):
        assert f"{messy['train']}:{line}:" not in message


def test_an_unknown_bad_sample_policy_is_refused(tmp_path):
    train, val = write_learnable(tmp_path, train=3, val=3)
    config = {"name": "manifest", "train": str(train), "val": str(val), "on_bad_sample": "drop"}
    with pytest.raises(UserError) as error:
        registry.build("data", config, image_size=16)
    assert str(error.value) == (
        "Key 'on_bad_sample' of data 'manifest' must be one of: error, skip (got 'drop')."
    )
    assert not (tmp_path / ".mmtrain_cache").exists()  # refused before anything is read


def test_skip_drops_bad_rows_counts_them_and_changes_no_row(tmp_path, caplog):
    messy = write_messy(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        splits = manifest(
            image_size=16, train=str(messy["train"]), val=str(messy["val"]), on_bad_sample="skip"
        )
    assert "skipped 8 bad row(s)" in caplog.text
    for split in ("train", "val"):
        assert len(splits[split]) == messy["good"][split]
        found = {(row.split, row.line): row.reason for row in splits[split].bad_rows}
        assert found == {key: r for key, r in messy["bad"].items() if key[0] == split}
    train = splits["train"]
    assert train.texts == [
        "a red one",
        "a blue one",
        "a grey one",
        "a cmyk one",
        "see-through",
        "few colours",
    ]
    assert train.labels.tolist() == [2, 0, 1, 2, 0, 1]  # blue=0, green=1, red=2
    assert splits["val"].texts == ["a red one", "fine", "fine too"]
    images = torch.stack([train.image(i) for i in range(len(train))])
    assert images.shape == (6, 3, 18, 18)  # whole pictures at 16 x data.cache_scale
    grey = images[2]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])  # grey stays grey
    assert _mean_colour(images[3])[0] > 150  # the CMYK red is still red
    # half-transparent blue over white: lighter than the opaque colour, still bluish
    rgba = _mean_colour(images[4])
    assert rgba[2] > rgba[0] and rgba.min() > 100


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    image.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    pixels = load_image(tmp_path / "rotated.jpg", 16, 10**8)
    top, bottom = pixels[:, :4].reshape(3, -1).mean(1), pixels[:, -4:].reshape(3, -1).mean(1)
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_wide_grey_and_palette_images_decode(tmp_path):
    deep = (np.arange(20 * 20).reshape(20, 20) * 150).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    pixels = load_image(tmp_path / "deep.png", 8, 10**8)
    assert pixels.shape == (3, 8, 8) and pixels.dtype == np.uint8 and pixels.max() > 200
    colour_image("green", 0).convert("P").save(tmp_path / "palette.gif")
    assert load_image(tmp_path / "palette.gif", 8, 10**8).shape == (3, 8, 8)


def test_huge_images_are_refused_not_decoded(tmp_path):
    # 12000 x 10000 pixels in a few kB: decoding it would need 360 MB as RGB.
    Image.new("1", (12_000, 10_000)).save(tmp_path / "huge.png")
    with pytest.raises(ImageProblem) as error:
        load_image(tmp_path / "huge.png", 16, 100_000_000)
    assert error.value.reason == "image too large"
    assert "12000x10000 = 120,000,000 pixels, over data.max_image_pixels=100,000,000" in str(
        error.value
    )
    rows = [{"image": "huge.png", "text": "big", "label": "a"}]
    rows += [{"image": "small.png", "text": "small", "label": "a"}]
    colour_image("red", 0).save(tmp_path / "small.png")
    train = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(UserError, match=r"train.csv:2: image too large"):
        manifest(image_size=16, train=str(train), val=str(train))


def test_manifest_mistakes_are_clear(tmp_path):
    with pytest.raises(UserError, match="needs data.train=PATH and data.val=PATH"):
        manifest(image_size=16, train=None, val=None)
    with pytest.raises(UserError, match=r"data.train=nope.csv: no such file"):
        manifest(image_size=16, train="nope.csv", val="nope.csv")
    (tmp_path / "list.txt").write_text("a,b\n")
    with pytest.raises(UserError, match="neither .csv nor .jsonl"):
        manifest(image_size=16, train=str(tmp_path / "list.txt"), val=str(tmp_path / "list.txt"))
    train = write_csv(
        tmp_path / "t.csv", [{"path": "x.png", "caption": "c", "y": 1}], ("path", "caption", "y")
    )
    with pytest.raises(UserError) as error:
        manifest(image_size=16, train=str(train), val=str(train))
    assert "has no image column 'image'; its columns are: path, caption, y" in str(error.value)
    assert "data.image_column=COLUMN" in str(error.value)


def test_string_labels_round_trip_through_the_run_directory(tmp_path):
    train, val = write_learnable(tmp_path / "data", train=12, val=6)
    data = ["data=manifest", f"data.train={train}", f"data.val={val}", *MODEL_TINY]
    cfg = _compose(data)
    parse(cfg)
    run = tmp_path / "run"
    parts = build_parts(cfg, run)
    assert load_class_names(run) == ["blue", "green", "red"]
    assert json.loads((run / "labels.json").read_text()) == ["blue", "green", "red"]
    assert parts.model.num_classes == 3
    # A later command rebuilds from the run's mapping, even from a manifest whose labels
    # alone would map differently (only "red" and "green" rows: sorted, green would be 0).
    rows = [r for r in learnable_rows(tmp_path / "data", "val", 6) if r["label"] != "blue"]
    subset = write_jsonl(tmp_path / "data" / "subset.jsonl", rows)
    cfg = _compose([*data[:2], f"data.val={subset}", *MODEL_TINY])
    parts = build_parts(cfg, None, class_names=load_class_names(run))
    assert parts.splits["val"].labels.tolist() == [
        ["blue", "green", "red"].index(r["label"]) for r in rows
    ]


def test_num_classes_is_checked_against_the_labels(tmp_path):
    train, val = write_learnable(tmp_path, train=6, val=3)
    cfg = _compose(
        [
            "data=manifest",
            f"data.train={train}",
            f"data.val={val}",
            "model.num_classes=5",
            *MODEL_TINY,
        ]
    )
    with pytest.raises(UserError) as error:
        build_parts(cfg, None)
    assert "model.num_classes=5 but the data has 3 classes (blue, green, red)" in str(error.value)
    assert "model.num_classes=3 or null" in str(error.value)


def test_integer_labels_out_of_range_are_bad_rows(tmp_path):
    rows = learnable_rows(tmp_path, "train", 4)
    for index, row in enumerate(rows):
        row["label"] = index
    train = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(UserError) as error:
        manifest(image_size=8, train=str(train), val=str(train), num_classes=3)
    assert f"{train}:5: label out of range: the label 3 is not a class id in 0..2" in str(
        error.value
    )


def test_text_length_beyond_the_backbone_is_capped_with_a_warning(tmp_path, caplog):
    train, val = write_learnable(tmp_path, train=6, val=3)
    cfg = _compose(
        ["data=manifest", f"data.train={train}", f"data.val={val}", "data.max_text_length=500"]
        + MODEL_TINY
        + ["model.backbone_config.text.max_position_embeddings=16"]
    )
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        parts = build_parts(cfg, None)
    assert (
        "data.max_text_length=500 exceeds the backbone's 16 text positions; using 16" in caplog.text
    )
    assert parts.collate.max_length == 16
    assert parts.splits["train"].image_size == 32  # the backbone's size
    batch = next(iter(data_loader(parts, "train", train=True, pin_memory=False)))
    # Whole cached pictures (32 x cache_scale) with their aspects, for the device's crop ...
    assert batch["images"].shape[-2:] == (37, 37) and batch["aspects"].shape == (6,)
    assert batch["images"].dtype == torch.uint8 and batch["input_ids"].shape[1] <= 16
    # ... which cuts the model's input from them; validation's are cut at load time.
    assert parts.augment(batch, (0, 0, 0))["images"].shape[-2:] == (32, 32)
    val = next(iter(data_loader(parts, "val", train=False, pin_memory=False)))
    assert val["images"].shape[-2:] == (32, 32) and "aspects" not in val


def test_manifest_run_trains_beats_chance_and_counts_skipped_rows(tmp_path):
    train, val = write_learnable(tmp_path / "data", train=96, val=48)
    with open(train, "a") as handle:  # two bad rows: a missing file and an empty caption
        handle.write("images/missing.png,a picture,red\nimages/train_0.jpg,,red\n")
    run = tmp_path / "run"
    result = run_cli(
        "train",
        "data=manifest",
        f"data.train={train}",
        f"data.val={val}",
        "data.on_bad_sample=skip",
        "data.batch_size=16",
        *MODEL_TINY,
        "trainer.max_epochs=4",
        "model.contrastive_weight=0",
        "optimizer.lr=3e-3",
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 0, result.stderr + result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["bad_samples"] == {
        "skipped": 2,
        "by_reason": {"missing file": 1, "empty text": 1},
    }
    assert summary["best"]["value"] > 0.6  # 3 balanced classes: chance is 1/3
    assert json.loads((run / "labels.json").read_text()) == ["blue", "green", "red"]
    assert "skipped 2 bad row(s)" in (run / "train.log").read_text()


def test_train_with_bad_rows_stops_before_training_without_traceback(tmp_path):
    messy = write_messy(tmp_path / "data")
    run = tmp_path / "run"
    result = run_cli(
        "train",
        "data=manifest",
        f"data.train={messy['train']}",
        f"data.val={messy['val']}",
        *MODEL_TINY,
        f"hydra.run.dir={run}",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for split, line in messy["bad"]:
        assert f"{messy[split]}:{line}:" in result.stderr.replace("\n", "")
    assert not list(run.glob("checkpoints/*.pt")) and not (run / "metrics.jsonl").exists()


def test_validate_lists_bad_rows_one_per_line_and_fails(tmp_path):
    messy = write_messy(tmp_path / "messy")
    data = ["data=manifest", f"data.train={messy['train']}", f"data.val={messy['val']}"]
    result = run_cli("validate", *data)  # output to a pipe: one grep-able line per bad row
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    for (split, line), reason in messy["bad"].items():
        (found,) = [text for text in lines if text.startswith(f"{messy[split]}:{line}: ")]
        assert found.startswith(f"{messy[split]}:{line}: {reason}: "), found
    assert "8 bad row(s)" in result.stdout and "train: 11 rows, 6 usable, 5 bad" in result.stdout

    terminal = run_cli("validate", *data, env={"FORCE_COLOR": "1"})  # a terminal: tables
    assert terminal.returncode == 1 and "bad by reason" in terminal.stdout
    train, val = write_learnable(tmp_path / "clean", train=6, val=3)
    result = run_cli("validate", "data=manifest", f"data.train={train}", f"data.val={val}")
    assert result.returncode == 0, result.stderr
    assert "Every row is usable." in result.stdout
    assert "3 classes (id order): blue, green, red" in result.stdout


def test_a_pretrained_backbone_sets_size_normalisation_and_tokenizer(tmp_path, caplog):
    from transformers import CLIPImageProcessor

    from mmtrain.data.tokenizer import build_word_tokenizer
    from mmtrain.models.backbone import build_backbone

    folder = tmp_path / "pretrained"
    tokenizer = build_word_tokenizer(["a picture that is mostly red green blue"])
    config = {
        "projection_dim": 16,
        "vision": {"image_size": 40, "patch_size": 8, "hidden_size": 16, "intermediate_size": 32,
                   "num_hidden_layers": 1, "num_attention_heads": 2},
        "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "max_position_embeddings": 12},
    }  # fmt: skip
    build_backbone(None, config, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 40},
        crop_size={"height": 40, "width": 40},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.25, 0.25, 0.25],
    ).save_pretrained(folder)

    train, val = write_learnable(tmp_path / "data", train=6, val=3)
    cfg = _compose(
        ["data=manifest", f"data.train={train}", f"data.val={val}", "data.max_text_length=64"]
        + [f"model.backbone={folder}", "model.head_hidden=16"]
    )
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        parts = build_parts(cfg, None)
    assert parts.splits["train"].image_size == 40  # the processor's crop size
    assert parts.shape.image_mean == (0.5, 0.5, 0.5) and parts.shape.image_std == (0.25,) * 3
    assert torch.allclose(parts.model.normalize.mean.flatten(), torch.full((3,), 127.5))
    assert parts.tokenizer.get_vocab() == tokenizer.get_vocab()  # its own, not rebuilt
    assert "exceeds the backbone's 12 text positions; using 12" in caplog.text


def test_unlabelled_pairs_and_empty_manifests(tmp_path):
    rows = [{"image": r["image"], "text": r["text"]} for r in learnable_rows(tmp_path, "t", 3)]
    pairs = write_csv(tmp_path / "pairs.csv", rows, columns=("image", "text"))
    splits = manifest(image_size=8, train=str(pairs), val=str(pairs), label_column=None)
    assert splits["train"].class_names == ["0"] and splits["train"].labels.tolist() == [0, 0, 0]
    empty = write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(UserError, match=r"The training manifest .*empty.csv has no rows"):
        manifest(image_size=8, train=str(empty), val=str(pairs), label_column=None)
    assert (
        len(manifest(image_size=8, train=str(pairs), val=str(empty), label_column=None)["val"]) == 0
    )


def test_a_rejected_row_makes_no_class(tmp_path):
    good = learnable_rows(tmp_path, "train", 6)
    lines = ["image,text,label"] + [f"{r['image']},{r['text']},{r['label']}" for r in good]
    lines.append(f"{good[0]['image']},a red, square picture,red")  # label " square picture"
    lines.append(f"{good[1]['image']},a picture,9")  # a class id among names: its own class
    lines.append("images/missing.png,a picture,purple")  # a missing image makes none either
    train = tmp_path / "train.csv"
    train.write_text("\n".join(lines) + "\n")
    val = write_jsonl(tmp_path / "val.jsonl", good[:2] + [{**good[2], "label": " square picture"}])
    splits = manifest(image_size=8, train=str(train), val=str(val), on_bad_sample="skip")
    names = sorted({r["label"] for r in good} | {"9"})
    assert splits["train"].class_names == names  # was also " square picture" and "purple"
    assert [r.reason for r in splits["train"].bad_rows] == [
        "wrong number of fields",
        "missing file",
    ]
    assert [r.reason for r in splits["val"].bad_rows] == ["unknown label"]
    assert splits["train"].labels.tolist() == [names.index(r["label"]) for r in good] + [0]


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"image,text,label\n\x00\x01\x02", "is a binary file"), ("a,é\n".encode("latin-1"), "is not UTF-8 text")],
)  # fmt: skip
def test_a_manifest_that_is_not_text_is_named(tmp_path, data, expected):
    train = tmp_path / "train.csv"
    train.write_bytes(data)
    with pytest.raises(UserError) as error:
        manifest(image_size=8, train=str(train), val=str(train))
    assert str(error.value).startswith(f"The manifest: {train} {expected}")
