"""data=hf: Hugging Face datasets from parquet with image bytes, an imagefolder with
metadata.jsonl and a save_to_disk folder; the manifest's row checks; the cache; training."""

from __future__ import annotations

import io
import json
import sys

import datasets
import numpy as np
import pytest
from conftest import assert_same_weights, resume_from_step, run_cli
from manifest_files import COLOURS, MODEL_TINY, colour_image

from mmtrain.data.hf import hf
from mmtrain.errors import UserError

NAMES = list(COLOURS)


def _png(colour: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    colour_image(colour, seed).save(buffer, "PNG")
    return buffer.getvalue()


def _records(count: int, offset: int = 0) -> dict[str, list]:
    colours = [NAMES[i % 3] for i in range(count)]
    return {
        "image": [{"bytes": _png(c, i + offset), "path": None} for i, c in enumerate(colours)],
        "text": [f"a picture that is mostly {c}" for c in colours],
        "label": colours,
    }


def _features():
    return datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.Value("string"),
        }
    )


def write_parquet(folder, train=24, val=9):
    folder.mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train", train, 0), ("validation", val, 1000)):
        dataset = datasets.Dataset.from_dict(_records(count, offset), features=_features())
        dataset.to_parquet(str(folder / f"{split}.parquet"))
    return folder


def _mean_colour(image):
    return image.float().mean(dim=(1, 2)).numpy()


def test_parquet_with_image_bytes_is_checked_and_cached(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = write_parquet(tmp_path / "pq")
    splits = hf(image_size=16, path=str(folder), cache_workers=0)
    train = splits["train"]
    assert len(train) == 24 and train.class_names == ["blue", "green", "red"]
    assert train.texts[0] == "a picture that is mostly red" and int(train.labels[0]) == 2
    for row in range(6):
        colour = COLOURS[NAMES[row % 3]]
        assert np.abs(_mean_colour(train.image(row)) - colour).max() < 25
    cached = list((tmp_path / ".mmtrain_cache").glob("*.npy"))
    assert len(cached) == 2  # train and validation
    again = hf(image_size=16, path=str(folder), cache_workers=0)
    assert again["train"].images.data_ptr() != train.images.data_ptr()
    assert (again["train"].images == train.images).all()


def test_imagefolder_with_metadata_and_save_to_disk(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for split, count in (("train", 9), ("validation", 3)):
        folder = tmp_path / "imagefolder" / split
        folder.mkdir(parents=True)
        lines = []
        for i in range(count):
            colour = NAMES[i % 3]
            colour_image(colour, i).save(folder / f"{i}.png")
            lines.append({"file_name": f"{i}.png", "text": f"mostly {colour}", "label": colour})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    splits = hf(image_size=16, path=str(tmp_path / "imagefolder"), cache_workers=0)
    assert len(splits["train"]) == 9 and len(splits["val"]) == 3
    red = splits["train"].image(0)
    assert _mean_colour(red)[0] > 150
    streamed = hf(image_size=16, path=str(tmp_path / "imagefolder"), streaming=True)["train"]
    assert len(streamed) == 9
    (image, text, _), problem = streamed.checker(next(streamed.read(streamed.shards, None)))
    assert problem is None and text == "mostly red" and _mean_colour(image)[0] > 150
    dataset = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(_records(6), features=_features()),
         "validation": datasets.Dataset.from_dict(_records(3, 50), features=_features())}
    )  # fmt: skip
    dataset.save_to_disk(str(tmp_path / "saved"))
    splits = hf(image_size=16, path=str(tmp_path / "saved"), cache_workers=0)
    assert splits["train"].texts == _records(6)["text"]
    streamed = hf(image_size=16, path=str(tmp_path / "saved"), streaming=True)
    assert len(streamed["train"]) == 6 and streamed["train"].texts == _records(6)["text"]


def test_bad_rows_are_listed_or_skipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = _records(9)
    records["text"][2] = "  "
    records["image"][4] = {"bytes": b"not an image", "path": None}
    folder = tmp_path / "bad"
    folder.mkdir()
    datasets.Dataset.from_dict(records, features=_features()).to_parquet(
        str(folder / "train.parquet")
    )
    datasets.Dataset.from_dict(_records(3), features=_features()).to_parquet(
        str(folder / "validation.parquet")
    )
    with pytest.raises(UserError) as error:
        hf(image_size=16, path=str(folder), cache_workers=0)
    message = str(error.value)
    assert "2 bad row(s)" in message and "empty text" in message and "unreadable image" in message
    assert "[train]:2: empty text" in message and "[train]:4: unreadable image" in message
    splits = hf(image_size=16, path=str(folder), cache_workers=0, on_bad_sample="skip")
    assert len(splits["train"]) == 7 and len(splits["train"].bad_rows) == 2


def test_dataset_mistakes_are_clear(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = write_parquet(tmp_path / "pq", train=3, val=3)
    with pytest.raises(
        UserError, match="has no column 'caption'; its columns are: image, text, label"
    ):
        hf(image_size=16, path=str(folder), text_column="caption", cache_workers=0)
    with pytest.raises(UserError, match="has no split 'dev'; its splits are: train, validation"):
        hf(image_size=16, path=str(folder), val_split="dev", cache_workers=0)
    with pytest.raises(UserError, match="Cannot load the dataset data.path="):
        hf(image_size=16, path=str(tmp_path / "nowhere"), cache_workers=0)
    with pytest.raises(UserError, match="data=hf needs data.path"):
        hf(image_size=16)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match="pip install 'mmtrain\\[hf\\]'"):
        hf(image_size=16, path=str(folder))


@pytest.mark.slow
def test_hf_trains_through_the_cli(tmp_path):
    folder = write_parquet(tmp_path / "pq", train=48, val=12)
    common = ["data=hf", f"data.path={folder}", f"data.cache_dir={tmp_path / 'cache'}", *MODEL_TINY]
    checked = run_cli("validate", *common)
    assert checked.returncode == 0, checked.stderr
    assert "train: 48 rows, 48 usable, 0 bad" in checked.stdout
    run = tmp_path / "run"
    result = run_cli(
        "train", *common, "data.batch_size=16", "trainer.max_epochs=4",
        "model.contrastive_weight=0", "optimizer.lr=3e-3", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["value"] > 0.6  # 3 balanced classes: chance is 1/3


class _Indices:
    """A collate that keeps each batch's sample indices and labels."""

    needs_epoch = False

    def __call__(self, rows):
        return [(int(row[0]), int(row[3])) for row in rows]


def test_streaming_reads_the_split_as_caching_does_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from mmtrain.data.shard_stream import stream_loader

    folder = write_parquet(tmp_path / "pq", train=40)
    cached = hf(image_size=16, path=str(folder), cache_workers=0)["train"]
    streamed = hf(image_size=16, path=str(folder), streaming=True, shuffle_buffer=16)
    train = streamed["train"]
    assert len(train) == 40 and len(streamed["val"]) == 9
    assert train.class_names == cached.class_names and train.texts == cached.texts
    sample = next(iter(train.read(train.shards, None)))
    (image, _, label), problem = train.checker(sample)
    assert problem is None and label == int(cached.labels[0])
    assert np.abs(_mean_colour(image) - _mean_colour(cached.image(0))).max() < 25

    def batches(epoch, start=0):
        loader = stream_loader(
            train, _Indices(), batch_size=8, num_workers=0, shuffle=True, seed=3,
            pin_memory=False, rank=0, world_size=1,
        )  # fmt: skip
        loader.set_epoch(epoch, start)
        return list(loader)

    whole = batches(1)
    assert len(whole) == 5 and sorted(i for b in whole for i, _ in b) == list(range(40))
    assert [i for b in whole for i, _ in b] != list(range(40))  # shuffled
    assert batches(1, start=3 * 8) == whole[3:]  # resumed mid-epoch: the very same batches
    assert batches(2) != whole  # another epoch, another order


def test_streaming_refuses_a_cache_trains_and_resumes_mid_epoch_bit_for_bit(tmp_path):
    folder = write_parquet(tmp_path / "pq", train=48, val=12)
    with pytest.raises(UserError, match="data.streaming=true .* data.cache=true"):
        hf(image_size=16, path=str(folder), streaming=True, cache=True)
    checked = hf(image_size=16, path=str(folder), streaming=True, full_check=True)
    assert len(checked["train"]) == 48 and not checked["train"].bad_rows
    overrides = [
        "data=hf", f"data.path={folder}", "data.streaming=true", *MODEL_TINY,
        f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=16", "trainer.max_epochs=4",
        "model.contrastive_weight=0", "optimizer.lr=3e-3",
    ]  # fmt: skip
    run = tmp_path / "run"
    result = run_cli(
        "train", *overrides, "trainer.checkpoint.every_n_steps=4",
        "trainer.checkpoint.keep_last=3", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert not (tmp_path / "cache").exists()  # nothing cached
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["value"] > 0.6  # 3 balanced classes: chance is 1/3
    # Step 4 is the first batch of epoch 2 (3 batches an epoch): resumed there, the run
    # streams the very batches the uninterrupted one did.
    resumed = resume_from_step(run, 4, tmp_path / "resumed", *overrides)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert_same_weights(run / "checkpoints" / "last.pt", tmp_path / "resumed/checkpoints/last.pt")
