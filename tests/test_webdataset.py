"""data=webdataset: shards streamed with a seeded order, split across loader workers with
no sample twice per epoch, exact mid-epoch resume, labels, bad samples; `mmtrain shards`."""

from __future__ import annotations

import io
import json
import logging
import sys
import time

import pytest
import torch
from conftest import run_cli
from manifest_files import MODEL_TINY, colour_image, write_learnable

from mmtrain.data.loader import Collate, make_loader
from mmtrain.data.shards import require_webdataset, webdataset
from mmtrain.data.tokenizer import build_word_tokenizer
from mmtrain.errors import UserError


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    colour_image(["red", "green", "blue"][seed % 3], seed).save(buffer, "JPEG")
    return buffer.getvalue()


def write_shards(folder, shards=8, per_shard=10, label="cls", broken=()):
    """Shards of samples whose text is unique ("sample N"); `broken` sample numbers get a
    corrupt image."""
    wds = require_webdataset()
    folder.mkdir(parents=True, exist_ok=True)
    number = 0
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for _ in range(per_shard):
                sample = {"__key__": f"{number:06d}", "txt": f"sample {number}"}
                sample["jpg"] = b"not a jpeg" if number in broken else _jpeg(number)
                if label == "cls":
                    sample["cls"] = str(number % 3)
                elif label == "json":
                    sample["json"] = json.dumps({"label": ["red", "green", "blue"][number % 3]})
                sink.write(sample)
                number += 1
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def _splits(tmp_path, **options):
    pattern = write_shards(tmp_path / "train", **options.pop("shards", {}))
    return webdataset(image_size=16, train=pattern, val=pattern, **options)


def _loader(split, workers=2, batch=5, seed=0, rank=0, world=1):
    collate = Collate(build_word_tokenizer(["sample 1"]), 16)
    return make_loader(
        split, collate, batch_size=batch, num_workers=workers, shuffle=True, seed=seed,
        pin_memory=False, rank=rank, world_size=world,
    )  # fmt: skip


def _epoch(loader, epoch, start=0):
    loader.sampler.set_epoch(epoch, start=start)
    return [batch["index"].tolist() for batch in loader]


def test_each_sample_once_per_epoch_across_workers_and_ranks(tmp_path):
    train = _splits(tmp_path)["train"]
    assert len(train) == 80
    loader = _loader(train, workers=2)
    assert len(loader) == 16
    first, second = _epoch(loader, 0), _epoch(loader, 1)
    assert len(first) == 16 and all(len(b) == 5 for b in first)
    seen = [i for batch in first for i in batch]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 80  # every sample once
    assert seen != [i for batch in second for i in batch]  # another order next epoch
    assert _epoch(_loader(train, workers=2), 0) == first  # the same order in another run
    # Two ranks with two workers each: four readers, disjoint, together every sample.
    ranks = [_loader(train, workers=2, rank=r, world=2) for r in (0, 1)]
    parts = [{i for batch in _epoch(loader, 0) for i in batch} for loader in ranks]
    assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 80


def test_images_and_texts_are_decoded_in_the_workers(tmp_path):
    train = _splits(tmp_path)["train"]
    batch = next(iter(_loader(train, workers=2)))
    assert batch["images"].shape == (5, 3, 16, 16) and batch["images"].dtype == torch.uint8
    # the image of sample N is its colour: red (0), green (1), blue (2) in channel order
    for image, label in zip(batch["images"], batch["labels"], strict=True):
        assert image.float().mean(dim=(1, 2)).argmax() == [0, 1, 2][int(label)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_same_batches(tmp_path, workers):
    train = _splits(tmp_path)["train"]
    full = _epoch(_loader(train, workers=workers), 3)
    for stopped in (1, 5, 6):
        resumed = _loader(train, workers=workers)
        rest = _epoch(resumed, 3, start=stopped * 5)
        assert len(resumed) == len(full) - stopped
        assert rest == full[stopped:], stopped


def test_samples_per_epoch_and_too_many_readers(tmp_path):
    train = _splits(tmp_path, samples_per_epoch=40)["train"]
    loader = _loader(train, workers=2)
    assert len(loader) == 8 and len({i for b in _epoch(loader, 0) for i in b}) == 40
    with pytest.raises(UserError, match="8 shard\\(s\\) for 16 readers"):
        _loader(train, workers=8, world=2)
    # Evaluation reads every sample once, also with more readers than shards.
    collate = Collate(build_word_tokenizer(["sample 1"]), 16)
    val = webdataset(image_size=16, train=str(tmp_path / "train" / "00000.tar"),
                     val=str(tmp_path / "train" / "00001.tar"))["val"]  # fmt: skip
    loader = make_loader(val, collate, batch_size=4, num_workers=3, shuffle=False, seed=0)
    assert sorted(i for batch in loader for i in batch["index"].tolist()) == list(range(10))


def test_labels_from_json_names_classes_file_or_num_classes(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mmtrain"):
        split = _splits(tmp_path / "a", shards={"label": "json"})["train"]
    assert split.class_names == ["blue", "green", "red"]
    assert "classes from one scan of the training labels (3 classes)" in caplog.text
    batch = next(iter(_loader(split, workers=0)))
    channel = {2: 0, 1: 1, 0: 2}  # red is class 2 of the sorted names, and channel 0
    for image, label in zip(batch["images"], batch["labels"], strict=True):
        assert image.float().mean(dim=(1, 2)).argmax() == channel[int(label)]
    (tmp_path / "b" / "train").mkdir(parents=True)
    (tmp_path / "b" / "train" / "classes.txt").write_text("red\ngreen\nblue\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmtrain"):
        split = _splits(tmp_path / "b", shards={"label": "json"})["train"]
    assert split.class_names == ["red", "green", "blue"] and "classes.txt" in caplog.text
    split = _splits(tmp_path / "c", num_classes=5)["train"]
    assert split.class_names == ["0", "1", "2", "3", "4"]


def test_bad_samples_are_skipped_and_counted_or_stop(tmp_path):
    splits = _splits(tmp_path, shards={"broken": (3, 41)}, on_bad_sample="skip")
    loader = _loader(splits["train"], workers=2, batch=4)
    seen = [i for batch in _epoch(loader, 0) for i in batch]
    # 78 good samples for an epoch of 80: the two readers that lost one re-read one sample
    assert len(seen) == 80 and len(set(seen)) == 78
    assert 3 not in seen and 40_000_001 not in seen  # sample 3 and 41 (shard 4, place 1)
    assert [r.reason for r in splits["train"].bad_rows] == ["unreadable image"] * 2
    splits = _splits(tmp_path / "e", shards={"broken": (3,)})
    with pytest.raises(UserError) as error:
        _epoch(_loader(splits["train"], workers=2), 0)
    message = str(error.value)
    assert "000003.jpg" in message and "unreadable image" in message
    assert "Traceback" not in message and "on_bad_sample=skip" in message


def test_source_mistakes_are_clear(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="shard file\\(s\\) do not exist"):
        webdataset(image_size=16, train=f"{tmp_path}/{{0..3}}.tar", val=f"{tmp_path}/0.tar")
    with pytest.raises(UserError, match="opens no s3:// URL \\(s3://b/0.tar\\).*pipe:aws s3 cp"):
        webdataset(image_size=16, train="s3://b/{0..1}.tar", val=f"{tmp_path}/0.tar")
    with pytest.raises(
        UserError, match="needs data.train=SHARDS \\(or data.sources\\) and data.val=SHARDS"
    ):
        webdataset(image_size=16, train="x.tar")
    pattern = write_shards(tmp_path / "n", shards=2, label="none")
    with pytest.raises(UserError, match="hold no label"):
        webdataset(image_size=16, train=pattern, val=pattern)
    unlabelled = webdataset(image_size=16, train=pattern, val=pattern, label_key=None)
    assert unlabelled["train"].class_names == ["0"]
    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(UserError, match="pip install 'mmtrain\\[webdataset\\]'"):
        webdataset(image_size=16, train=pattern, val=pattern)


@pytest.mark.slow
def test_shards_command_then_train_and_resume_exactly(tmp_path):
    train, val = write_learnable(tmp_path / "data", train=96, val=24)
    with open(train, "a") as handle:
        handle.write("images/missing.png,a picture,red\n")
    out = tmp_path / "shards"
    refused = run_cli("shards", str(train), str(out / "train"), "shard_size=12")
    assert refused.returncode == 2 and "train.csv:98: missing file" in refused.stderr
    assert not list((out / "train").glob("*.tar"))
    made = run_cli("shards", str(train), str(out / "train"), "shard_size=12", "on_bad_sample=skip")
    assert made.returncode == 0, made.stderr
    assert "wrote 96 samples in 8 shard(s)" in made.stderr
    assert json.loads((out / "train" / "sizes.json").read_text())["00007.tar"] == 12
    assert run_cli("shards", str(val), str(out / "val"), "shard_size=12").returncode == 0
    args = [
        "train", "data=webdataset", f"data.train='{out}/train/{{00000..00007}}.tar'",
        f"data.val='{out}/val/{{00000..00001}}.tar'", "data.batch_size=16", "data.num_workers=2",
        *MODEL_TINY, "trainer.max_epochs=2", "model.contrastive_weight=0", "optimizer.lr=3e-3",
        "trainer.checkpoint.every_n_steps=4", "trainer.checkpoint.keep_last=null",
    ]  # fmt: skip
    full = run_cli(*args, f"hydra.run.dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr + full.stdout
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["best"]["value"] > 0.6  # chance: 1/3
    # Resume from step 4, mid-epoch (6 steps per epoch): the same weights as the full run.
    from conftest import assert_same_weights, resume_from_step

    resumed = resume_from_step(tmp_path / "full", 4, tmp_path / "resumed", *args[1:])
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert_same_weights(
        tmp_path / "full" / "checkpoints" / "last.pt",
        tmp_path / "resumed" / "checkpoints" / "last.pt",
    )
    # Other loader workers would read other batches from the same position: refused.
    step_4 = tmp_path / "full" / "checkpoints" / "step_4.pt"
    other = run_cli(*args, "data.num_workers=1", f"trainer.resume={step_4}",
                    f"hydra.run.dir={tmp_path / 'other'}")  # fmt: skip
    assert other.returncode == 2 and "data.num_workers: 2 in the checkpoint, 1 now" in other.stderr


def test_a_stream_resumed_with_other_loader_workers_is_refused(tmp_path):
    from mmtrain.checkpoint import check_compatible

    def config(name, workers):
        return {"model": {"name": "clip_fusion"}, "data": {"name": name, "num_workers": workers}}

    check_compatible(config("manifest", 2), config("manifest", 0), tmp_path / "last.pt")
    with pytest.raises(UserError) as error:
        check_compatible(config("webdataset", 2), config("webdataset", 0), tmp_path / "last.pt")
    assert "data.num_workers: 2 in the checkpoint, 0 now" in str(error.value)
    assert "other batches" in str(error.value)
    two_ranks = {**config("webdataset", 2), "trainer": {"nproc_per_node": 2}}
    with pytest.raises(UserError, match="trainer.nproc_per_node: 2 in the checkpoint, 1 now"):
        check_compatible(two_ranks, {**two_ranks, "trainer": {"nproc_per_node": 1}}, tmp_path)


def test_validate_decodes_every_sample_and_lists_the_bad(tmp_path):
    pattern = write_shards(tmp_path / "s", shards=2, broken=(4,))
    result = run_cli(
        "validate", "data=webdataset", f"data.train='{pattern}'", f"data.val='{pattern}'",
        *MODEL_TINY,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "000004.jpg" in result.stdout and "unreadable image" in result.stdout
    assert "train: 20 rows, 19 usable, 1 bad" in result.stdout


def test_shards_command_keeps_classes_of_kept_rows_and_nothing_of_a_failed_write(
    tmp_path, monkeypatch
):
    import errno
    import tarfile

    from mmtrain.commands.shards import write_shards as shards_command

    train, _ = write_learnable(tmp_path / "data", train=9, val=1)
    lines = train.read_text().splitlines()
    first = lines[1].split(",")
    with open(train, "a") as handle:  # an unquoted comma: its label would be " square picture"
        handle.write(f"{first[0]},a red, square picture,red\n")
    out = tmp_path / "out%d 100%"  # was: TypeError from a format string
    shards_command([str(train), str(out), "shard_size=4", "on_bad_sample=skip"])
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert (out / "classes.txt").read_text().split("\n")[:-1] == ["blue", "green", "red"]
    assert not list(out.glob(".*"))  # no temporary left
    # A full disk at the second shard: no partial tar, none of the command's files kept.
    calls = {"n": 0}
    addfile = tarfile.TarFile.addfile

    def full_disk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 14:  # 3 members per sample: past the first shard's 4 samples
            raise OSError(errno.ENOSPC, "No space left on device")
        return addfile(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", full_disk)
    full = tmp_path / "full"
    full.mkdir()
    (full / ".00000.tar.999.tmp").write_bytes(b"half a shard")  # a killed command's
    with pytest.raises(UserError, match="no space left on device.*Free space"):
        shards_command([str(train), str(full), "shard_size=4", "on_bad_sample=skip"])
    assert calls["n"] > 14 and list(full.iterdir()) == []


def _as_tar_of_a_folder(shard):
    """Rewrite `shard` as `tar -C DIR -cf SHARD .` writes it: a `./` entry, then `./NAME`s."""
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        folder = tarfile.TarInfo("./")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for member, data in members:
            member.name = f"./{member.name}"
            tar.addfile(member, io.BytesIO(data))


def test_members_named_dot_slash_and_a_truncated_shard(tmp_path, caplog):
    pattern = write_shards(tmp_path / "s", shards=2, label="json")
    for shard in (tmp_path / "s").glob("*.tar"):
        _as_tar_of_a_folder(shard)
    splits = webdataset(image_size=16, train=pattern, val=pattern)
    assert len(splits["train"]) == 20  # was 2: every member read as one key ""
    assert splits["train"].class_names == ["blue", "green", "red"]
    seen = [i for batch in _epoch(_loader(splits["train"], workers=0), 0) for i in batch]
    assert len(set(seen)) == 20  # streamed as 20 samples too, each with its image and text
    # A truncated shard: refused under error, its readable samples kept under skip.
    last = tmp_path / "s" / "00001.tar"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(UserError, match="1 train shard\\(s\\) cannot be read to their end"):
        webdataset(image_size=16, train=pattern, val=pattern)
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        kept = webdataset(image_size=16, train=pattern, val=pattern, on_bad_sample="skip")
    assert 10 < len(kept["train"]) < 20 and "skipped the unreadable tail of 1 train" in caplog.text


def test_a_sample_refused_for_its_members_makes_no_class(tmp_path):
    pattern = write_shards(tmp_path / "s", shards=2, label="json")
    wds = require_webdataset()
    with wds.TarWriter(str(tmp_path / "s" / "00001.tar")) as sink:  # the second shard, again
        sink.write({"__key__": "a", "txt": "no image", "json": json.dumps({"label": "purple"})})
        sink.write({"__key__": "b", "jpg": _jpeg(0), "txt": " ", "json": '{"label": "pink"}'})
        for number in range(4):
            sink.write({"__key__": f"c{number}", "jpg": _jpeg(number), "txt": "a picture",
                        "json": json.dumps({"label": ["red", "green"][number % 2]})})  # fmt: skip
    splits = webdataset(image_size=16, train=pattern, val=pattern, on_bad_sample="skip")
    assert splits["train"].class_names == ["blue", "green", "red"]  # was also pink, purple
    assert len(splits["train"]) == 16


class _Shards:
    """Shards of `folder` served over http on 127.0.0.1 by a thread: `fail(path, number)`
    (the request's path and its number, from 1) says which requests get a 404 (or, for
    "stall", no answer at all) and
    `cut(path, number)` which get the first half of the file, then a closed connection."""

    def __init__(self, folder, fail=lambda path, number: False, cut=lambda path, n: False):
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        requests = self.requests = []

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                requests.append(self.path)
                failing = fail(self.path, len(requests))
                if failing == "stall":  # accept, then send nothing
                    time.sleep(4)
                    return None
                if failing:
                    return self.send_error(404)
                if cut(self.path, len(requests)):
                    data = (folder / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return None
                return super().do_GET()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
        )
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_pipe_and_http_shards_stream_as_local_ones_and_a_cut_transfer_is_read_again(
    tmp_path, caplog
):
    local = write_shards(tmp_path / "s", shards=4, per_shard=5)
    # The second request for shard 2 is cut (the first is the probe of data.train's first
    # shard, from 00000.tar; then the val scan reads each once): read again, from its start.
    cut = {"n": 0}

    def cut_once(path, number):
        cut["n"] += path.endswith("00002.tar")
        return path.endswith("00002.tar") and cut["n"] == 2

    with _Shards(tmp_path / "s", cut=cut_once) as served:
        remote = f"{served.url}/{{00000..00003}}.tar"
        with pytest.raises(UserError, match="data.samples_per_epoch=N"):
            webdataset(image_size=16, train=remote, val=local, num_classes=3)
        with pytest.raises(UserError, match="model.num_classes=K"):
            webdataset(image_size=16, train=remote, val=local, samples_per_epoch=20)
        with caplog.at_level(logging.WARNING, logger="mmtrain"):
            splits = webdataset(image_size=16, train=remote, val=remote, samples_per_epoch=20,
                                num_classes=3, retries=1)  # fmt: skip
            assert len(splits["val"]) == 20  # counted by one scan over http
            piped = webdataset(image_size=16, train=f"pipe:cat {local}", val=local,
                               samples_per_epoch=20, num_classes=3)  # fmt: skip
            by_http, by_pipe = (_epoch(_loader(s["train"], workers=0), 1) for s in (splits, piped))
        assert "00002.tar failed" in caplog.text  # the cut transfer, read again
    by_file = webdataset(image_size=16, train=local, val=local, samples_per_epoch=20)["train"]
    assert by_http == by_pipe == _epoch(_loader(by_file, workers=0), 1)
    assert sorted(i for b in by_http for i in b) == sorted(
        shard * 10_000_000 + place for shard in range(4) for place in range(5)
    )


def test_an_unreachable_shard_is_named_before_training_and_stops_a_stream(tmp_path, monkeypatch):
    from mmtrain.data import samples
    from mmtrain.data.samples import ShardUnreachable

    local = write_shards(tmp_path / "s", shards=4, per_shard=5)
    with pytest.raises(UserError, match="cannot read the shard pipe:cat /no/such.tar after 1"):
        webdataset(image_size=16, train="pipe:cat /no/such.tar", val=local,
                   samples_per_epoch=20, num_classes=3, retries=0)  # fmt: skip
    with _Shards(tmp_path / "s") as served:
        dead = served.url
    with pytest.raises(UserError, match=f"data.val: cannot read the shard {dead}/00000.tar"):
        webdataset(image_size=16, train=local, val=f"{dead}/00000.tar", retries=0)
    # Mid-stream: shard 3 never answers after the probe; the stream names it, exit code 1.
    with _Shards(tmp_path / "s", fail=lambda path, n: path.endswith("00003.tar")) as served:
        train = webdataset(image_size=16, train=f"{served.url}/{{00000..00003}}.tar", val=local,
                           samples_per_epoch=20, num_classes=3, retries=1)["train"]  # fmt: skip
        with pytest.raises(ShardUnreachable) as error:
            _epoch(_loader(train, workers=2), 0)
        assert served.requests.count("/00003.tar") == 2  # tried twice (data.retries=1)
    message = str(error.value)
    assert f"cannot read the shard {served.url}/00003.tar after 2 tries" in message
    assert "Traceback" not in message and error.value.exit_code == 1
    # A server that accepts and then sends nothing: a failed try after STALL_SECONDS.
    monkeypatch.setattr(samples, "STALL_SECONDS", 1)
    with _Shards(tmp_path / "s", fail=lambda path, n: "stall") as served:
        started = time.monotonic()
        with pytest.raises(UserError, match="curl exited with status 28"):
            webdataset(image_size=16, train=f"{served.url}/00000.tar", val=local,
                       samples_per_epoch=20, num_classes=3, retries=0)  # fmt: skip
        assert time.monotonic() - started < 4


def test_weighted_sources_and_resampled_shards_resume_exactly(tmp_path):
    from mmtrain.data.shards import ShardSet

    a = write_shards(tmp_path / "a", shards=4, per_shard=2)
    b = write_shards(tmp_path / "b", shards=4, per_shard=2)
    sources = [ShardSet(a, 3.0), ShardSet(f"pipe:cat {b}", 1.0)]
    with pytest.raises(UserError, match="data.samples_per_epoch=N"):
        webdataset(image_size=16, sources=sources, val=a, num_classes=3)
    with pytest.raises(UserError, match="set data.resampled=true"):
        webdataset(image_size=16, sources=sources, val=a, num_classes=3, resampled=False,
                   samples_per_epoch=8)  # fmt: skip
    train = webdataset(image_size=16, sources=sources, val=a, num_classes=3,
                       samples_per_epoch=400, shuffle_buffer=20)["train"]  # fmt: skip
    full = _epoch(_loader(train, workers=2, batch=10), 2)
    seen = [i for batch in full for i in batch]
    assert len(seen) == 400 and 0.65 < sum(i < 4 * 10_000_000 for i in seen) / 400 < 0.85
    rest = _epoch(_loader(train, workers=2, batch=10), 2, start=70)
    assert rest == full[7:]  # resumed at batch 7: the same batches
    assert _epoch(_loader(train, workers=2, batch=10), 3) != full  # other draws next epoch
    # One shard for four readers is fine when they draw with replacement.
    one = webdataset(image_size=16, train=str(tmp_path / "a" / "00000.tar"), val=a,
                     resampled=True, samples_per_epoch=40)["train"]  # fmt: skip
    assert len({i for b in _epoch(_loader(one, workers=2, batch=5, world=2), 0) for i in b}) == 2


def test_a_mixture_weight_must_be_positive_in_the_spec():
    from mmtrain import registry

    sources = [{"urls": "a.tar"}, {"urls": "b.tar", "weight": 2}]
    registry.check("data", {"name": "webdataset", "sources": sources}, ["image_size"])
    sources[1]["weight"] = 0
    with pytest.raises(UserError, match="sources.1.weight' of data 'webdataset' must be a pos"):
        registry.check("data", {"name": "webdataset", "sources": sources}, ["image_size"])


def test_a_server_that_stops_answering_ends_the_run_with_exit_1_and_a_whole_checkpoint(tmp_path):
    local = write_shards(tmp_path / "s", shards=4, per_shard=8)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    # Every request fails once the first epoch's last.pt is written: the second epoch's.
    with _Shards(tmp_path / "s", fail=lambda path, number: last.exists()) as served:
        mixture = f"data.sources=[{{urls:'{served.url}/{{00000..00003}}.tar',weight:2}}]"
        result = run_cli(
            "train", "data=webdataset", mixture, f"data.val='{local}'",
            "data.samples_per_epoch=32", "data.batch_size=8", "data.retries=1",
            "model.num_classes=3", *MODEL_TINY, "trainer.max_epochs=3",
            f"hydra.run.dir={tmp_path / 'run'}",
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"cannot read the shard {served.url}/0000" in result.stderr
    assert "curl exited with status 22" in result.stderr and "Traceback" not in result.stderr
    assert "try 2 of 2" in (tmp_path / "run" / "train.log").read_text()
    assert torch.load(last, weights_only=False)["data"]["step"] == 4  # whole, after epoch 1
