"""Training state that survives: exact resume, interruption, bad numbers, early stopping."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, assert_same_weights, read_jsonl, resume_from_step, run_cli

from mmtrain import checkpoint as ckpt
from mmtrain.errors import UserError

# Shuffled, 2 loader workers, 8 steps per epoch, dropout on: everything that could drift.
RESUMABLE = [*TINY, "data.num_workers=2", "trainer.max_epochs=2", "trainer.log_every_n_steps=1"]


def _train_losses(run_dir, after=0):
    return [
        (e["step"], e["train/loss"])
        for e in read_jsonl(run_dir / "metrics.jsonl")
        if "train/loss" in e and e["step"] > after
    ]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """A run that is never stopped, keeping a checkpoint after every step."""
    run_dir = tmp_path_factory.mktemp("full")
    result = run_cli(
        "train",
        *RESUMABLE,
        "trainer.checkpoint.every_n_steps=1",
        "trainer.checkpoint.keep_last=null",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.parametrize("stop_step", [5, 8], ids=["mid-epoch", "epoch-boundary"])
def test_resumed_run_matches_the_uninterrupted_one_bit_for_bit(full_run, tmp_path, stop_step):
    stopped = tmp_path / "stopped"
    result = resume_from_step(full_run, stop_step, stopped, *RESUMABLE)
    assert result.returncode == 0, result.stderr
    assert (
        f"resumed from {stopped / 'checkpoints' / 'last.pt'} at step {stop_step}"
        in (stopped / "train.log").read_text()
    )

    assert_same_weights(full_run / "checkpoints" / "last.pt", stopped / "checkpoints" / "last.pt")
    assert _train_losses(stopped) == _train_losses(full_run, after=stop_step)
    assert json.loads((stopped / "summary.json").read_text())["steps"] == 16


def test_mmtrain_resume_continues_a_run_from_its_directory_bit_for_bit(full_run, tmp_path):
    """A run stopped after step 5 (its directory as such a run leaves it: its saved
    overrides and last.pt) continues with `mmtrain resume RUN_DIR` alone."""
    stopped = tmp_path / "stopped"
    shutil.copytree(full_run / ".hydra", stopped / ".hydra")
    (stopped / "checkpoints").mkdir()
    shutil.copy(full_run / "checkpoints" / "step_5.pt", stopped / "checkpoints" / "last.pt")
    result = run_cli("resume", str(stopped))
    assert result.returncode == 0, result.stderr
    assert (
        f"resumed from {stopped / 'checkpoints' / 'last.pt'} at step 5"
        in (stopped / "train.log").read_text()
    )
    assert_same_weights(full_run / "checkpoints" / "last.pt", stopped / "checkpoints" / "last.pt")
    assert _train_losses(stopped) == _train_losses(full_run, after=5)


def test_resume_arguments_are_the_runs_own_overrides_then_the_extra_ones(tmp_path):
    from mmtrain.commands.resume import train_arguments

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    saved = ["model.fusion=concat", "trainer.resume=auto", "trainer.max_epochs=2"]
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in saved))
    (run_dir / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  overrides:\n    hydra: [hydra.run.dir=elsewhere, hydra.mode=RUN,\n"
        "      'hydra.searchpath=[file:///mine]']\n  runtime:\n    config_sources:\n"
        "    - {path: mmtrain.conf, schema: pkg, provider: main}\n"
        "    - {path: /my/conf, schema: file, provider: command-line}\n"
    )
    with pytest.raises(UserError, match="no checkpoint"):
        train_arguments([str(run_dir)])
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "step_3.pt").write_bytes(b"")
    assert train_arguments([str(run_dir), "trainer.max_epochs=4"]) == [
        "--config-dir", "/my/conf", "hydra.searchpath=[file:///mine]",
        "model.fusion=concat", "trainer.max_epochs=2", "trainer.max_epochs=4",
        "trainer.resume=auto", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    with pytest.raises(UserError, match="KEY=VALUE overrides only"):
        train_arguments([str(run_dir), "--cfg"])
    with pytest.raises(UserError, match="not a run directory"):
        train_arguments([str(tmp_path)])
    result = run_cli("resume", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not a directory: it is not a run directory" in result.stderr


def test_checkpoint_holds_the_full_training_state(full_run):
    state = torch.load(full_run / "checkpoints" / "step_5.pt", weights_only=True)
    assert state["step"] == 5 and state["epoch"] == 0 and state["data"]["batch"] == 5
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 5
    assert state["config"]["data"]["num_workers"] == 2
    # keep_last=null kept every step checkpoint; best.pt and last.pt are there too
    assert [p.name for p in ckpt.step_checkpoints(full_run / "checkpoints")] == [
        f"step_{i}.pt" for i in range(1, 17)
    ]
    assert (full_run / "checkpoints" / "best.pt").is_file()


def test_retention_keeps_the_newest_and_never_best(tmp_path):
    result = run_cli(
        "train",
        *TINY,
        "trainer.checkpoint.every_n_steps=3",
        "trainer.checkpoint.keep_last=2",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert names == ["best.pt", "last.pt", "step_12.pt", "step_15.pt"]


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "mmtrain",
        "train",
        *TINY,
        "trainer.max_epochs=12",
        "trainer.log_every_n_steps=1",
        f"hydra.run.dir={run_dir}",
    ]
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while (
        not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
        and time.time() < deadline
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr  # 128 + SIGTERM, as a shell reports it
    assert "Interrupted by SIGTERM" in stderr
    assert f"Resume with: mmtrain resume {run_dir}" in stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["steps"] < 96
    saved = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert saved["step"] == summary["steps"]

    result = run_cli("resume", str(run_dir))  # nothing retyped
    assert result.returncode == 0, result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 96
    steps = [e["step"] for e in read_jsonl(metrics) if "train/loss" in e]
    assert steps == list(range(1, 97))  # every step logged once: nothing lost, nothing twice


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"step": 1, "weights": torch.ones(3)}, path)

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(UserError, match=f"Could not write the checkpoint {path} .disk full"):
        ckpt.save_atomic({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_nonfinite_loss_stops_with_the_step_and_batch(tmp_path):
    result = run_cli(
        "train", *TINY, "optimizer.lr=1e30", "scheduler=constant", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 2
    log = (tmp_path / "train.log").read_text()
    assert "Non-finite loss or gradients at step" in log and "batch indices [" in log
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
    assert "Traceback" not in result.stderr


def test_nonfinite_steps_can_be_skipped_and_are_counted(tmp_path):
    result = run_cli(
        "train",
        *TINY,
        "optimizer.lr=1e30",
        "scheduler=constant",
        "trainer.on_nonfinite=skip",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["nonfinite_steps_skipped"] > 0
    assert (
        f"({summary['nonfinite_steps_skipped']} skipped so far)"
        in (tmp_path / "train.log").read_text()
    )


def test_early_stopping_on_the_monitored_metric(tmp_path):
    result = run_cli(
        "train", *TINY, "optimizer.lr=1e-12", "scheduler=constant", "trainer.max_epochs=6",
        "trainer.early_stopping.patience=1", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "stopped_early" and summary["steps"] == 16  # 2 of 6 epochs


def test_resume_with_a_changed_model_names_the_keys(tmp_path):
    assert (
        run_cli("train", *TINY, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}").returncode == 0
    )
    result = run_cli(
        "train",
        *TINY,
        "model.fusion=concat",
        "data.train_size=128",
        "trainer.resume=auto",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 2
    assert "model.fusion: 'cross_attention_concat' in the checkpoint, 'concat' now" in result.stderr
    assert "data.train_size: 256 in the checkpoint, 128 now" in result.stderr


def test_unwritable_output_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli("train", *TINY, f"hydra.run.dir={blocker / 'run'}")
    assert result.returncode == 2
    assert (
        "Choose a writable place with hydra.run.dir" in result.stderr
        or "hydra.run.dir" in result.stderr
    )
    assert "Traceback" not in result.stderr


# The loop state as mmtrain 0.1.0 wrote it (the `data` entry of every checkpoint).
STATE_0_1_0 = {
    "step": 5, "epoch": 0, "batch": 5, "best": 0.61, "best_step": 4, "stale": 1,
    "skipped": 0, "loss_sum": 2.5, "loss_n": 3,
}  # fmt: skip


def test_the_loop_state_of_a_checkpoint_loads_or_says_why(full_run, tmp_path):
    from mmtrain.errors import UserError
    from mmtrain.loop import TrainState

    saved = torch.load(full_run / "checkpoints" / "step_5.pt", weights_only=True)
    # the format this release writes: 0.1.0's, plus whether a validation is still due and
    # the sums of the loss's parts since the last log line
    assert set(saved["data"]) == set(STATE_0_1_0) | {"validating", "parts_sum"}
    state = TrainState.from_checkpoint({"data": STATE_0_1_0}, tmp_path / "old.pt")
    assert (state.step, state.best, state.loss_n) == (5, 0.61, 3)
    with pytest.raises(UserError, match="written by a newer release") as error:
        TrainState.from_checkpoint({"data": {**STATE_0_1_0, "tokens": 9}}, tmp_path / "new.pt")
    assert "tokens" in str(error.value)
    with pytest.raises(UserError, match="holds no training position"):
        TrainState.from_checkpoint({"data": {"epoch": 1}}, tmp_path / "other.pt")

    # Through the command: a checkpoint without a readable position stops with the reason.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({**saved, "data": {"epoch": 1}}, run_dir / "checkpoints" / "last.pt")
    result = run_cli("train", *RESUMABLE, "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds no training position" in result.stderr


def test_samples_per_s_counts_time_and_samples_over_the_same_steps(tmp_path, monkeypatch):
    """8 steps per epoch, a validation after each, a log every 9 steps: the log at step 9
    comes one step after a validation. On a clock that ticks once per reading, every step
    takes the same time, so every interval must report the same speed; counting only the
    time since the validation against the samples since the last log would report 9 times
    as much at step 9."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir

    from mmtrain import loop, recipe
    from mmtrain.spec import parse

    ticks = iter(range(10**9))
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", [*TINY, "trainer.max_epochs=3", "trainer.log_every_n_steps=9"])
    recipe.fit(parse(cfg), tmp_path)
    events = read_jsonl(tmp_path / "metrics.jsonl")
    speeds = [e["train/samples_per_s"] for e in events if "train/loss" in e]
    assert [e["step"] for e in events if "train/loss" in e] == [9, 18, 24]
    assert max(speeds) / min(speeds) < 1.2, speeds


FIXTURES = ROOT / "tests" / "fixtures"


@pytest.mark.parametrize(
    ("model", "moved"),
    [("clip_fusion", []), ("clip_contrastive", ["data.hard_negatives=2"])],
)
def test_a_config_written_by_0_1_0_reads_as_this_releases(model, moved):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mmtrain.releases import upgrade

    old = OmegaConf.to_container(OmegaConf.load(FIXTURES / f"config-0.1.0-{model}.yaml"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        # 0.1.0's default fusion was cross_attention; its configs name it.
        fusion = ["model.fusion=cross_attention"] if model == "clip_fusion" else []
        # 0.1.0 wrote its (then default) crop settings: off, scale 0.5-1.0; a run keeps its own.
        crop = [
            "data.augment.random_resized_crop.p=0",
            "data.augment.random_resized_crop.scale=[0.5,1.0]",
        ]
        new = OmegaConf.to_container(
            compose("train", [f"model={model}", *moved, *fusion, *crop, *TINY])
        )
    upgraded = upgrade(old)
    for group in ("data", "model"):
        assert upgraded[group] == new[group], group
    assert upgrade(new) == new


def test_runs_of_0_1_0_resume_and_evaluate(tmp_path):
    """A run directory whose config and checkpoint have 0.1.0's keys."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    fusion = "model.fusion=cross_attention"  # 0.1.0's default, named in its config
    result = run_cli("train", *TINY, fusion, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    old = FIXTURES / "config-0.1.0-clip_fusion.yaml"
    (run_dir / ".hydra" / "config.yaml").write_text(old.read_text())
    last = run_dir / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=True)
    torch.save({**saved, "config": OmegaConf.to_container(OmegaConf.load(old))}, last)

    result = run_cli("eval", f"run={run_dir}")
    assert result.returncode == 0, result.stderr
    resume = [*TINY, fusion, "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    result = run_cli("train", *resume)  # today's default crop is not the run's: refused, named
    assert (
        result.returncode == 2
        and "data.augment.random_resized_crop.p: 0.0 in the checkpoint" in result.stderr
    )
    crop = [
        "data.augment.random_resized_crop.p=0",
        "data.augment.random_resized_crop.scale=[0.5,1.0]",
    ]
    result = run_cli("train", *resume, *crop)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 16


def test_a_resume_refuses_a_learning_rate_it_would_not_use(full_run, tmp_path):
    run_dir = tmp_path / "run"
    result = resume_from_step(full_run, 5, run_dir, *RESUMABLE, "optimizer.lr=0.5")
    assert result.returncode == 2, result.stderr
    assert "with optimizer.lr changed (optimizer.lr='auto' in the checkpoint, 0.5 now)" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr and not (run_dir / "summary.json").exists()


def test_a_default_changed_since_the_checkpoint_is_named_not_refused(caplog):
    from mmtrain.guard import refuse_ignored_changes

    saved = {"optimizer": {"lr": 0.001}, "trainer": {"seed": 1}}
    current = {"optimizer": {"lr": "auto"}, "trainer": {"seed": 1}}
    with caplog.at_level("INFO", logger="mmtrain"):
        refuse_ignored_changes(saved, current, "last.pt", explicit=["trainer.max_epochs"])
    assert "the checkpoint's optimizer.lr=0.001 (the default is now 'auto')" in caplog.text
    with pytest.raises(UserError, match="with optimizer.lr changed"):
        refuse_ignored_changes(saved, current, "last.pt", explicit=["optimizer"])
