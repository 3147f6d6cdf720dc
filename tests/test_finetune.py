"""Fine-tuning levers: gradient checkpointing, contrastive accumulation over the whole batch,
partial unfreezing, layer-wise lr decay, LoRA (peft) and SigLIP backbones."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext

import pytest
import torch
from conftest import CONF, TINY, assert_same_weights, read_jsonl, resume_from_step, run_cli

from mmtrain import registry
from mmtrain.errors import UserError
from mmtrain.models.feature_cache import accumulated_backward
from mmtrain.optim import param_groups

# The training crop draws per micro-batch, so 2 x 16 images are cut unlike 1 x 32: the
# accumulation-equivalence runs turn it off.
NO_CROP = "data.augment.random_resized_crop.p=0"

TWO_LAYERS = [
    "model.backbone_config.vision.num_hidden_layers=2",
    "model.backbone_config.text.num_hidden_layers=2",
]
# Attention is invariant to the key projection's bias: its gradient is rounding noise, which
# Adam scales up to a full step, differently in two runs that sum in another order.
KEY_BIAS = "self_attn.k_proj.bias"
SIGLIP_TINY = [o for o in TINY if "projection_dim" not in o]


def _parts(model: str, *overrides: str, seed: int = 0):
    from conftest import build_parts
    from hydra import compose, initialize_config_dir

    tiny = SIGLIP_TINY if model == "siglip_contrastive" else TINY
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=[f"model={model}", *tiny, *overrides])
    torch.manual_seed(seed)
    return cfg, build_parts(cfg, None)


def _batch(parts, size: int = 32) -> dict[str, torch.Tensor]:
    from mmtrain.data.loader import make_loader

    loader = make_loader(
        parts.splits["train"], parts.train_collate, batch_size=size, num_workers=0,
        shuffle=True, seed=0,
    )  # fmt: skip
    return next(iter(loader))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(first: dict, second: dict, atol: float) -> None:
    assert first.keys() == second.keys() and first
    for name in first:
        assert torch.allclose(first[name], second[name], atol=atol, rtol=0), (
            name,
            (first[name] - second[name]).abs().max(),
        )


# --- gradient checkpointing -------------------------------------------------------------


@pytest.mark.parametrize("model", ["clip_fusion", "siglip_contrastive"])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradients(model):
    no_dropout = ["model.dropout=0"] if model == "clip_fusion" else []
    _, plain = _parts(model, *TWO_LAYERS, *no_dropout)
    _, checkpointed = _parts(model, *TWO_LAYERS, *no_dropout, "model.gradient_checkpointing=true")
    checkpointed.model.load_state_dict(plain.model.state_dict())
    batch = _batch(plain, 16)
    calls = {}
    for name, parts in (("plain", plain), ("checkpointed", checkpointed)):
        layer = parts.model.clip.vision_model.encoder.layers[0].layer_norm1  # the layer's first op
        layer.register_forward_pre_hook(
            lambda *_, n=name: calls.__setitem__(n, calls.get(n, 0) + 1)
        )
        parts.model.train()
        parts.model(**batch)["loss"].backward()
    assert calls == {"plain": 1, "checkpointed": 2}  # recomputed in backward
    _assert_close(_grads(plain.model), _grads(checkpointed.model), atol=1e-6)


# --- contrastive accumulation over the whole batch --------------------------------------


def _micro_batches(batch: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    rows = len(batch["images"])
    size = rows // count
    out = []
    for i in range(count):
        part = {}
        for key, value in batch.items():
            per_row = len(value) // rows  # hard negatives: K rows per image
            part[key] = value[i * size * per_row : (i + 1) * size * per_row]
        out.append(part)
    return out


@pytest.mark.parametrize(
    ("model", "extra"),
    [("clip_contrastive", ["data.hard_negatives=2"]), ("siglip_contrastive", [])],
)
def test_contrastive_accumulation_equals_one_batch_k_times_as_large(model, extra):
    _, parts = _parts(model, *extra)
    net = parts.model.train()
    big = _batch(parts, 32)
    big_loss = net(**big)["loss"]
    big_loss.backward()
    expected = _grads(net)
    net.zero_grad(set_to_none=True)

    micro = _micro_batches(big, 4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = accumulated_backward(net, net, micro, nullcontext, scaler)
    assert loss.item() == pytest.approx(big_loss.item(), abs=1e-5)
    _assert_close(expected, _grads(net), atol=1e-5)

    # Plain accumulation (each micro-batch against its own negatives) is another objective.
    net.zero_grad(set_to_none=True)
    for part in micro:
        (net(**part)["loss"] / 4).backward()
    naive = _grads(net)
    assert max((naive[k] - expected[k]).abs().max() for k in expected) > 1e-3


def test_accumulated_contrastive_training_logs_the_whole_batch_loss(tmp_path):
    common = ["model=clip_contrastive", *TINY, "trainer.max_steps=2", "trainer.log_every_n_steps=1"]
    common.append(NO_CROP)
    runs = {}
    for name, batch, accumulate in (("big", 32, 1), ("accumulated", 16, 2)):
        run_dir = tmp_path / name
        result = run_cli(
            "train", *common, f"data.batch_size={batch}",
            f"trainer.accumulate_grad_batches={accumulate}", f"hydra.run.dir={run_dir}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs[name] = [
            e["train/loss"] for e in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in e
        ]
    assert len(runs["big"]) == 2
    assert runs["accumulated"] == pytest.approx(runs["big"], abs=1e-4)
    first = torch.load(tmp_path / "big" / "checkpoints" / "last.pt", weights_only=False)["model"]
    second = torch.load(tmp_path / "accumulated" / "checkpoints" / "last.pt", weights_only=False)
    for key, value in first.items():
        if not key.endswith(KEY_BIAS):
            assert torch.allclose(value, second["model"][key], atol=1e-4), key


@pytest.mark.slow
def test_accumulation_under_ddp_equals_the_unaccumulated_global_batch(tmp_path):
    """2 ranks x 2 micro-batches of 8 = 2 ranks x 16: each rank holds the same rows either way
    (every other index of the epoch's permutation), and scores them against all 32."""
    import os
    import subprocess

    from conftest import ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = ["model=clip_contrastive", *TINY, "trainer.max_steps=2", "trainer.log_every_n_steps=1"]
    common.append(NO_CROP)
    for name, batch, accumulate, port in (("plain", 16, 1, 29787), ("accumulated", 8, 2, 29797)):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            "-m", "mmtrain", "train", "trainer.device=cpu", *common, f"data.batch_size={batch}",
            f"trainer.accumulate_grad_batches={accumulate}", f"hydra.run.dir={tmp_path / name}",
        ]  # fmt: skip
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
    losses = [
        [e["train/loss"] for e in read_jsonl(tmp_path / d / "metrics.jsonl") if "train/loss" in e]
        for d in ("plain", "accumulated")
    ]
    assert len(losses[0]) == 2 and losses[1] == pytest.approx(losses[0], abs=1e-5)
    plain = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=False)
    accumulated = torch.load(
        tmp_path / "accumulated" / "checkpoints" / "last.pt", weights_only=False
    )
    for key, value in plain["model"].items():
        if not key.endswith(KEY_BIAS):
            assert torch.allclose(value, accumulated["model"][key], atol=1e-5), key


# --- partial fine-tuning ----------------------------------------------------------------


@pytest.mark.parametrize(("samples", "expected"), [(32, 5e-4), (64, 1e-3), (256, 4e-3)])
def test_auto_learning_rate_scales_with_the_samples_of_a_step(samples, expected, caplog):
    class Head(torch.nn.Linear):  # the part of the model interface the optimizer reads
        finetunes_pretrained_towers = False

        def backbone_parameters(self) -> list:
            return []

    model = Head(4, 2)
    optimizer = registry.build(
        "optimizer", {"name": "adamw"}, model=model, samples_per_step=samples
    )
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([expected] * 2)
    given = registry.build(
        "optimizer", {"name": "adamw", "lr": 3e-4}, model=model, samples_per_step=samples
    )
    assert [g["lr"] for g in given.param_groups] == [3e-4, 3e-4]


def test_auto_learning_rate_counts_accumulation_in_a_run(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", *TINY, "trainer.max_steps=1", "data.batch_size=8",
        "trainer.accumulate_grad_batches=2", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    log = (run_dir / "train.log").read_text()
    assert "learning rate 2.50e-04 (optimizer.lr=auto: 0.001 per 64 samples x 16 samples" in log
    bad = run_cli("train", *TINY, "optimizer.lr=fast", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2
    assert (
        "Key 'lr' of optimizer 'adamw' must be a positive number or auto (got 'fast')" in bad.stderr
    )
    assert "run directory:" not in bad.stdout + bad.stderr  # refused before anything is built


def _step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer) -> dict:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model(**batch)["loss"].backward()
    optimizer.step()
    return {n: not torch.equal(before[n], p) for n, p in model.named_parameters()}


def test_unfreeze_last_layers_trains_only_the_last_layers_and_what_follows():
    cfg, parts = _parts("clip_fusion", *TWO_LAYERS, "model.unfreeze_last_layers=1")
    model = parts.model
    optimizer = registry.build("optimizer", {"name": "adamw", "lr": 1e-2}, model=model)
    moved = _step(model, _batch(parts, 16), optimizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for tower in ("vision_model", "text_model"):
        assert f"clip.{tower}.encoder.layers.1.self_attn.q_proj.weight" in trainable
        assert f"clip.{tower}.encoder.layers.0.self_attn.q_proj.weight" not in trainable
        assert not any(n.startswith(f"clip.{tower}.embeddings.") for n in trainable)
    assert {"clip.vision_model.post_layernorm.weight", "clip.visual_projection.weight"} <= trainable
    assert {"clip.text_model.final_layer_norm.weight", "clip.logit_scale"} <= trainable
    assert all(n in trainable for n in moved if n.startswith(("head.", "fusion.")))
    assert all(not moved[n] for n in moved if n not in trainable)
    assert moved["clip.vision_model.encoder.layers.1.mlp.fc1.weight"] and moved["head.1.weight"]

    with pytest.raises(UserError, match="unfreeze_last_layers=3.*at most 2"):
        _parts("clip_fusion", *TWO_LAYERS, "model.unfreeze_last_layers=3")


def test_layer_decay_scales_each_layers_learning_rate():
    _, parts = _parts("clip_contrastive", *TWO_LAYERS)
    model, clip = parts.model, parts.model.clip
    groups = param_groups(model, 0.05, lr=1e-3, backbone_lr_scale=0.5, layer_decay=0.5)
    lr = {id(p): g["lr"] for g in groups for p in g["params"]}
    backbone = 1e-3 * 0.5
    for tower, projection in ((clip.vision_model, clip.visual_projection), (clip.text_model, clip.text_projection)):  # fmt: skip
        assert lr[id(tower.embeddings.position_embedding.weight)] == pytest.approx(
            backbone * 0.5**3
        )
        assert lr[id(tower.encoder.layers[0].mlp.fc1.weight)] == pytest.approx(backbone * 0.5**2)
        assert lr[id(tower.encoder.layers[1].mlp.fc1.weight)] == pytest.approx(backbone * 0.5)
        assert lr[id(projection.weight)] == pytest.approx(backbone)
    assert lr[id(clip.vision_model.post_layernorm.weight)] == pytest.approx(backbone)
    assert lr[id(clip.logit_scale)] == pytest.approx(1e-3)  # not a tower parameter
    assert len(lr) == sum(1 for p in model.parameters() if p.requires_grad)

    # The schedule scales every group alike: the ratios hold through warmup and decay.
    optimizer = registry.build(
        "optimizer", {"name": "adamw", "lr": 1e-3, "layer_decay": 0.5}, model=model
    )
    scheduler = registry.build("scheduler", {"name": "cosine", "warmup_steps": 2}, optimizer=optimizer, total_steps=10)  # fmt: skip
    optimizer.step(), scheduler.step()
    rates = sorted({g["lr"] for g in optimizer.param_groups})
    assert rates == pytest.approx([rates[-1] * 0.5**k for k in (3, 2, 1, 0)])
    with pytest.raises(
        UserError, match=r"Key 'layer_decay' of optimizer 'adamw' must be a number > 0 and <= 1"
    ):
        registry.build("optimizer", {"name": "adamw", "layer_decay": 1.5}, model=model)


# --- LoRA -------------------------------------------------------------------------------


def test_lora_trains_only_the_adapters_and_the_head():
    _, parts = _parts("clip_fusion", "model.lora.r=4", "model.dropout=0")
    model = parts.model
    optimizer = registry.build("optimizer", {"name": "adamw", "lr": 1e-2}, model=model)
    moved = _step(model, _batch(parts, 16), optimizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if ".lora_" in n}
    # q, k, v and out projections of one layer in each tower, A and B each.
    assert len(adapters) == 2 * 4 * 2
    assert trainable - adapters == {
        n for n in trainable if n.startswith(("head.", "fusion.")) or n.endswith("logit_scale")
    }
    assert all(moved[n] for n in adapters if ".lora_B." in n)  # B starts at zero, then moves
    assert not any(moved[n] for n in moved if n.startswith("clip.") and n not in trainable)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_on_the_text_tower_with_the_image_tower_frozen(dora):
    from mmtrain.models.finetune import plain_backbone

    extra = ["model.lora.use_dora=true"] if dora else []
    _, parts = _parts("clip_contrastive", "model.lora.r=4", "model.freeze=vision", *extra)
    model = parts.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("vision_model." in n or "visual_projection" in n for n in trainable)
    adapters = {n for n in trainable if ".lora_" in n}
    assert adapters and all("text_model." in n for n in adapters)
    assert any("lora_magnitude_vector" in n for n in adapters) == dora
    optimizer = registry.build("optimizer", {"name": "adamw", "lr": 1e-2}, model=model)
    moved = _step(model, _batch(parts, 16), optimizer)
    assert any(moved[n] for n in adapters)
    assert not any(moved[n] for n in moved if "vision_model." in n)
    assert not any("lora" in n for n in plain_backbone(model.clip).state_dict())  # merged


def test_lora_without_peft_or_with_a_bad_rank_is_a_clear_error(monkeypatch):
    with pytest.raises(
        UserError,
        match=r"Key 'lora.r' of model 'clip_contrastive' must be a positive integer or null \(got 0\)",
    ):
        _parts("clip_contrastive", "model.lora.r=0")
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(UserError, match=r"pip install 'mmtrain\[peft\]'"):
        _parts("clip_contrastive", "model.lora.r=4")


def test_lora_run_resumes_exactly_and_exports_a_plain_clip_model(tmp_path):
    from transformers import CLIPModel

    lora = ["model=clip_contrastive", *TINY, "model.lora.r=4", "model.lora.alpha=8"]
    full = tmp_path / "full"
    result = run_cli("train", *lora, "trainer.checkpoint.every_n_steps=8", f"hydra.run.dir={full}")
    assert result.returncode == 0, result.stderr
    resumed = tmp_path / "resumed"
    result = resume_from_step(full, 8, resumed, *lora)
    assert result.returncode == 0, result.stderr
    assert_same_weights(full / "checkpoints" / "last.pt", resumed / "checkpoints" / "last.pt")
    saved = torch.load(full / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert any(".lora_A." in k for k in saved)

    out = tmp_path / "export"
    result = run_cli("export", f"run={full}", f"out={out}")
    assert result.returncode == 0, result.stderr
    exported = CLIPModel.from_pretrained(out).eval()  # plain CLIP: adapters merged in
    assert not any("lora" in k for k in exported.state_dict())
    from mmtrain.assemble import trained as load_run

    trained = load_run(str(full)).model.eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = trained.embed_images(images)
        pixels = trained.normalize(images)
        got = exported.get_image_features(pixel_values=pixels)
    got = got.pooler_output if hasattr(got, "pooler_output") else got  # transformers 5
    assert torch.allclose(torch.nn.functional.normalize(got, dim=-1), expected, atol=1e-5)


# --- SigLIP -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """A tiny SigLIP saved as a pretrained model would be: model, tokenizer, image processor."""
    from transformers import SiglipImageProcessor

    from mmtrain.data.shapes import shapes
    from mmtrain.data.tokenizer import build_word_tokenizer
    from mmtrain.models.backbone import build_backbone

    folder = tmp_path_factory.mktemp("siglip")
    tokenizer = build_word_tokenizer(
        shapes(image_size=32, train_size=200, val_size=1, test_size=0)["train"].texts
    )
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}  # fmt: skip
    config = {
        "model_type": "siglip",
        "vision": {**tower, "image_size": 32, "patch_size": 8},
        "text": {**tower, "max_position_embeddings": 24},
    }
    torch.manual_seed(0)
    build_backbone(None, config, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_siglip_backbone_takes_its_spec_from_its_processor(siglip):
    from mmtrain.models.backbone import backbone_spec

    spec = backbone_spec(str(siglip), None)
    assert (spec.image_size, spec.image_mean, spec.max_text_length) == (32, (0.5,) * 3, 24)
    assert spec.family == "siglip" and spec.pad_to_max_length


def test_sigmoid_loss_equals_transformers_siglip_loss(siglip):
    _, parts = _parts("siglip_contrastive", f"model.backbone={siglip}")
    batch = _batch(parts, 16)
    assert batch["input_ids"].shape[1] == 24  # padded to the full length, as SigLIP trained
    batch["paired"] = torch.ones_like(batch["paired"])  # transformers takes every row as a pair
    model = parts.model.eval()
    with torch.no_grad():
        ours = model(**batch)["loss"]
        theirs = model.clip(
            input_ids=batch["input_ids"],
            pixel_values=model.normalize(batch["images"]),
            return_loss=True,
        ).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


@pytest.mark.parametrize("model", ["siglip_contrastive", "clip_fusion"])
def test_siglip_trains_and_exports_through_the_cli(siglip, model, tmp_path):
    from transformers import AutoImageProcessor, SiglipModel

    data = [o for o in TINY if o.startswith(("data.", "trainer.", "scheduler."))]
    run_dir = tmp_path / "run"
    result = run_cli(
        # A tiny random "pretrained" model: trained at one rate, not the fine-tuning recipe's.
        "train", f"model={model}", f"model.backbone={siglip}", *data, "trainer.max_epochs=2",
        "optimizer.backbone_lr_scale=1.0",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    losses = [e["train/loss"] for e in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in e]
    if model == "siglip_contrastive":  # the sigmoid loss falls fast from its -10 bias
        assert losses[-1] < 0.8 * losses[0]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    if model == "siglip_contrastive":  # the bias learns (it starts at the saved model's)
        original = SiglipModel.from_pretrained(siglip).logit_bias
        assert not torch.equal(saved["clip.logit_bias"], original.detach())
    result = run_cli("export", f"run={run_dir}", f"out={tmp_path / 'export'}")
    assert result.returncode == 0, result.stderr
    assert SiglipModel.from_pretrained(tmp_path / "export").config.model_type == "siglip"
    assert list(AutoImageProcessor.from_pretrained(tmp_path / "export").image_mean) == [0.5] * 3


def test_siglip_loss_on_a_clip_backbone_or_an_unknown_family_is_a_clear_error(tmp_path):
    result = run_cli(
        "train", "model=siglip_contrastive", "model.backbone_config.model_type=clip",
        *SIGLIP_TINY, f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "needs a SigLIP backbone" in result.stderr
    with pytest.raises(
        UserError, match="'bert' model; mmtrain trains the dual encoders clip, siglip"
    ):
        _parts("clip_contrastive", "+model.backbone_config.model_type=bert")


# --- linear probe, then fine-tune (LP-FT) ------------------------------------------------


@pytest.mark.parametrize(
    "model,extra",
    [("clip_fusion", ()), ("clip_contrastive", ()), ("clip_contrastive", ("model.lora.r=4",))],
)
def test_probe_steps_hold_the_towers_then_warm_them_up(model, extra):
    cfg, parts = _parts(model, "optimizer.probe_steps=3", "scheduler.warmup_steps=2", *extra)
    from mmtrain.spec import parse

    spec = parse(cfg)
    optimizer = spec.optimizer.build(model=parts.model, samples_per_step=32)
    schedule = spec.scheduler.build(optimizer=optimizer, total_steps=20)
    towers = {id(p) for p in parts.model.backbone_parameters()}
    is_tower = [id(g["params"][0]) in towers for g in optimizer.param_groups]
    assert any(is_tower) and not all(is_tower)
    rates = []
    for _ in range(8):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    for step, lrs in enumerate(rates):
        for lr, tower in zip(lrs, is_tower, strict=True):
            if tower and step < 3:
                assert lr == 0, (step, lr)
            elif step >= 2:
                assert lr > 0, (step, tower)
    # The towers' own warmup (2 steps): half their scheduled rate on the first step after it.
    tower = is_tower.index(True)
    scheduled = optimizer.param_groups[tower]["initial_lr"] * schedule.lr_lambdas[0](3)
    assert rates[3][tower] == pytest.approx(scheduled / 2)
    assert rates[4][tower] == pytest.approx(
        optimizer.param_groups[tower]["initial_lr"] * schedule.lr_lambdas[0](4)
    )


def test_probe_steps_resume_exactly_across_the_switch(tmp_path):
    probe = [*TINY, "optimizer.probe_steps=5", "optimizer.backbone_lr_scale=1.0"]
    full = tmp_path / "full"
    result = run_cli(
        "train", *probe, "trainer.checkpoint.every_n_steps=2", "trainer.checkpoint.keep_last=null",
        f"hydra.run.dir={full}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "after step 5: the towers start training" in (full / "train.log").read_text()
    saved = {s: torch.load(full / "checkpoints" / f"step_{s}.pt")["model"] for s in (2, 4, 6)}
    for name, tensor in saved[2].items():
        if name.startswith("clip.") and tensor.is_floating_point():
            assert torch.equal(saved[4][name], tensor), name  # frozen while probing
    moved = [
        n for n in saved[4] if n.startswith("clip.") and not torch.equal(saved[4][n], saved[6][n])
    ]
    assert moved  # and training after it
    assert not torch.equal(saved[2]["head.0.weight"], saved[4]["head.0.weight"])
    resumed = tmp_path / "resumed"
    result = resume_from_step(full, 4, resumed, *probe, "trainer.checkpoint.every_n_steps=2")
    assert result.returncode == 0, result.stderr
    assert_same_weights(full / "checkpoints" / "last.pt", resumed / "checkpoints" / "last.pt")
