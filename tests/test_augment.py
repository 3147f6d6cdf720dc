"""Augmentation: each component, reproducibility under the seed, train split only, resume."""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from conftest import (
    CONF,
    TINY,
    assert_same_weights,
    build_parts,
    data_loader,
    resume_from_step,
    run_cli,
)
from conftest import compose_train as _compose

from mmtrain import registry
from mmtrain.data import augment
from mmtrain.errors import UserError

IMAGE_AUGMENTS = ["flip", "random_resized_crop", "color_jitter", "gaussian_noise"]
TEXT_AUGMENTS = ["word_dropout", "word_swap", "char_noise"]


def _images(batch: int = 8, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(0))


def _apply(name: str, step: int, seed: int = 0, p: float = 1.0, **options) -> torch.Tensor:
    entries = augment.parse({name: {"p": p, **options}})[augment.IMAGE]
    return augment.ImageAugment(entries, seed)({"images": _images()}, step)["images"]


@pytest.mark.parametrize("name", IMAGE_AUGMENTS)
def test_image_augmentations_are_reproducible_per_seed_and_step(name):
    first, again = _apply(name, step=3), _apply(name, step=3)
    assert first.shape == (8, 3, 16, 16) and first.dtype == torch.float32
    assert first.min() >= 0 and first.max() <= 255
    assert torch.equal(first, again)
    assert not torch.equal(first, _images().float())  # p=1: it did something
    half = _apply(name, step=3, p=0.5)
    assert torch.equal(half, _apply(name, step=3, p=0.5))
    assert not torch.equal(half, _apply(name, step=4, p=0.5))  # another step, other draws
    assert not torch.equal(half, _apply(name, step=3, seed=1, p=0.5))  # another seed too


def test_flip_mirrors_and_probability_selects_images():
    assert torch.equal(_apply("flip", step=0), _images().float().flip(-1))
    entries = augment.parse({"flip": {"p": 0.5}})[augment.IMAGE]
    out = augment.ImageAugment(entries, 0)({"images": _images(64)}, 0)["images"]
    flipped = [torch.equal(o, i.float().flip(-1)) for o, i in zip(out, _images(64), strict=True)]
    kept = [torch.equal(o, i.float()) for o, i in zip(out, _images(64), strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 16 < sum(flipped) < 48


def test_strengths_do_what_they_say():
    # the whole image, unchanged aspect: the crop is the identity
    same = _apply("random_resized_crop", step=0, scale=[1.0, 1.0], ratio=[1.0, 1.0])
    assert torch.allclose(same, _images().float(), atol=1e-3)
    same = _apply("color_jitter", step=0, brightness=0, contrast=0, saturation=0, hue=0)
    assert torch.allclose(same, _images().float(), atol=1e-2)
    grey = torch.full((8, 3, 16, 16), 128, dtype=torch.uint8)
    entries = augment.parse({"gaussian_noise": {"p": 1.0, "std": 0.1}})[augment.IMAGE]
    noisy = augment.ImageAugment(entries, 0)({"images": grey}, 0)["images"]
    assert abs(float((noisy - 128).std()) - 25.5) < 2


def test_text_augmentations():
    text = "a small red circle in the top left"
    for name in TEXT_AUGMENTS:
        fn = registry.get(augment.TEXT, name)
        first = fn(text, random.Random(5), p=0.5)
        assert first == fn(text, random.Random(5), p=0.5) and first != text and first.strip()
    assert registry.get(augment.TEXT, "word_dropout")(text, random.Random(0), p=1.0) in text.split()
    assert registry.get(augment.TEXT, "word_swap")("red circle", random.Random(0), p=1.0) == (
        "circle red"
    )
    words = registry.get(augment.TEXT, "word_dropout")(text * 50, random.Random(0), p=0.2)
    assert 0.7 < len(words.split()) / len((text * 50).split()) < 0.9


def test_config_mistakes_are_clear():
    with pytest.raises(UserError, match="Unknown augmentation data.augment.flop; registered:"):
        augment.parse({"flop": {"p": 0.5}})
    with pytest.raises(UserError, match="Unknown key 'prob' for image_augment 'flip'"):
        augment.parse({"flip": {"prob": 0.5}})
    with pytest.raises(
        UserError, match=r"Key 'p' of image_augment 'flip' must be a number >= 0 and <= 1"
    ):
        augment.parse({"flip": {"p": 1.5}})
    with pytest.raises(UserError, match="data.augment.flip must be a mapping"):
        augment.parse({"flip": 0.5})
    entries = augment.parse({"flip": {"p": 0.0}, "word_swap": {"p": 0.2}})
    assert entries[augment.IMAGE] == [] and [e[0] for e in entries[augment.TEXT]] == ["word_swap"]


def test_only_the_mild_training_crop_is_on_by_default():
    cfg = _compose([])
    assert set(cfg.data.augment) == set(IMAGE_AUGMENTS + TEXT_AUGMENTS)
    entries = augment.parse(dict(cfg.data.augment))
    assert entries[augment.TEXT] == []
    [(name, _, options)] = entries[augment.IMAGE]
    assert name == "random_resized_crop"  # open_clip's training crop: 90-100% of the picture
    assert options["p"] == 1.0 and list(options["scale"]) == [0.9, 1.0]
    off = _compose(["data.augment.random_resized_crop.p=0"])
    assert augment.parse(dict(off.data.augment)) == {augment.IMAGE: [], augment.TEXT: []}
    none = _compose(["data/augment=none"])
    assert augment.parse(dict(none.data.augment)) == {augment.IMAGE: [], augment.TEXT: []}


@pytest.mark.parametrize("option", ["shapes", "manifest", "hf", "webdataset"])
def test_every_data_option_composes_the_one_augment_block(option):
    """One augment block (conf/data/augment/default.yaml) in every data option, and its
    crop is random_resized_crop's own default: one crop, one default scale."""
    from omegaconf import OmegaConf

    block = OmegaConf.to_container(OmegaConf.load(CONF / "data" / "augment" / "default.yaml"))
    composed = OmegaConf.to_container(_compose([f"data={option}"]).data.augment)
    assert composed == block
    defaults = inspect.signature(augment.random_resized_crop).parameters
    crop = composed["random_resized_crop"]
    assert crop["p"] == defaults["p"].default
    assert tuple(crop["scale"]) == defaults["scale"].default
    assert tuple(crop["ratio"]) == pytest.approx(defaults["ratio"].default, abs=1e-4)


@registry.register(augment.IMAGE, "test_invert")
def _invert(images: torch.Tensor, generator: torch.Generator, p: float = 1.0) -> torch.Tensor:
    """A user's own augmentation: one function plus its config entry."""
    return 255 - images


def test_a_new_augmentation_is_a_function_and_a_config_entry(tmp_path):
    cfg = _compose(
        [*TINY, "+data.augment.test_invert.p=1.0", "data.augment.random_resized_crop.p=0"]
    )
    parts = build_parts(cfg, None)
    batch = next(iter(data_loader(parts, "train", train=True, pin_memory=False)))
    out = parts.augment(batch, 0)
    assert torch.equal(out["images"], 255 - batch["images"].float())
    # Every augmentation's p keeps its rule, also where the function declares none.
    with pytest.raises(UserError, match=r"data.augment.test_invert.p must be a number >= 0"):
        augment.parse({"test_invert": {"p": 1.5}})


def _texts(cfg, split: str, train: bool, epoch: int) -> list[list[int]]:
    parts = build_parts(cfg, None)
    batches = data_loader(parts, split, train=train, pin_memory=False)
    batches.sampler.set_epoch(epoch)
    rows = []
    for batch in batches:
        rows += batch["input_ids"].tolist()
    return rows


def test_text_augmentation_is_train_only_and_independent_of_loader_workers():
    on = ["data.augment.word_dropout.p=0.3", "data.augment.char_noise.p=0.1"]
    cfg = _compose([*TINY, *on])
    plain = _compose(TINY)
    epoch0 = _texts(cfg, "train", True, epoch=0)
    assert epoch0 != _texts(plain, "train", True, epoch=0)  # augmented
    workers = _compose([*TINY, *on, "data.num_workers=2"])
    assert _texts(workers, "train", True, epoch=0) == epoch0  # same under 2 workers
    assert _texts(cfg, "train", True, epoch=1) != epoch0  # each epoch draws anew
    assert _texts(cfg, "val", False, epoch=0) == _texts(plain, "val", False, epoch=0)


@pytest.mark.slow
def test_resume_with_augmentation_matches_the_uninterrupted_run_bit_for_bit(tmp_path):
    overrides = [
        *TINY,
        "data.num_workers=2",
        "trainer.max_epochs=2",
        "data.augment.random_resized_crop.p=0.5",
        "data.augment.flip.p=0.5",
        "data.augment.color_jitter.p=0.5",
        "data.augment.gaussian_noise.p=0.5",
        "data.augment.word_dropout.p=0.1",
        "data.augment.word_swap.p=0.1",
        "data.augment.char_noise.p=0.05",
    ]
    full = tmp_path / "full"
    result = run_cli(
        "train",
        *overrides,
        "trainer.checkpoint.every_n_steps=5",
        "trainer.checkpoint.keep_last=3",
        f"hydra.run.dir={full}",
    )
    assert result.returncode == 0, result.stderr
    log = (full / "train.log").read_text()
    assert "training image augment: random_resized_crop, flip, color_jitter, gaussian_noise" in log
    assert "training text augment: word_dropout, word_swap, char_noise" in log
    stopped = tmp_path / "stopped"
    result = resume_from_step(full, 5, stopped, *overrides)
    assert result.returncode == 0, result.stderr
    assert_same_weights(full / "checkpoints" / "last.pt", stopped / "checkpoints" / "last.pt")


def test_list_data_shows_the_augmentations():
    result = run_cli("list", "data")
    assert result.returncode == 0, result.stderr
    for name in ("manifest", *IMAGE_AUGMENTS, *TEXT_AUGMENTS, "data.augment.flip.p=0.5"):
        assert name in result.stdout, name
    assert "generator" not in result.stdout  # run-time arguments are not config keys
