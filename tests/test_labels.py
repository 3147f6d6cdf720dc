"""One label rule for every source: the manifest (CSV and JSONL), hf, webdataset (a `cls`
file or a json field) and the shards `mmtrain shards` writes give the same verdict for the
same label, and the training labels define the classes the same way in each."""

from __future__ import annotations

import io
import json

import pytest
from manifest_files import colour_image, write_csv, write_jsonl

from mmtrain.commands.shards import write_shards
from mmtrain.data.hf import hf, require_datasets
from mmtrain.data.labels import Classes, class_id, classes_of, resolve_label
from mmtrain.data.manifest import manifest
from mmtrain.data.samples import require_webdataset
from mmtrain.data.shards import webdataset

PROBES = ["3", "03", "-1", " 2 ", 2, True, "cat"]
IDS = ["0", "1", "2", "3"]  # training labels that are class ids: classes 0..3
NAMES = ["cat", "dog", "3", "2"]  # training labels that are names: 2, 3, cat, dog
UNKNOWN, INVALID = "unknown label", "invalid label"
# The verdict for each probe: its class name, or the reason it is a bad row.
EXPECTED = {
    "ids": {"3": "3", "03": UNKNOWN, "-1": UNKNOWN, " 2 ": "2", 2: "2", True: INVALID, "cat": UNKNOWN},
    "names": {"3": "3", "03": UNKNOWN, "-1": UNKNOWN, " 2 ": UNKNOWN, 2: "2", True: INVALID, "cat": "cat"},
}  # fmt: skip
TRAINING = {"ids": IDS, "names": NAMES}


def _key(probe) -> str:
    return repr(probe)


def _verdict(classes: Classes, resolved) -> str:
    label, problem = resolved
    return problem[0] if problem else classes.names[label]


def test_class_ids_are_canonical_non_negative_integers():
    assert [class_id(v) for v in ("3", " 2 ", "0", 0, 7)] == [3, 2, 0, 0, 7]
    assert [class_id(v) for v in ("03", "-1", "+1", "3.0", "", -1, True, False, 2.0, None)] == [
        None
    ] * 10


@pytest.mark.parametrize("probe", PROBES, ids=_key)
def test_training_labels_are_ids_only_when_each_is_one(probe):
    classes = classes_of(["0", "1", probe])
    if probe in ("3", " 2 ", 2, True):  # a bool takes no part: it is an invalid label
        count = {"3": 4, " 2 ": 3, 2: 3, True: 2}[probe]
        assert classes == Classes([str(i) for i in range(count)], ids=True)
    else:
        assert classes == Classes(sorted({"0", "1", probe}), ids=False)
    assert classes_of(["1", "4"], num_classes=6).names == ["0", "1", "2", "3", "4", "5"]


@pytest.mark.parametrize("scenario", ["ids", "names"])
def test_one_function_resolves_every_label(scenario):
    classes = classes_of(TRAINING[scenario])
    assert classes.ids == (scenario == "ids")
    for probe in PROBES:
        assert _verdict(classes, resolve_label(probe, classes)) == EXPECTED[scenario][probe], probe
    assert resolve_label(4, classes_of(IDS))[1][0] == "label out of range"
    assert (
        resolve_label(" ", classes)[1][0] == resolve_label(None, classes)[1][0] == "missing label"
    )


# --- the sources ---------------------------------------------------------------------


def _image(folder, number: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{number}.png"
    colour_image(["red", "green", "blue"][number % 3], number).save(path)
    return str(path)


def _rows(folder, labels, first=0) -> list[dict]:
    return [
        {"image": _image(folder, first + i), "text": f"row {first + i}", "label": label}
        for i, label in enumerate(labels)
    ]


def _split_verdicts(split) -> dict[str, str]:
    """{text: class name} of the usable rows, {line: reason} of the bad ones."""
    found = {
        text: split.class_names[int(label)]
        for text, label in zip(split.texts, split.labels, strict=True)
    }
    found.update({f"line {row.line}": row.reason for row in split.bad_rows})
    return found


def _manifest_verdict(tmp_path, training, probe, suffix) -> str:
    write = write_jsonl if suffix == "jsonl" else write_csv
    train = write(tmp_path / f"train.{suffix}", _rows(tmp_path, training))
    val = write(tmp_path / f"val.{suffix}", _rows(tmp_path, [probe], first=100))
    splits = manifest(
        image_size=16, train=str(train), val=str(val), on_bad_sample="skip", cache=False
    )
    [verdict] = _split_verdicts(splits["val"]).values()
    return verdict


def _hf_verdict(tmp_path, training, probe) -> str:
    datasets = require_datasets()
    parts = {"train": _rows(tmp_path, training), "validation": _rows(tmp_path, [probe], 100)}
    columns = {
        name: datasets.Dataset.from_dict({k: [row[k] for row in rows] for k in rows[0]})
        for name, rows in parts.items()
    }
    datasets.DatasetDict(columns).save_to_disk(str(tmp_path / "hf"))
    splits = hf(image_size=16, path=str(tmp_path / "hf"), on_bad_sample="skip", cache=False)
    [verdict] = _split_verdicts(splits["val"]).values()
    return verdict


def _jpeg(number: int) -> bytes:
    buffer = io.BytesIO()
    colour_image("red", number).save(buffer, "JPEG")
    return buffer.getvalue()


def _shard(path, labels: list, member: str) -> str:
    """A shard with one sample per label: its text as a `cls` file, or a json field."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with require_webdataset().TarWriter(str(path)) as sink:
        for number, label in enumerate(labels):
            sample = {"__key__": f"{number:06d}", "jpg": _jpeg(number), "txt": f"row {number}"}
            if member == "cls":
                sample["cls"] = label
            else:
                sample["json"] = json.dumps({"label": label})
            sink.write(sample)
    return str(path)


def _shard_verdicts(split, pattern: str) -> dict[str, str]:
    """{text: class name or bad-sample reason} of every sample, as the source reads them."""
    found = {}
    for sample in require_webdataset().tarfile_to_samples()([{"url": pattern}]):
        decoded, problem = split.checker(sample, decode=False)
        text = sample["txt"].decode()
        found[text] = problem[0] if problem else split.class_names[decoded[2]]
    return found


def _webdataset_verdict(tmp_path, training, probe, member) -> str:
    train = _shard(tmp_path / "train.tar", training, "cls")
    val = _shard(tmp_path / "val.tar", [probe], member)
    splits = webdataset(image_size=16, train=train, val=val, on_bad_sample="skip")
    return _shard_verdicts(splits["val"], val)["row 0"]


@pytest.mark.parametrize("probe", PROBES, ids=_key)
@pytest.mark.parametrize("scenario", ["ids", "names"])
def test_every_source_gives_the_same_verdict(tmp_path, scenario, probe):
    training, expected = TRAINING[scenario], EXPECTED[scenario][probe]
    verdicts = {
        "manifest jsonl": _manifest_verdict(tmp_path / "jsonl", training, probe, "jsonl"),
        "hf": _hf_verdict(tmp_path / "hf", training, probe),
        "webdataset json": _webdataset_verdict(tmp_path / "json", training, probe, "json"),
    }
    if isinstance(probe, str):  # what a CSV cell and a cls file can hold
        verdicts["manifest csv"] = _manifest_verdict(tmp_path / "csv", training, probe, "csv")
        verdicts["webdataset cls"] = _webdataset_verdict(tmp_path / "cls", training, probe, "cls")
    assert verdicts == dict.fromkeys(verdicts, expected)


@pytest.mark.parametrize("probe", PROBES, ids=_key)
@pytest.mark.parametrize("scenario", ["ids", "names"])
def test_mmtrain_shards_read_back_as_the_manifest_reads(tmp_path, scenario, probe):
    rows = _rows(tmp_path / "images", [*TRAINING[scenario], probe])
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    split = manifest(
        image_size=16, train=str(path), val=str(path), on_bad_sample="skip", cache=False
    )["train"]
    expected = _split_verdicts(split)
    write_shards([str(path), str(tmp_path / "shards"), "on_bad_sample=skip"])
    shard = str(tmp_path / "shards" / "00000.tar")
    streamed = webdataset(image_size=16, train=shard, val=shard)["train"]
    assert streamed.class_names == split.class_names
    good = {text: name for text, name in expected.items() if text.startswith("row")}
    assert _shard_verdicts(streamed, shard) == good
    # Every row is written but the one with an invalid label.
    assert (f"row {len(rows) - 1}" in good) == (probe is not True)


def test_with_classes_txt_a_cls_file_holds_a_class_id(tmp_path):
    """open_clip's layout: classes.txt names the ids, a `cls` file holds an id; a json
    label (as `mmtrain shards` writes beside a cls file) is a class name."""
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\n")
    cls = _shard(tmp_path / "cls.tar", ["2", "0", "blue", "3", "-1", "02"], "cls")
    named = _shard(tmp_path / "json.tar", ["blue", "2", 0], "json")
    splits = webdataset(image_size=16, train=cls, val=named)
    assert splits["train"].class_names == ["red", "green", "blue"]
    assert _shard_verdicts(splits["train"], cls) == {
        "row 0": "blue",
        "row 1": "red",
        "row 2": "blue",
        "row 3": "label out of range",
        "row 4": UNKNOWN,
        "row 5": UNKNOWN,
    }
    assert _shard_verdicts(splits["val"], named) == {
        "row 0": "blue",
        "row 1": UNKNOWN,
        "row 2": UNKNOWN,
    }
