"""Faults, signals and hostile files: nothing lost, nothing run, no traceback.

Signals are sent the way clusters, `timeout` and terminals send them: to the whole process
group of the command (loader workers and DDP ranks too), not to the main process alone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, assert_same_weights, read_jsonl, run_cli
from conftest import compose_train as _compose
from manifest_files import learnable_rows, write_csv

from mmtrain import checkpoint as ckpt
from mmtrain.data.manifest import manifest
from mmtrain.errors import UserError
from mmtrain.runlock import RunLock
from mmtrain.spec import parse

# 8 steps per epoch, 2 loader workers, dropout on; a validation long enough to be caught.
SIGNALLED = [*TINY, "data.num_workers=2", "trainer.max_epochs=2", "trainer.log_every_n_steps=1"]
LONG_VAL = ["data.val_size=3000"]


def _start(*args: str) -> subprocess.Popen:
    """`python -m mmtrain ARGS` as the leader of its own process group, as a job runs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.Popen(
        [sys.executable, "-m", "mmtrain", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(predicate, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


def _log_has(run_dir: Path, text: str):
    log = run_dir / "train.log"
    return lambda: log.exists() and text in log.read_text()


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A short finished run with step checkpoints, copied by each test that changes it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli(
        "train", *TINY, "trainer.max_epochs=1", "trainer.checkpoint.every_n_steps=2",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return run_dir


def _copy(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


# --- 1. No code from files ----------------------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["resume-auto", "resume-path", "eval", "predict", "export"])
def test_a_crafted_checkpoint_runs_no_code(finished, tmp_path, command):
    run_dir = _copy(finished, tmp_path / "run")
    marker = tmp_path / "PWNED"
    for name in ("best.pt", "last.pt"):
        torch.save({"model": _Payload(marker)}, run_dir / "checkpoints" / name)
    crafted = run_dir / "checkpoints" / ("best.pt" if command in ("eval", "export") else "last.pt")
    args = {
        "resume-auto": ["train", *TINY, "trainer.max_epochs=1", "trainer.resume=auto", f"hydra.run.dir={run_dir}"],
        "resume-path": ["train", *TINY, "trainer.max_epochs=1", f"trainer.resume={crafted}", f"hydra.run.dir={tmp_path / 'new'}"],
        "eval": ["eval", f"run={run_dir}"],
        "predict": ["predict", f"run={run_dir}", f"checkpoint={crafted}", f"input={tmp_path / 'in.csv'}", f"output={tmp_path / 'out.jsonl'}"],
        "export": ["export", f"run={run_dir}", f"out={tmp_path / 'export'}"],
    }[command]  # fmt: skip
    write_csv(tmp_path / "in.csv", learnable_rows(tmp_path, "predict", 2))
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert f"Refusing to load {crafted}" in result.stderr and "could run code" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "export").exists()


def test_checkpoints_hold_only_tensors_and_plain_values(finished):
    # No allow-list: torch's own safe loader takes every checkpoint a run writes.
    for path in (finished / "checkpoints").glob("*.pt"):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        assert set(ckpt.ENTRIES) <= set(saved), path


def test_a_foreign_checkpoint_says_what_it_is(finished, tmp_path):
    foreign = tmp_path / "weights.pt"
    torch.save({"linear.weight": torch.zeros(2, 2)}, foreign)
    result = run_cli("eval", f"run={finished}", f"checkpoint={foreign}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{foreign} is not an mmtrain training checkpoint" in result.stderr
    assert "a bare state_dict of 1 tensors" in result.stderr


def test_checkpoints_of_earlier_releases_still_load(tmp_path):
    # 0.1 and 0.2 kept numpy's RNG state as numpy's own tuple (one uint32 array).
    np.random.seed(3)
    legacy = {key: {} for key in ckpt.ENTRIES}
    legacy["rng"] = {
        "python": __import__("random").getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    torch.save(legacy, tmp_path / "old.pt")
    expected = np.random.rand()
    ckpt.set_rng_state(ckpt.load(tmp_path / "old.pt")["rng"])
    assert np.random.rand() == expected


# --- 2. Signals as clusters send them -------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_cli("train", *SIGNALLED, *LONG_VAL, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [
        (e["step"], e["train/loss"])
        for e in read_jsonl(run_dir / "metrics.jsonl")
        if "train/loss" in e
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("moment", "sig", "code"),
    [("a step", signal.SIGTERM, 143), ("validation", signal.SIGINT, 130)],
)
def test_a_signal_to_the_group_saves_and_the_resume_is_exact(
    uninterrupted, tmp_path, moment, sig, code
):
    run_dir = tmp_path / "run"
    process = _start("train", *SIGNALLED, *LONG_VAL, f"hydra.run.dir={run_dir}")
    # "step 8/" is logged just before the end-of-epoch validation starts.
    _wait_for(_log_has(run_dir, "step 3/" if moment == "a step" else "step 8/"))
    sent = time.monotonic()
    os.killpg(process.pid, sig)
    _, stderr = process.communicate(timeout=240)
    waited = time.monotonic() - sent

    assert process.returncode == code, stderr
    assert "Traceback" not in stderr and f"Interrupted by {sig.name}" in stderr
    assert f"Resume with: mmtrain resume {run_dir}" in stderr
    summary = _summary(run_dir)
    assert summary["status"] == "interrupted" and summary["steps"] < 16
    assert waited < 60  # one step plus a save (and the loaders' shutdown), not the whole run
    if moment == "validation":
        assert "validation of step 8 abandoned" in (run_dir / "train.log").read_text()
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))

    resumed = run_cli("resume", str(run_dir))  # the run's own overrides, its own directory
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(
        uninterrupted / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt"
    )
    assert _losses(run_dir) == _losses(uninterrupted)  # each step once, the same numbers
    validations = [e for e in read_jsonl(run_dir / "metrics.jsonl") if "val/loss" in e]
    assert validations == [
        e for e in read_jsonl(uninterrupted / "metrics.jsonl") if "val/loss" in e
    ]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["nproc_per_node", "torchrun"])
def test_a_signal_to_a_ddp_job_saves_once_and_resumes(tmp_path, launcher):
    run_dir = tmp_path / "run"
    args = [*SIGNALLED, "trainer.max_epochs=3", "trainer.device=cpu"]
    if launcher == "torchrun":
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                   "--master_port=29853", "-m", "mmtrain", "train", *args, f"hydra.run.dir={run_dir}"]  # fmt: skip
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    else:
        args.append("trainer.nproc_per_node=2")
        process = _start("train", *args, f"hydra.run.dir={run_dir}")
    _wait_for(_log_has(run_dir, "step 2/"))
    os.killpg(process.pid, signal.SIGTERM)  # the launcher, both ranks and their loader workers
    _, stderr = process.communicate(timeout=240)
    # torchrun's own agent reports a signal with its traceback and exit code 1; mmtrain's
    # launcher says it in one line and exits 143.
    if launcher == "nproc_per_node":
        assert process.returncode == 143, stderr
        assert "Traceback" not in stderr
    assert "Interrupted by SIGTERM" in stderr and f"mmtrain resume {run_dir}" in stderr
    summary = _summary(run_dir)
    assert summary["status"] == "interrupted"
    assert ckpt.load(run_dir / "checkpoints" / "last.pt")["step"] == summary["steps"]

    resumed = run_cli(
        "train",
        *args,
        "trainer.nproc_per_node=2",
        "trainer.resume=auto",
        f"hydra.run.dir={run_dir}",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert _summary(run_dir)["steps"] == 12
    assert [s for s, _ in _losses(run_dir)] == list(range(1, 13))


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except (OSError, IndexError):
                pass
    return sorted(found)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_a_dead_ddp_rank_stops_the_job_with_a_line_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    process = _start(
        "train", *TINY, "trainer.nproc_per_node=2", "trainer.max_epochs=20",
        "trainer.checkpoint.every_n_steps=2", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    _wait_for(_log_has(run_dir, "step 6/"))
    ranks = _children(process.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)  # rank 1: the second worker the launcher started
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "rank 1 (killed by SIGKILL)" in stderr and "mmtrain resume" in stderr
    assert _summary(run_dir)["status"] == "failed"
    saved = ckpt.load(run_dir / "checkpoints" / "last.pt")  # whole
    assert saved["step"] >= 6


# --- 3. One run per directory ---------------------------------------------------------------


def test_a_second_run_into_a_busy_directory_is_refused(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    with RunLock(run_dir):
        result = run_cli("train", *TINY, "trainer.resume=auto", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        f"The run directory {run_dir} is in use by another run (pid {os.getpid()} on"
        in result.stderr
    )
    assert _summary(run_dir) == _summary(finished)  # the holder's files untouched


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from mmtrain.runlock import RunLock
            RunLock({str(tmp_path)!r}).__enter__()
            print("locked", flush=True)
            time.sleep(300)
        """)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match=f"in use by another run .pid {holder.pid} on"):
        RunLock(tmp_path).__enter__()
    holder.kill()
    holder.wait()
    with caplog.at_level(logging.INFO, logger="mmtrain"), RunLock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()
    assert (
        f"taking over the lock of a run that is no longer running (pid {holder.pid}" in caplog.text
    )
    assert not (tmp_path / ".lock").exists()


# --- 4. Disk and I/O errors; 5. nothing left behind -----------------------------------------

# Loaded by the run through PYTHONPATH: from the third checkpoint file on, writes go to a
# device that is always full.
FULL_DISK = """
import os, tempfile
_mkstemp, _count = tempfile.mkstemp, [0]
def mkstemp(*args, **kwargs):
    fd, name = _mkstemp(*args, **kwargs)
    if str(kwargs.get("dir", "")).endswith("checkpoints"):
        _count[0] += 1
        if _count[0] > 2:
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
    return fd, name
tempfile.mkstemp = mkstemp
"""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_is_a_message_and_earlier_checkpoints_stay(tmp_path):
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FULL_DISK)
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", *TINY, "trainer.checkpoint.every_n_steps=3", f"hydra.run.dir={run_dir}",
        env={"PYTHONPATH": f"{inject}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = "No space left on device while writing"
    assert message in result.stderr and "needs about" in result.stderr
    assert message in (run_dir / "train.log").read_text()
    summary = _summary(run_dir)
    assert summary["status"] == "failed" and message in summary["error"]
    saved = ckpt.load(run_dir / "checkpoints" / "step_3.pt")  # written before: intact
    assert saved["step"] == 3
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def test_resume_skips_a_damaged_last_and_clears_stale_temporaries(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    last = checkpoints / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a truncated file
    stale = checkpoints / ".last.pt.k3j2x9.tmp"  # a write that a kill -9 cut short
    stale.write_bytes(b"half")
    newest_step = ckpt.step_checkpoints(checkpoints)[-1]

    result = run_cli(
        "train", *TINY, "trainer.max_epochs=1", "trainer.resume=auto", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr
    log = (run_dir / "train.log").read_text()
    assert f"skipping {last}: Checkpoint {last} could not be read" in log
    assert f"resumed from {newest_step}" in log
    assert f"removed {stale}, left by an interrupted checkpoint write" in log
    assert not stale.exists()


# --- 7. Strict manifests --------------------------------------------------------------------


def _bad_rows(tmp_path: Path, rows: list[dict], text: str | None = None) -> str:
    train = tmp_path / "train.csv"
    if text is None:
        write_csv(train, rows)
    else:
        train.write_text(text)
    with pytest.raises(UserError) as error:
        manifest(image_size=8, train=str(train), val=str(train))
    return str(error.value)


def test_a_csv_row_that_does_not_match_the_header_is_bad(tmp_path):
    good = learnable_rows(tmp_path, "train", 3)
    lines = ["image,text,label"] + [f"{r['image']},{r['text']},{r['label']}" for r in good]
    lines.append(f"{good[0]['image']},a red, round ball,red")  # an unquoted comma
    lines.append(f"{good[1]['image']},green")
    message = _bad_rows(tmp_path, [], "\n".join(lines) + "\n")
    train = tmp_path / "train.csv"
    assert (
        f"{train}:5: wrong number of fields: 4 fields, the header has 3: quote captions" in message
    )
    assert f"{train}:6: wrong number of fields: 2 fields, the header has 3" in message
    assert f"{train}:2:" not in message


def test_labels_with_leading_zeros_are_names_not_ids(tmp_path):
    rows = learnable_rows(tmp_path, "train", 4)
    for row, label in zip(rows, ["0", "00", "1", "0"], strict=True):
        row["label"] = label
    train = write_csv(tmp_path / "train.csv", rows)
    splits = manifest(image_size=8, train=str(train), val=str(train))
    assert splits["train"].class_names == ["0", "00", "1"]
    assert splits["train"].labels.tolist() == [0, 1, 2, 0]


def test_invisible_captions_and_non_files_are_bad_rows(tmp_path):
    rows = learnable_rows(tmp_path, "train", 5)
    rows[1]["text"] = "\u200b\u200d\ufeff "  # zero-width characters only
    (tmp_path / "images" / "a_folder").mkdir()
    rows[2]["image"] = "images/a_folder"
    rows[3]["image"] = "/dev/null"
    message = _bad_rows(tmp_path, rows)
    train = tmp_path / "train.csv"
    assert f"{train}:3: empty text: the text" in message and "has no visible character" in message
    assert f"{train}:4: not a file: {tmp_path / 'images' / 'a_folder'} is a directory" in message
    assert f"{train}:5: not a file: /dev/null is not a regular file" in message


# --- 8. Config errors, not tracebacks -------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optimizer.lr=nan", "Key 'lr' of optimizer 'adamw' must be a finite positive number or auto (got nan)"),
        ("optimizer.lr=-1", "Key 'lr' of optimizer 'adamw' must be a positive number or auto (got -1)"),
        ("optimizer.lr=fast", "Key 'lr' of optimizer 'adamw' must be a positive number or auto (got 'fast')"),
        ("optimizer.eps=inf", "Key 'eps' of optimizer 'adamw' must be a finite positive number (got inf)"),
        ("optimizer.weight_decay=abc", "Key 'weight_decay' of optimizer 'adamw' must be a number >= 0 (got 'abc')"),
        ("optimizer.weight_decay=-0.1", "Key 'weight_decay' of optimizer 'adamw' must be a number >= 0 (got -0.1)"),
        ("optimizer.betas=[0.9,2]", "Key 'betas' of optimizer 'adamw' must be a list of 2 numbers, each >= 0 and < 1 (got [0.9, 2])"),
        ("optimizer.layer_decay=1.5", "Key 'layer_decay' of optimizer 'adamw' must be a number > 0 and <= 1 or null (got 1.5)"),
        ("scheduler.warmup_steps=-5", "Key 'warmup_steps' of scheduler 'cosine' must be an integer >= 0 (got -5)"),
        ("scheduler.min_lr_ratio=2", "Key 'min_lr_ratio' of scheduler 'cosine' must be a number >= 0 and <= 1 (got 2)"),
        ("trainer.grad_clip=nan", "trainer.grad_clip must be a finite positive number or null (got nan)"),
    ],
)  # fmt: skip
def test_optimizer_and_scheduler_values_are_checked(override, expected):
    with pytest.raises(UserError) as error:
        parse(_compose([override]))
    assert expected in str(error.value)


def test_eval_without_a_checkpoint_names_evals_own_key(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints")
    result = run_cli("eval", f"run={run_dir}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "has no checkpoint" in result.stderr and "checkpoint=PATH" in result.stderr


# --- 9. Sweeps that optimise what is monitored ----------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "direction"),
    [
        ([], "maximize"),
        (["model=clip_contrastive"], "maximize"),
        (["trainer.checkpoint.monitor=val/loss"], "minimize"),
        (["trainer.checkpoint.monitor=val/loss", "trainer.checkpoint.mode=max"], "maximize"),
    ],
)
def test_the_sweep_direction_follows_the_monitored_mode(overrides, direction):
    from mmtrain.cli import _direction

    assert _direction(_compose(overrides)) == direction


@pytest.mark.slow
def test_optuna_is_refused_before_training_when_it_optimises_the_wrong_way(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=minimize",
        "optimizer.lr=tag(log,interval(1e-4,1e-2))", *TINY, "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "hydra.sweeper.direction=minimize, but each run returns" in result.stderr
    assert "hydra.sweeper.direction=maximize" in result.stderr
    assert not list(sweep.glob("*/summary.json"))  # no trial trained
