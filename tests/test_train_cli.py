"""The real `mmtrain train` command, through a subprocess, on a tiny model."""

import json

import pytest
import torch
from conftest import TINY, read_jsonl, run_cli


def test_train_writes_a_complete_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", *TINY, "trainer.max_epochs=3", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr + result.stdout

    assert (run_dir / ".hydra" / "config.yaml").is_file()
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "trainer.max_epochs=3" in overrides
    log = (run_dir / "train.log").read_text()
    assert "building model clip_fusion" in log and "validation" in log
    assert "training 24 steps (8 per epoch): trainer.max_epochs=3 of 8 steps" in log
    assert "torch threads: " in log  # and on a shared CPU, how to set OMP_NUM_THREADS

    events = read_jsonl(run_dir / "metrics.jsonl")
    assert all("step" in e and "epoch" in e for e in events)
    train = [e for e in events if "train/loss" in e]
    val = [e for e in events if "val/accuracy" in e]
    assert [e["step"] for e in val] == [8, 16, 24]  # one evaluation per epoch of 8 steps
    assert {
        "val/loss",
        "val/accuracy",
        "val/f1",
        "val/precision",
        "val/recall",
        "val/auroc",
    } <= set(val[-1])
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    # clip_fusion's loss is cross-entropy + 0.5 x contrastive: both parts are logged too.
    for event in train:
        whole = event["train/loss_ce"] + 0.5 * event["train/loss_contrastive"]
        assert event["train/loss"] == pytest.approx(whole, rel=1e-5)
    assert "positive class of val/f1, val/precision, val/recall, val/auroc: 'match' (chosen" in log

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == 24 and summary["epochs"] == 3
    best = max(val, key=lambda e: e["val/accuracy"])
    assert summary["best"] == {
        "metric": "val/accuracy",
        "value": best["val/accuracy"],
        "step": best["step"],
    }
    # "final" holds best.pt's metrics (what eval, predict and export use), "last" the last's.
    assert summary["final"]["val/accuracy"] == best["val/accuracy"]
    assert summary.get("last", summary["final"])["val/accuracy"] == val[-1]["val/accuracy"]
    assert summary["samples_per_s"] > 0 and summary["wall_s"] > 0

    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "step",
        "epoch",
        "data",
        "rng",
        "config",
    } <= set(last)
    assert last["step"] == 24 and last["config"]["trainer"]["max_epochs"] == 3
    best_ckpt = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best_ckpt["step"] == best["step"]
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_concat_fusion_runs(tmp_path):
    result = run_cli(
        "train", *TINY, "model.fusion=concat", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_same_seed_gives_the_same_numbers(tmp_path):
    runs = []
    for name in ("a", "b"):
        result = run_cli("train", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr
        runs.append(read_jsonl(tmp_path / name / "metrics.jsonl"))

    def without_speed(events):
        return [{k: v for k, v in e.items() if k != "train/samples_per_s"} for e in events]

    assert without_speed(runs[0]) == without_speed(runs[1])


def test_unknown_key_fails_before_anything_is_built(tmp_path):
    result = run_cli("train", *TINY, "+model.fusion_layer=2", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert (
        "Unknown key 'fusion_layer' for model 'clip_fusion'. Did you mean 'fusion_layers'?"
        in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tokenizer").exists() and not (tmp_path / "checkpoints").exists()


def test_unknown_fusion_lists_the_registered_ones(tmp_path):
    result = run_cli("train", *TINY, "model.fusion=gated", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert (
        "Unknown fusion 'gated'" in result.stderr
        and "concat, cross_attention, cross_attention_concat, product" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_unknown_option_and_bad_value_are_clear(tmp_path):
    result = run_cli("train", "model=clip_fusin", f"hydra.run.dir={tmp_path}")
    assert (
        result.returncode == 2
        and "clip_fusion" in result.stderr
        and "Traceback" not in result.stderr
    )
    result = run_cli("train", "trainer.precision=64", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert "trainer.precision must be one of: auto, 32, bf16, 16 (got 64)" in result.stderr


def test_cfg_job_and_help_work():
    result = run_cli("train", "--cfg", "job", "optimizer.lr=3e-4")
    assert (
        result.returncode == 0
        and "lr: 0.0003" in result.stdout
        and "fusion: cross_attention" in result.stdout
    )
    result = run_cli("train", "--help")
    assert (
        result.returncode == 0
        and "model: clip_contrastive, clip_fusion" in result.stdout
        and "mmtrain train -m" in result.stdout
    )


def test_list_shows_groups_and_components():
    result = run_cli("list")
    assert result.returncode == 0
    for word in ("data", "shapes", "clip_fusion", "cross_attention", "adamw", "cosine", "constant"):
        assert word in result.stdout
    import inspect

    from mmtrain.models.classifier import clip_fusion

    line = inspect.getsourcelines(clip_fusion)[1]
    result = run_cli("list", "model")
    assert result.returncode == 0 and f"mmtrain/models/classifier.py:{line}" in result.stdout
    result = run_cli("list", "nonsense")
    assert result.returncode == 2 and "one of: data, model" in result.stderr


def _trainer(*overrides):
    from conftest import compose_train

    from mmtrain.spec import parse

    return parse(compose_train(list(overrides))).trainer


def test_the_budget_the_user_sets_is_obeyed():
    from mmtrain.spec import budget

    # Neither set: 10 epochs raised to min_steps on small data, the log says why.
    default = budget(_trainer(), 1)
    assert default.total == 2000 and "trainer.min_steps=2000" in default.reason
    assert "set trainer.max_epochs or trainer.max_steps" in default.reason
    assert budget(_trainer(), 250).total == 2500
    # An explicit max_epochs is the number of epochs: 1 epoch of 30 rows is 1 step.
    one_epoch = budget(_trainer("trainer.max_epochs=1"), 1)
    assert one_epoch.total == 1 and "trainer.max_epochs=1" in one_epoch.reason
    # An explicit max_steps is the number of steps, above the default and over max_epochs.
    assert budget(_trainer("trainer.max_steps=3000"), 94).total == 3000
    both = budget(_trainer("trainer.max_steps=5", "trainer.max_epochs=4"), 94)
    assert both.total == 5 and "wins over trainer.max_epochs=4" in both.reason
    # Set in an experiment config counts as set by the user.
    fast = _trainer("experiment=fast")  # its max_epochs, not the default's 2,000 steps
    assert fast.max_epochs is not None and budget(fast, 63).total == fast.max_epochs * 63 < 2000


def test_a_run_written_before_default_epochs_keeps_its_budget():
    from mmtrain.releases import upgrade
    from mmtrain.spec import TrainerConfig, budget, typed

    old = {"trainer": {"max_epochs": 10, "max_steps": None, "min_steps": 2000}}
    trainer = typed(TrainerConfig, upgrade(old)["trainer"], "trainer")
    assert budget(trainer, 47).total == 2000 and budget(trainer, 250).total == 2500
    epochs = {"trainer": {"max_epochs": 3, "max_steps": None, "min_steps": None}}
    assert budget(typed(TrainerConfig, upgrade(epochs)["trainer"], "trainer"), 47).total == 141


def test_tiny_epochs_validate_on_a_step_cadence():
    from mmtrain.loop import EPOCH_END_VALIDATIONS, epoch_end_validates, validation_gap

    def validated(per_epoch, max_steps):
        ends = range(per_epoch, max_steps + 1, per_epoch)
        return [s for s in ends if epoch_end_validates(s, per_epoch, max_steps)]

    assert validated(8, 24) == [8, 16, 24]  # few epochs: every epoch end
    one_step = validated(1, 2000)  # 2,000 one-step epochs: every 40 steps
    assert len(one_step) == EPOCH_END_VALIDATIONS and one_step[:2] == [40, 80]
    three = validated(3, 2000)  # the first epoch end past each multiple of 40
    assert three[:3] == [42, 81, 120] and three[-1] == 1962  # then the last step, 2,000
    assert validation_gap(2000) == 40 and validation_gap(16) == 1


def test_a_shared_cpu_is_told_how_to_set_its_threads(monkeypatch, caplog):
    from mmtrain import recipe

    monkeypatch.setattr(recipe.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(recipe.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    monkeypatch.setattr(recipe.torch, "get_num_threads", lambda: 2)
    with caplog.at_level("INFO", logger="mmtrain"):
        recipe.cpu_threads_note(world=1)
    assert "torch threads: 2 per process on 2 cores (load average 5.0)" in caplog.text
    assert "e.g. OMP_NUM_THREADS=1 mmtrain train" in caplog.text
    caplog.clear()
    monkeypatch.setattr(recipe.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    with caplog.at_level("INFO", logger="mmtrain"):
        recipe.cpu_threads_note(world=1)  # a quiet CPU: the count alone
    assert "torch threads: 2" in caplog.text and "OMP_NUM_THREADS" not in caplog.text
