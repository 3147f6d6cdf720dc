"""The decoded-image cache: built once, reused, rebuilt when what it depends on changes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from manifest_files import colour_image, write_learnable

import mmtrain.data.cache as cache_module
from mmtrain.data.manifest import manifest
from mmtrain.errors import UserError


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images decoded (the cache's calls of load_image)."""
    calls = []
    real = cache_module.load_whole

    def counting(path, size, max_pixels):
        calls.append(path)
        return real(path, size, max_pixels)

    monkeypatch.setattr(cache_module, "load_whole", counting)
    return calls


def _load(train, val, size=16, cache_workers=0, cache_scale=1.0, **options):
    return manifest(
        image_size=size,
        train=str(train),
        val=str(val),
        cache_workers=cache_workers,
        cache_scale=cache_scale,
        **options,
    )


def _cache_files(folder):
    return sorted(p.name for p in (folder / ".mmtrain_cache").iterdir())


def test_built_once_then_reused_and_memory_mapped(tmp_path, decodes):
    train, val = write_learnable(tmp_path, train=9, val=3)
    first = _load(train, val)
    assert len(decodes) == 12
    files = _cache_files(tmp_path)
    # per manifest: KEY.npy, KEY.json and KEY.lock; no temporary file left behind
    assert len(files) == 6 and not [f for f in files if f.startswith(".")]
    second = _load(train, val)
    assert len(decodes) == 12  # nothing decoded again
    assert torch.equal(first["train"].images, second["train"].images)
    arrays = [np.load(f, mmap_mode="r") for f in (tmp_path / ".mmtrain_cache").glob("*.npy")]
    assert sorted(a.shape for a in arrays) == [(3, 3, 16, 16), (9, 3, 16, 16)]
    [on_disk] = [a for a in arrays if len(a) == 9]
    assert on_disk.dtype == np.uint8
    assert np.array_equal(on_disk, second["train"].images.numpy())
    assert _mapped_file(second["train"].images) in (tmp_path / ".mmtrain_cache").glob("*.npy")


def _mapped_file(tensor: torch.Tensor) -> Path | None:
    """The file whose memory mapping holds `tensor`'s data (Linux's /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    address = tensor.data_ptr()
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end and len(fields) == 6:
            return Path(fields[5].strip())
    return None


def test_reused_by_another_process(tmp_path, decodes):
    train, val = write_learnable(tmp_path, train=6, val=3)
    _load(train, val)
    code = (
        "from mmtrain.data import cache, manifest as m\n"
        "built = []\n"
        "real = cache.cached_images\n"
        "def spy(*a, **k):\n"
        "    out = real(*a, **k); built.append(out.built); return out\n"
        "cache.cached_images = spy  # what decoded_images calls\n"
        f"m.manifest(image_size=16, train={str(train)!r}, val={str(val)!r}, cache_scale=1.0)\n"
        "print('built', built)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "built [False, False]" in result.stdout


def test_rebuilt_when_the_manifest_changes(tmp_path, decodes):
    train, val = write_learnable(tmp_path, train=6, val=3)
    _load(train, val)
    before = len(decodes)
    train.write_text(train.read_text().replace("mostly red", "mostly rather red"))
    splits = _load(train, val)
    assert len(decodes) == before + 6  # the train manifest's images, not val's
    assert "a picture that is mostly rather red" in splits["train"].texts


def test_rebuilt_when_an_image_file_changes(tmp_path, decodes):
    train, val = write_learnable(tmp_path, train=6, val=3)
    old = _load(train, val)["train"].image(0).clone()
    image = tmp_path / "images" / "train_0.jpg"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: mtime only
    _load(train, val)
    assert len(decodes) == 9 + 6
    colour_image("blue", 0).save(image)  # new content (size and mtime change)
    new = _load(train, val)["train"].image(0)
    assert len(decodes) == 9 + 12
    assert new[2].float().mean() > new[0].float().mean() and not torch.equal(new, old)


def test_rebuilt_for_another_resolution_and_kept_for_both(tmp_path, decodes):
    train, val = write_learnable(tmp_path, train=6, val=3)
    assert _load(train, val, size=16)["train"].images.shape[-1] == 16
    assert _load(train, val, size=24)["train"].images.shape[-1] == 24
    assert len(decodes) == 18
    _load(train, val, size=16)
    _load(train, val, size=24)
    assert len(decodes) == 18


def test_cache_dir_setting_and_a_half_written_cache(tmp_path, decodes):
    train, val = write_learnable(tmp_path / "data", train=6, val=3)
    elsewhere = tmp_path / "shared_cache"
    _load(train, val, cache_dir=str(elsewhere))
    assert not (tmp_path / "data" / ".mmtrain_cache").exists()
    # A job killed mid-build leaves no .json: the .npy is not trusted, the cache is rebuilt.
    for meta in elsewhere.glob("*.json"):
        meta.unlink()
    for data in elsewhere.glob("*.npy"):
        data.write_bytes(b"garbage")
    splits = _load(train, val, cache_dir=str(elsewhere))
    assert len(decodes) == 18 and splits["train"].images.shape == (6, 3, 16, 16)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="Set data.cache_dir to a writable folder"):
        _load(train, val, cache_dir=str(tmp_path / "a_file" / "cache"))


def test_concurrent_jobs_decode_once(tmp_path, decodes):
    train, val = write_learnable(tmp_path, train=30, val=3)
    results, errors = [], []

    def job():
        try:
            results.append(_load(train, val)["train"].images)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=job) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(decodes) == 33  # one build per manifest; the other jobs waited and reused it
    assert all(torch.equal(results[0], other) for other in results[1:])
