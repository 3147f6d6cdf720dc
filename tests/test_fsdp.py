"""trainer.strategy=fsdp: FSDP2 over 2 gloo processes on CPU, its sharded checkpoints (exact
resume after a SIGTERM to the whole job) and the single-file checkpoint eval and export read."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, assert_same_weights, compose_train, read_jsonl, run_cli

from mmtrain import checkpoint as ckpt
from mmtrain import sharding
from mmtrain.errors import UserError
from mmtrain.guard import checkpoint_to_resume
from mmtrain.spec import parse

FSDP = [*TINY, "trainer.nproc_per_node=2", "trainer.strategy=fsdp", "trainer.device=cpu",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=1"]  # fmt: skip


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    events = read_jsonl(run_dir / "metrics.jsonl")
    return [(e["step"], e["train/loss"]) for e in events if "train/loss" in e]


def _start(*args: str) -> subprocess.Popen:
    """`python -m mmtrain ARGS` as the leader of its own process group, as a job runs."""
    return subprocess.Popen(
        [sys.executable, "-m", "mmtrain", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


@pytest.mark.slow
def test_fsdp_resumes_exactly_after_a_group_sigterm_and_its_run_evaluates(tmp_path):
    full, run_dir = tmp_path / "full", tmp_path / "run"
    never_stopped = _start("train", *FSDP, f"hydra.run.dir={full}")  # alongside, to save time
    process = _start("train", *FSDP, f"hydra.run.dir={run_dir}")
    deadline, log = time.time() + 240, run_dir / "train.log"
    while not (log.is_file() and "step 3/" in log.read_text()):
        assert time.time() < deadline and process.poll() is None, "the run did not reach step 3"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)  # the launcher and both ranks
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr and "last.dcp is saved" in stderr
    stopped_at = json.loads((run_dir / "summary.json").read_text())["steps"]
    assert 3 <= stopped_at < 8
    shards = run_dir / "checkpoints" / "last.dcp"
    assert {p.name for p in shards.iterdir()} == {
        ".metadata", "__0_0.distcp", "__1_0.distcp", ckpt.STATE_FILE
    }  # fmt: skip
    assert ckpt.load(shards)["step"] == stopped_at  # read as any checkpoint: weights_only
    assert not (run_dir / "checkpoints" / "last.pt").exists()  # written when the run ends

    resumed = run_cli("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {shards} at step {stopped_at}" in log.read_text()
    _, stderr = never_stopped.communicate(timeout=240)
    assert never_stopped.returncode == 0, stderr
    assert "fsdp: 4 tower layers (CLIPEncoderLayer, CLIPTextEmbeddings, CLIPVisionEmbeddings) " \
        "and the root sharded over 2 processes" in log.read_text()  # fmt: skip
    assert _losses(run_dir) == _losses(full)  # each step once, the same numbers
    for name in ("last.pt", "best.pt"):  # gathered from the shards, bit for bit
        assert_same_weights(full / "checkpoints" / name, run_dir / "checkpoints" / name)
    whole = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert whole["format"] == "consolidated" and whole["step"] == 8
    assert whole["model"]["clip.logit_scale"].shape == ()  # the scalar FSDP leaves whole

    # One process reading best.pt scores what the two ranks' sharded model scored.
    evaluated = run_cli("eval", f"run={run_dir}", "split=val")
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads((run_dir / "eval_val.json").read_text())["metrics"]
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    for name in ("val/accuracy", "val/auroc", "val/f1"):  # per row (the loss is per batch)
        assert scores[name] == pytest.approx(final[name], abs=1e-6), name
    exported = run_cli("export", f"run={run_dir}", f"out={tmp_path / 'export'}")
    assert exported.returncode == 0, exported.stderr
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(tmp_path / "export")
    assert torch.equal(clip.logit_scale.detach(), whole["model"]["clip.logit_scale"])

    # The single file holds the weights only: no resume from it; nor ddp from the shards.
    with pytest.raises(UserError, match="holds the weights only"):
        checkpoint_to_resume(str(run_dir / "checkpoints" / "best.pt"), run_dir, sharded=True)
    with pytest.raises(UserError, match="with trainer.strategy=fsdp"):
        checkpoint_to_resume("auto", run_dir, sharded=False)  # finds last.pt: weights only
    with pytest.raises(UserError, match="written by trainer.strategy=fsdp"):
        checkpoint_to_resume(str(shards), run_dir, sharded=False)


def test_strategy_is_a_choice_and_fsdp_refuses_what_it_cannot_shard():
    with pytest.raises(UserError, match="trainer.strategy must be one of: ddp, fsdp"):
        parse(compose_train(["trainer.strategy=foo"]))
    trainer = parse(compose_train(["trainer.strategy=fsdp"])).trainer
    with pytest.raises(UserError, match="trainer.nproc_per_node=N"):
        sharding.refuse_unsupported(trainer, world=1, gradcache=False)
    with pytest.raises(UserError, match="trainer.accumulate_grad_batches=1"):
        sharding.refuse_unsupported(trainer, world=2, gradcache=True)
    trainer.precision = "16"
    with pytest.raises(UserError, match="trainer.precision=bf16"):
        sharding.refuse_unsupported(trainer, world=2, gradcache=False)
    with pytest.raises(UserError, match="no tower layers to shard"):
        sharding.shard(torch.nn.Sequential(torch.nn.Linear(2, 2)), "32")


def test_a_crafted_checkpoint_index_runs_no_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        sharding.read_index(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_a_sharded_save_killed_mid_way_leaves_the_last_checkpoint_whole(tmp_path):
    folder = tmp_path / "checkpoints"
    for name in (".last.dcp.old", ".last.dcp.tmp", "step_2.dcp", ".step_4.dcp.tmp"):
        (folder / name).mkdir(parents=True)
        (folder / name / ckpt.STATE_FILE).write_text(name)
    # Killed between the two renames: last.dcp moved aside, the new one not yet in place.
    ckpt.remove_stale_temporaries(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["last.dcp", "step_2.dcp"]
    assert (folder / "last.dcp" / ckpt.STATE_FILE).read_text() == ".last.dcp.old"
    assert ckpt.resume_candidates(folder, sharded=True) == [
        folder / "last.dcp",
        folder / "step_2.dcp",
    ]
    assert ckpt.resume_candidates(folder, sharded=False) == []
