"""Every YAML option in conf/ composes with the others and builds into working objects."""

from pathlib import Path

import pytest
import torch
from conftest import CONF, TINY, build_parts, data_loader
from conftest import compose_train as _compose
from manifest_files import MODEL_TINY, write_learnable

from mmtrain.spec import parse, total_steps

GROUPS = ["data", "model", "optimizer", "scheduler", "trainer", "zeroshot", "experiment"]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]


def test_every_group_has_options():
    assert {group for group, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_validates_and_builds(group, option, tmp_path: Path):
    overrides = [f"{group}={option}", *TINY]
    if (group, option) == ("model", "siglip_contrastive"):  # SigLIP has no projection_dim
        overrides = [o for o in overrides if "projection_dim" not in o]
    if option in ("convnext_fusion", "resnet_fusion", "small_data"):  # not TINY's ViT keys
        overrides = [o for o in overrides if ".vision." not in o or "image_size" in o]
    if (group, option) == ("data", "manifest"):  # TINY's data keys are shapes' own
        train, val = write_learnable(tmp_path / "data", train=12, val=6)
        overrides = [f"{group}={option}", f"data.train={train}", f"data.val={val}", *MODEL_TINY]
    if (group, option) == ("data", "webdataset"):
        from mmtrain.commands.shards import write_shards

        train, val = write_learnable(tmp_path / "data", train=12, val=6)
        for split, manifest in (("train", train), ("val", val)):
            write_shards([str(manifest), str(tmp_path / split), "shard_size=6"])
        shards = [f"data.{s}='{tmp_path / s}/{{00000..00000}}.tar'" for s in ("train", "val")]
        overrides = [f"{group}={option}", *shards, "data.batch_size=4", *MODEL_TINY]
    if (group, option) == ("data", "hf"):
        from test_hf import write_parquet

        folder = write_parquet(tmp_path / "pq", train=12, val=6)
        cache = f"data.cache_dir={tmp_path / 'cache'}"
        overrides = [f"{group}={option}", f"data.path={folder}", cache, *MODEL_TINY]
    cfg = _compose(overrides)
    spec = parse(cfg)
    parts = build_parts(cfg, tmp_path)
    batch = next(iter(data_loader(parts, "train", train=True, pin_memory=False)))
    out = parts.model(**parts.augment(batch, (0, 0, 0)))  # the loop's step 0
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    optimizer = spec.optimizer.build(model=parts.model)
    _, steps = total_steps(spec.trainer, 8)
    scheduler = spec.scheduler.build(optimizer=optimizer, total_steps=steps)
    out["loss"].backward()
    optimizer.step()
    scheduler.step()
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_head_input_size_follows_the_fusion():
    for fusion, width in (
        ("concat", 2 * 32),
        ("cross_attention", 32),
        ("product", 32),
        ("product model.fusion_difference=true", 2 * 32),
    ):
        cfg = _compose([*f"model.fusion={fusion}".split(), *TINY])
        parts = build_parts(cfg, None)
        assert parts.model.fusion.out_dim == width
        assert parts.model.head[1].in_features == width


def test_product_fusion_multiplies_the_projected_features():
    from mmtrain.models.fusion import Features, product

    image, text = torch.randn(3, 4), torch.randn(3, 4)
    features = Features(None, image, None, text, None)
    assert torch.equal(product(4, False)(features), image * text)
    both = product(4, True)
    assert both.out_dim == 8
    assert torch.equal(both(features), torch.cat([image * text, (image - text).abs()], -1))


@pytest.mark.parametrize(
    "fusion", ["concat", "cross_attention", "product", "product model.fusion_difference=true"]
)
def test_each_fusion_learns_a_batch(fusion):
    torch.manual_seed(0)
    overrides = [*f"model.fusion={fusion}".split(), *TINY, "model.contrastive_weight=0"]
    parts = build_parts(_compose([*overrides, "model.dropout=0", "data.train_size=32"]), None)
    batch = next(iter(data_loader(parts, "train", train=True, pin_memory=False)))
    optimizer = torch.optim.AdamW(parts.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = parts.model(**batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_image_size_and_text_length_come_from_the_backbone(tmp_path):
    cfg = _compose(
        [
            *TINY,
            "model.backbone_config.vision.image_size=48",
            "model.backbone_config.text.max_position_embeddings=12",
        ]
    )
    parts = build_parts(cfg, tmp_path)
    assert parts.splits["train"].images.shape[-2:] == (48, 48)
    assert parts.collate.max_length == 12
    batch = next(iter(data_loader(parts, "train", train=True, pin_memory=False)))
    assert batch["input_ids"].shape[1] <= 12
    # padded to the batch's longest caption (12 is no multiple of 8: no rounding up)
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    cfg = _compose([*TINY, "model.backbone_config.text.max_position_embeddings=16"])
    parts = build_parts(cfg, None)
    batch = next(iter(data_loader(parts, "train", train=True, pin_memory=False)))
    longest = int(batch["attention_mask"].sum(1).max())
    assert longest < 16 and batch["input_ids"].shape[1] == -(-longest // 8) * 8
