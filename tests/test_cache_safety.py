"""The image cache checks itself (index, sizes, checksums), is built by worker processes,
and a signal during its build stops it cleanly, leaving no temporary file behind."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from manifest_files import MODEL_TINY, write_csv, write_learnable
from PIL import Image

from mmtrain import registry
from mmtrain.data.manifest import manifest
from mmtrain.errors import UserError


def _load(train, val, workers=0, **options):
    options = {"cache_scale": 1.0, **options}
    return manifest(image_size=16, train=str(train), val=str(val), cache_workers=workers, **options)


def _train_cache(folder):
    """(array, index) of the training manifest's cache (the larger of the two)."""
    arrays = sorted((folder / ".mmtrain_cache").glob("*.npy"), key=lambda p: p.stat().st_size)
    return arrays[-1], arrays[-1].with_suffix(".json")


def test_worker_processes_build_the_same_cache_as_threads(tmp_path):
    train, val = write_learnable(tmp_path / "a", train=70, val=3)
    threads = _load(train, val, workers=0)["train"].images.clone()
    shutil.rmtree(tmp_path / "a" / ".mmtrain_cache")
    processes = _load(train, val, workers=2)
    assert torch.equal(processes["train"].images, threads)
    data, meta = _train_cache(tmp_path / "a")
    index = json.loads(meta.read_text())
    assert index["shape"] == [70, 3, 16, 16] and index["bytes"] == data.stat().st_size
    assert len(index["crc32"]) == 70 and len(set(index["crc32"])) > 1


@pytest.mark.parametrize(
    "damage",
    ["truncated", "broken index", "index of other rows", "index without bytes", "bytes as text"],
)
def test_a_damaged_cache_is_named_discarded_and_rebuilt(tmp_path, caplog, damage):
    train, val = write_learnable(tmp_path, train=9, val=3)
    good = _load(train, val)["train"].images.clone()
    data, meta = _train_cache(tmp_path)
    if damage == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif damage == "broken index":
        meta.write_text(meta.read_text()[:40])
    else:
        index = json.loads(meta.read_text())
        if damage == "index of other rows":
            index["crc32"] = index["crc32"][:-1]
        elif damage == "index without bytes":  # was KeyError: 'bytes' in validate and train
            del index["bytes"]
        else:
            index["bytes"] = "many"
        meta.write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        rebuilt = _load(train, val)
    assert f"the image cache {data} is damaged" in caplog.text
    assert torch.equal(rebuilt["train"].images, good)
    assert rebuilt["train"].images.shape == (9, 3, 16, 16)


def test_overwritten_pixels_are_found_by_verify_and_rebuilt(tmp_path, caplog):
    train, val = write_learnable(tmp_path, train=9, val=3)
    good = _load(train, val)["train"].images.clone()
    data, _ = _train_cache(tmp_path)
    array = np.load(data, mmap_mode="r+")
    array[4, 0, :2] = 255 - array[4, 0, :2]  # same size, other bytes: only a checksum sees it
    array.flush()
    del array
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        checked = _load(train, val, full_check=True)
    assert "fail their checksum (4)" in caplog.text and str(data) in caplog.text
    assert torch.equal(checked["train"].images, good)


def test_validate_checks_cached_pixels(tmp_path):
    train, val = write_learnable(tmp_path, train=9, val=3)
    args = ["data=manifest", f"data.train={train}", f"data.val={val}", *MODEL_TINY]
    assert run_cli("validate", *args).returncode == 0
    data, _ = _train_cache(tmp_path)
    array = np.load(data, mmap_mode="r+")
    array[2] = 0
    array.flush()
    del array
    result = run_cli("validate", *args)
    assert result.returncode == 0, result.stderr
    log = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert "is damaged" in log and "fail their checksum (2)" in log and "Traceback" not in log
    assert zlib_rows_ok(data)


def zlib_rows_ok(data) -> bool:
    """Every row of the cache at `data` matches the checksum in its index."""
    import zlib

    index = json.loads(data.with_suffix(".json").read_text())
    array = np.load(data, mmap_mode="r")
    return all(zlib.crc32(array[i]) == crc for i, crc in enumerate(index["crc32"]))


def test_stale_temporaries_of_a_killed_build_are_removed(tmp_path, caplog):
    train, val = write_learnable(tmp_path, train=6, val=3)
    folder = tmp_path / ".mmtrain_cache"
    folder.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    pid = int(dead.stdout)
    stale = folder / f".{'0' * 32}.{pid}.tmp.npy"
    stale.write_bytes(b"\0" * 1000)
    live = folder / f".{'1' * 32}.{os.getpid()}.tmp.npy"  # a build that is still running
    live.write_bytes(b"\0")
    with caplog.at_level(logging.INFO, logger="mmtrain"):
        _load(train, val)
    assert not stale.exists() and live.exists()
    assert f"removed {stale}" in caplog.text and "killed" in caplog.text


def test_bad_cache_options_are_refused(tmp_path):
    train, val = write_learnable(tmp_path, train=3, val=3)
    config = {"name": "manifest", "train": str(train), "val": str(val)}
    with pytest.raises(
        UserError, match="Key 'cache_workers' of data 'manifest' must be an integer >= 0 or null"
    ):
        registry.build("data", {**config, "cache_workers": -1}, image_size=16)
    with pytest.raises(UserError, match="Key 'cache' of data 'manifest' must be true or false"):
        registry.build("data", {**config, "cache": "yes"}, image_size=16)
    assert not (tmp_path / ".mmtrain_cache").exists()  # refused before anything is decoded


def test_cache_false_decodes_on_read_and_checks_headers(tmp_path):
    train, val = write_learnable(tmp_path, train=6, val=3)
    cached = _load(train, val)["train"]
    shutil.rmtree(tmp_path / ".mmtrain_cache")
    uncached = _load(train, val, cache=False)["train"]
    assert not (tmp_path / ".mmtrain_cache").exists()
    assert all(torch.equal(uncached.image(i), cached.image(i)) for i in range(len(cached)))
    (tmp_path / "images" / "train_3.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="train.csv:5: unreadable image"):
        _load(train, val, cache=False)


def _slow_manifest(folder, rows=40):
    """A manifest of large PNGs (each takes a worker about 0.4 s), so a build lasts a while."""
    (folder / "images").mkdir(parents=True)
    pixels = np.zeros((5000, 5000, 3), np.uint8)
    pixels[::7] = 200
    Image.fromarray(pixels).save(folder / "images" / "big0.png")
    for index in range(1, rows):
        shutil.copy(folder / "images" / "big0.png", folder / "images" / f"big{index}.png")
    records = [
        {"image": f"images/big{i}.png", "text": "stripes", "label": i % 2} for i in range(rows)
    ]
    return write_csv(folder / "train.csv", records), write_csv(folder / "val.csv", records[:2])


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_group_stops_the_build_cleanly(tmp_path, sig, code):
    train, val = _slow_manifest(tmp_path)
    args = [
        "train", "data=manifest", f"data.train={train}", f"data.val={val}",
        "data.cache_workers=2", f"hydra.run.dir={tmp_path / 'run'}", *MODEL_TINY,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-m", "mmtrain", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "decoding 40 images" in line:
            break
    folder = tmp_path / ".mmtrain_cache"
    deadline = time.monotonic() + 30
    while not list(folder.glob(".*.tmp.npy")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the workers are decoding now
    assert list(folder.glob(".*.tmp.npy")), "".join(lines)
    sent = time.monotonic()
    os.killpg(process.pid, sig)
    try:
        rest, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    output = "".join(lines) + rest
    assert process.returncode == code, output
    assert time.monotonic() - sent < 10
    assert f"{signal.Signals(sig).name} received while building the image cache" in output
    assert "Traceback" not in output
    assert not [p.name for p in folder.iterdir() if p.suffix in (".npy", ".json")]
    # Every worker process of the group is gone (multiprocessing's resource tracker, which
    # ignores signals, exits as soon as the parent has).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _group_alive(process.pid):
        time.sleep(0.1)
    assert not _group_alive(process.pid), _group(process.pid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _group(pgid: int) -> str:
    return subprocess.run(
        ["ps", "-o", "pid,stat,args", "-g", str(pgid)], capture_output=True, text=True
    ).stdout
