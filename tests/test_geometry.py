"""The cache keeps whole pictures: evaluation sees the processor's centre square (cut at load
time), training's random_resized_crop reaches the whole picture (cut on the device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from manifest_files import write_csv
from PIL import Image

from mmtrain import registry
from mmtrain.data.images import load_image
from mmtrain.data.loader import PairDataset
from mmtrain.data.manifest import manifest
from mmtrain.errors import UserError


def _stripes(path, width=96, height=32):
    """A wide picture: red left third, green centre (the centre square), blue right third."""
    pixels = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    pixels[:, :third] = (230, 20, 20)
    pixels[:, third : 2 * third] = (20, 230, 20)
    pixels[:, 2 * third :] = (20, 20, 230)
    Image.fromarray(pixels).save(path)
    return path


def _split(tmp_path, scale=1.5):
    _stripes(tmp_path / "wide.png")
    rows = [{"image": "wide.png", "text": "stripes", "label": 0}] * 4
    train = write_csv(tmp_path / "train.csv", rows)
    splits = manifest(
        image_size=16, train=str(train), val=str(train), cache_workers=0, cache_scale=scale
    )
    return splits["train"]


def test_evaluation_sees_the_processors_centre_square(tmp_path):
    split = _split(tmp_path)
    assert split.images.shape == (4, 3, 24, 24)  # whole pictures at 16 x 1.5
    assert split.aspect(0) == pytest.approx(3.0)
    image = PairDataset(split)[0][1]
    processor = torch.from_numpy(load_image(tmp_path / "wide.png", 16, 10**8).copy())
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert (image.float() - processor.float()).abs().mean() < 8
    assert image[1].float().mean() > 200 and image[0].float().mean() < 40  # green only


def _crop(split, key, **options):
    """The training crop of the 4 rows of `split`, whole pictures cut on the device."""
    from mmtrain import registry
    from mmtrain.data.augment import IMAGE, ImageAugment

    items = [PairDataset(split, whole=True)[i] for i in range(len(split))]
    images = torch.stack([item[1] for item in items])
    aspects = torch.tensor([item[7] for item in items], dtype=torch.float32)
    crop = ImageAugment(
        [("random_resized_crop", registry.get(IMAGE, "random_resized_crop"), options)], 3, 16
    )
    return crop({"images": images, "aspects": aspects}, key)


def test_random_resized_crop_reaches_outside_the_centre_square(tmp_path):
    split = _split(tmp_path)
    assert PairDataset(split, whole=True)[0][1].shape == (3, 24, 24)  # uncut, with its aspect
    options = {"p": 1.0, "scale": [0.2, 0.3], "ratio": [0.75, 1.333]}
    out = torch.cat([_crop(split, (step, 0, 0), **options)["images"] for step in range(8)])
    assert out.shape == (32, 3, 16, 16)
    means = out.mean(dim=(2, 3))
    # Boxes anywhere in the picture: some mostly red, some mostly blue, neither of which is
    # in the centre square, the only part a centre-cropped cache could hold.
    assert means[:, 0].max() > 150 and means[:, 2].max() > 150
    again = _crop(split, (2, 0, 0), **options)["images"]
    assert torch.equal(again, _crop(split, (2, 0, 0), **options)["images"])  # keyed by step
    assert not torch.equal(again, _crop(split, (3, 0, 0), **options)["images"])
    # An image the crop passes over gets the processor's centre square: green only.
    centre = _crop(split, (0, 0, 0), p=0.0)["images"]
    assert centre.shape == (4, 3, 16, 16) and "aspects" not in _crop(split, (0, 0, 0))
    assert centre[:, 1].mean() > 200 and centre[:, 0].mean() < 40 and centre[:, 2].mean() < 40


def test_cache_scale_is_checked(tmp_path):
    train = write_csv(tmp_path / "train.csv", [{"image": "x.png", "text": "t", "label": 0}])
    config = {"name": "manifest", "train": str(train), "val": str(train), "cache_scale": 0.5}
    with pytest.raises(UserError) as error:
        registry.build("data", config, image_size=16)
    assert str(error.value) == (
        "Key 'cache_scale' of data 'manifest' must be a number >= 1 and <= 4 (got 0.5)."
    )
