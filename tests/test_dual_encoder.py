"""transformers' VisionTextDualEncoderModel as a backbone: a pretrained folder of two towers
(ViT + BERT) and from-config towers of any kind (ConvNeXt, ResNet), with a pretrained tokenizer."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from conftest import TINY, build_parts, compose_train, read_jsonl, run_cli

from mmtrain.commands.export import export_run
from mmtrain.data.shapes import POSITIONS, SHAPES
from mmtrain.data.tokenizer import build_word_tokenizer
from mmtrain.errors import UserError
from mmtrain.models.backbone import backbone_spec, encode_image, encode_text
from mmtrain.models.classifier import clip_fusion
from mmtrain.models.contrastive import clip_contrastive, siglip_contrastive
from mmtrain.models.finetune import Lora, tower_depths

WORDS = [
    "a",
    "an",
    "red",
    "green",
    "blue",
    "in",
    "the",
    "at",
    *SHAPES,
    *" ".join(POSITIONS).split(),
]
CAPTIONS = ["a red circle in the top left", "a blue square at the bottom right"] * 4
CONVNEXT = {
    "projection_dim": 16,
    "vision": {"config_class": "ConvNextConfig", "image_size": 32, "num_stages": 2,
               "hidden_sizes": [8, 16], "depths": [1, 1]},
    "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 2, "max_position_embeddings": 16},
}  # fmt: skip


def bert_tokenizer(folder=None):
    """A tiny BERT word-piece tokenizer over the shapes' words (saved to `folder`)."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS)]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    if folder is not None:
        tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def vit_bert(tmp_path_factory):
    """A tiny ViT + BERT dual encoder saved as run_clip saves one: model, tokenizer, processor."""
    from transformers import (
        BertConfig,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        ViTConfig,
        ViTImageProcessor,
    )  # fmt: skip

    folder = tmp_path_factory.mktemp("vit_bert")
    tokenizer = bert_tokenizer(folder)
    vision = ViTConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=2)  # fmt: skip
    text = BertConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32)  # fmt: skip
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    torch.manual_seed(0)
    VisionTextDualEncoderModel(config).save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4] * 3)
    processor.save_pretrained(folder)
    return folder


def _batch(tokenizer, n=8):
    torch.manual_seed(1)
    texts = tokenizer(CAPTIONS[:n], padding=True, return_tensors="pt")
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    return {"images": images, "input_ids": texts["input_ids"], "attention_mask": texts["attention_mask"]}  # fmt: skip


def _losses(model, batch, steps=12):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(**batch)["loss"]
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_dual_encoder_folder_trains_contrastively_and_exports_to_transformers(vit_bert, tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderModel

    from mmtrain.assemble import trained

    spec = backbone_spec(str(vit_bert), None)  # the processor's geometry, the towers' text length
    assert (spec.image_size, spec.image_mean, spec.max_text_length) == (32, (0.4,) * 3, 32)
    data = [o for o in TINY if o.startswith(("data.", "trainer.", "scheduler."))]
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", "model=clip_contrastive", f"model.backbone={vit_bert}", *data, "optimizer.backbone_lr_scale=1.0",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert any("val/recall@1_i2t" in e for e in read_jsonl(run_dir / "metrics.jsonl"))
    export_run([f"run={run_dir}", f"out={tmp_path / 'export'}"])
    exported = VisionTextDualEncoderModel.from_pretrained(tmp_path / "export").eval()
    original = VisionTextDualEncoderModel.from_pretrained(vit_bert)
    for tower in ("vision_model", "text_model"):  # both towers trained
        ours, theirs = (getattr(m, tower).embeddings for m in (exported, original))
        assert not torch.equal(next(ours.parameters()), next(theirs.parameters()))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "export")
    assert (processor.size["height"], list(processor.image_mean)) == (32, [0.4] * 3)
    texts = AutoTokenizer.from_pretrained(tmp_path / "export")(CAPTIONS[:2], padding=True, return_tensors="pt")  # fmt: skip
    pixels = torch.randn(2, 3, 32, 32)
    ours = trained(str(run_dir)).model.clip
    with torch.no_grad():
        assert torch.allclose(
            encode_image(ours, pixels)[1],
            exported.get_image_features(pixel_values=pixels).pooler_output,
            atol=1e-6,  # fmt: skip
        )
        assert torch.allclose(
            encode_text(ours, texts["input_ids"], texts["attention_mask"])[1],
            exported.get_text_features(**texts).pooler_output, atol=1e-6,
        )  # fmt: skip
    assert json.loads((tmp_path / "export" / "mmtrain_head.json").read_text())["step"] == 16


def test_a_dual_encoder_folder_trains_in_the_classifier(vit_bert):
    tokenizer = bert_tokenizer()
    spec = backbone_spec(str(vit_bert), None)
    torch.manual_seed(0)
    model = clip_fusion(tokenizer=tokenizer, spec=spec, backbone=str(vit_bert), num_classes=2)
    assert model.fusion.attention.image_in[1].in_features == 16  # the ViT's token width
    batch = {**_batch(tokenizer), "labels": torch.tensor([0, 1] * 4)}
    losses = _losses(model, batch)
    assert min(losses[-3:]) < 0.7 * losses[0]


def test_a_resnet_tower_built_from_its_config_trains_in_the_classifier(tmp_path):
    from transformers import VisionTextDualEncoderModel

    from mmtrain.models.finetune import layer_counts

    resnet = {**CONVNEXT, "vision": {"config_class": "ResNetConfig", "image_size": 32,
              "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"}}  # fmt: skip
    tokenizer = build_word_tokenizer(CAPTIONS)
    spec = backbone_spec(None, resnet)
    assert spec.image_size == 32  # a key ResNetConfig lacks, kept for the processor
    torch.manual_seed(0)
    model = clip_fusion(tokenizer=tokenizer, spec=spec, backbone_config=resnet, num_classes=2)
    # its pooled [B, C, 1, 1] map is flattened into the projection; its last 4 x 4 map is 16 tokens
    tokens, pooled = encode_image(model.clip, torch.randn(3, 3, 32, 32))
    assert pooled.shape == (3, 16) and tokens.shape == (3, 16, 16)
    depths = tower_depths(model.clip)
    stem = model.clip.vision_model.embedder.embedder.convolution.weight
    assert layer_counts(model.clip)["vision_model"] == 2 and depths[id(stem)] == (0, 2)
    batch = {**_batch(tokenizer), "labels": torch.tensor([0, 1] * 4)}
    losses = _losses(model, batch)
    assert min(losses[-3:]) < 0.7 * losses[0]
    # what export saves loads back; the features are its flattened pooled map, projected
    model.clip.save_pretrained(tmp_path)
    loaded = VisionTextDualEncoderModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = loaded.vision_model(pixel_values=pixels).pooler_output.flatten(1)
        expected = encode_image(model.clip.eval(), pixels)[1]
        assert torch.allclose(loaded.visual_projection(pooled), expected, atol=1e-6)


@pytest.mark.parametrize("factory", [clip_contrastive, siglip_contrastive])
def test_contrastive_losses_train_a_convnext_tower_built_from_its_config(factory, tmp_path):
    tokenizer = build_word_tokenizer(CAPTIONS)
    spec = backbone_spec(None, CONVNEXT)
    assert spec.image_mean == (0.485, 0.456, 0.406)  # ImageNet's, as ConvNeXt's processor
    torch.manual_seed(0)
    model = factory(tokenizer=tokenizer, spec=spec, backbone_config=CONVNEXT)
    assert type(model.clip).__name__ == "VisionTextDualEncoderModel"
    assert model.clip.config.vision_config.model_type == "convnext"
    assert model.clip.config.text_config.vocab_size == len(tokenizer)
    losses = _losses(model, _batch(tokenizer))
    assert min(losses[-3:]) < 0.7 * losses[0]
    if factory is siglip_contrastive:  # the bias the two towers lack is the model's, and learns
        assert set(model.loss_parameters()) == {"logit_scale", "logit_bias"}
        assert model.logit_bias.item() != -10.0
    else:  # what export saves loads back as the same image tower (its width kept in its config)
        from transformers import VisionTextDualEncoderModel

        model.clip.save_pretrained(tmp_path)
        loaded = VisionTextDualEncoderModel.from_pretrained(tmp_path).eval()
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = encode_image(model.clip.eval(), pixels)[1]
            assert torch.allclose(loaded.get_image_features(pixel_values=pixels).pooler_output, expected)  # fmt: skip


def test_freezing_depths_lora_and_checkpointing_work_per_tower(vit_bert, caplog):
    tokenizer = build_word_tokenizer(CAPTIONS)
    spec = backbone_spec(None, CONVNEXT)
    built = dict(tokenizer=tokenizer, spec=spec, backbone_config=CONVNEXT, num_classes=2)
    frozen = clip_fusion(**built, freeze="vision")
    assert not any(p.requires_grad for n, p in frozen.clip.named_parameters() if "vision" in n)
    last = clip_fusion(**built, unfreeze_last_layers=1)
    trainable = {n for n, p in last.clip.named_parameters() if p.requires_grad}
    assert "vision_model.encoder.stages.1.layers.0.pwconv1.weight" in trainable
    assert "vision_model.encoder.stages.0.layers.0.pwconv1.weight" not in trainable
    assert "text_model.encoder.layers.1.mlp.fc1.weight" in trainable
    depths = {n: tower_depths(last.clip)[id(p)] for n, p in last.clip.named_parameters() if "logit" not in n}  # fmt: skip
    assert depths["vision_model.embeddings.patch_embeddings.weight"] == (0, 2)
    assert depths["vision_model.encoder.stages.1.layers.0.pwconv1.weight"] == (2, 2)
    assert depths["visual_projection.weight"] == (3, 2)
    with pytest.raises(UserError, match="ConvNextModel does not support gradient checkpointing"):
        clip_fusion(**built, gradient_checkpointing=True)
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        adapted = clip_fusion(**built, lora=Lora(r=2))
    assert "the vision tower has no layer" in caplog.text
    assert not any(p.requires_grad for n, p in adapted.clip.named_parameters() if "vision_model" in n)  # fmt: skip

    # A ViT + BERT folder: adapters on both towers' attention, checkpointing in each tower.
    pretrained = dict(tokenizer=bert_tokenizer(), spec=backbone_spec(str(vit_bert), None), backbone=str(vit_bert))  # fmt: skip
    lora = clip_contrastive(**pretrained, lora=Lora(r=2), gradient_checkpointing=True)
    adapters = {n.split(".lora_")[0] for n, _ in lora.clip.named_parameters() if ".lora_A." in n}
    # query, key, value and the attention output of 2 layers in each tower
    assert len(adapters) == 2 * 2 * 4
    assert lora.clip.base_model.model.vision_model.is_gradient_checkpointing


def test_model_tokenizer_gives_a_from_config_model_its_vocabulary(tmp_path):
    bert_tokenizer(tmp_path / "tok")
    cfg = compose_train([*TINY, f"model.tokenizer={tmp_path / 'tok'}", "data.train_size=32"])
    parts = build_parts(cfg)
    assert type(parts.tokenizer).__name__ == "BertTokenizer"
    assert parts.model.clip.config.text_config.vocab_size == len(parts.tokenizer)
    assert parts.model.clip.config.text_config.eos_token_id == parts.tokenizer.eos_token_id


def test_bad_towers_processors_and_tokenizers_are_clear_errors(vit_bert, tmp_path):
    from mmtrain.assemble import backbone
    from mmtrain.spec import parse

    with pytest.raises(UserError, match="no such config class. Did you mean 'ConvNextConfig'"):
        backbone_spec(None, {"vision": {"config_class": "ConvNextConfg"}})
    with pytest.raises(UserError, match="'mobilenet_v2' image tower names no output width"):
        backbone_spec(None, {"vision": {"config_class": "MobileNetV2Config"}})
    with pytest.raises(UserError, match=r"Unknown key 'patch_sizes' .*Did you mean 'patch_size'"):
        backbone_spec(None, {"vision": {"config_class": "ConvNextConfig", "patch_sizes": 2}})
    mismatched = tmp_path / "mismatched"
    shutil.copytree(vit_bert, mismatched)
    config = json.loads((mismatched / "preprocessor_config.json").read_text())
    config["size"] = {"height": 48, "width": 48}
    (mismatched / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="processor makes 48 px images, but its 'vit' image tower was built for 32"):  # fmt: skip
        backbone_spec(str(mismatched), None)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match="model.tokenizer=.*broken.* does not load as a tokenizer"):
        build_parts(compose_train([*TINY, f"model.tokenizer={tmp_path / 'broken'}"]))
    big = build_word_tokenizer([" ".join(f"w{i}" for i in range(100))])
    big.save_pretrained(tmp_path / "big")
    cfg = compose_train([*TINY, f"model.backbone={vit_bert}", f"model.tokenizer={tmp_path / 'big'}"])  # fmt: skip
    assert backbone(parse(cfg)).vocab_size == len(bert_tokenizer())
    with pytest.raises(
        UserError, match="the tokenizer has 104 tokens but the text tower embeds only"
    ):
        build_parts(cfg)


def test_small_data_trains_a_resnet_tower_and_the_hint_points_to_it(caplog):
    from mmtrain.assemble import backbone
    from mmtrain.spec import parse
    from mmtrain.watch import ChanceWatch

    spec = parse(compose_train(["experiment=small_data"]))
    assert spec.model.name == "clip_fusion"
    assert spec.model.options["backbone_config"]["vision"]["config_class"] == "ResNetConfig"
    assert backbone(spec).family == "vision-text-dual-encoder"
    at_chance = {"val/accuracy": 0.5, "val/auroc": 0.5}
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        assert ChanceWatch(torch.tensor([0, 1] * 50), 10, from_scratch_vit=True).update(
            at_chance, 5
        )
    assert "experiment=small_data" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        assert ChanceWatch(torch.tensor([0, 1] * 50), 10).update(at_chance, 5)
    assert "not learning yet" in caplog.text and "experiment=small_data" not in caplog.text
