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
    [
        ("a step", signal.SIGTERM, 143),
        ("validation", signal.SIGINT, 130),
        ("a step", signal.SIGUSR1, 138),  # SLURM's warning before a preemption
    ],
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
    # Ended within seconds of its save, not after torch elastic's 30 s shutdown timeout.
    assert time.time() - (run_dir / "summary.json").stat().st_mtime < 25, stderr
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
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    before = {p: p.read_bytes() for p in files}
    with RunLock(run_dir):
        result = run_cli(
            "train", *TINY, "trainer.seed=7", "trainer.resume=auto", f"hydra.run.dir={run_dir}"
        )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        f"The run directory {run_dir} is in use by another run (pid {os.getpid()} on"
        in result.stderr
    )
    # The holder's files untouched: its saved config (.hydra) and train.log too.
    assert {p: p.read_bytes() for p in files} == before


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
    assert not list(sweep.glob("*/checkpoints/*"))  # no trial trained
    for summary in sweep.glob("*/summary.json"):  # each refused trial is listed as failed
        assert json.loads(summary.read_text())["status"] == "failed"


# --- 6. A run directory is the run's own: links, refusals, leftovers -------------------------


@pytest.mark.parametrize("command", ["train", "eval"])
def test_links_planted_in_a_run_directory_are_refused_not_followed(finished, tmp_path, command):
    run_dir = _copy(finished, tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    planted = {"train": ["metrics.jsonl", ".lock"], "eval": ["eval_val.json"]}[command]
    for name in planted:
        (run_dir / name).unlink(missing_ok=True)
        (run_dir / name).symlink_to(victim)
    if command == "train":
        args = ["train", *TINY, "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    else:
        args = ["eval", f"run={run_dir}"]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "symbolic link" in result.stderr and "Traceback" not in result.stderr
    assert victim.read_text() == "precious\n"


def test_the_write_helpers_never_follow_a_link(tmp_path):
    from mmtrain.runlog import open_append, write_file

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "a.json").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        write_file(tmp_path / "a.json", "{}")
    with pytest.raises(UserError, match="symbolic link"):
        open_append(tmp_path / "a.json")
    assert victim.read_text() == "precious\n"
    write_file(tmp_path / "b.json", "{}")
    assert (tmp_path / "b.json").read_text() == "{}" and len(list(tmp_path.iterdir())) == 3


def test_a_fresh_run_into_a_used_directory_is_refused_and_leaves_it_whole(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = run_cli("train", *TINY, "trainer.seed=7", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr
    assert f"The run directory {run_dir} already holds a run" in result.stderr
    assert "trainer.overwrite=true" in result.stderr and "Traceback" not in result.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_overwrite_clears_the_old_run_and_a_resume_keeps_it(tmp_path):
    from mmtrain.guard import claim

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_24.pt").write_bytes(b"old")
    (tmp_path / "metrics.jsonl").write_text('{"step": 24}\n')
    claim(tmp_path, "auto", False)  # a resume continues the run there
    assert (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(UserError, match="already holds a run .metrics.jsonl, checkpoints"):
        claim(tmp_path, None, False)
    with RunLock(tmp_path):
        claim(tmp_path, None, True)
        assert [p.name for p in tmp_path.iterdir()] == [".lock"]


def test_the_lock_survives_its_file_and_is_not_held_by_forked_children(tmp_path):
    with RunLock(tmp_path):
        (tmp_path / ".lock").unlink()  # what a user or a cleanup script may do
        with pytest.raises(UserError, match="in use by another run"):
            RunLock(tmp_path).__enter__()
    lock = RunLock(tmp_path).__enter__()
    started, ready = os.pipe()
    child = os.fork()
    if child == 0:  # a loader worker, say: it must not keep the directory locked
        os.write(ready, b"x")
        time.sleep(3)
        os._exit(0)
    assert os.read(started, 1) == b"x"  # the child runs (its fork handlers have run)
    lock.__exit__()
    try:
        with RunLock(tmp_path):  # free at once, while the child lives on
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(started)
        os.close(ready)


def test_a_rejected_config_leaves_nothing_behind(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mmtrain", "train", "optimizer.lr=abc"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: Key 'lr' of optimizer 'adamw'"), result.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/DATE/TIME


def _forked_children(pid: int) -> list[int]:
    """The loader workers of process `pid` (its children, less multiprocessing's tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == pid and b"resource_tracker" not in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except (OSError, IndexError):
                pass
    return sorted(found)


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie waiting to be reaped has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_kill_9_with_loader_workers_frees_the_directory_at_once(tmp_path):
    run_dir = tmp_path / "run"
    process = _start("train", *SIGNALLED, *LONG_VAL, f"hydra.run.dir={run_dir}")
    _wait_for(_log_has(run_dir, "step 3/"))
    workers = _forked_children(process.pid)
    assert workers
    process.kill()  # the main process only, as the out-of-memory killer does
    process.wait()
    killed = time.monotonic()
    while any(map(_running, workers)) and time.monotonic() < killed + 4:
        time.sleep(0.05)
    # Gone at once, not after torch's 5 s watch of the parent (3 s: a loaded CI machine).
    assert time.monotonic() - killed < 3
    with RunLock(run_dir):  # what an immediate requeue (trainer.resume=auto) takes
        pass


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_a_killed_loader_worker_fails_the_run_with_a_message(tmp_path):
    run_dir = tmp_path / "run"
    process = _start(
        "train", *SIGNALLED, "trainer.max_epochs=20", "trainer.checkpoint.every_n_steps=2",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    _wait_for(_log_has(run_dir, "step 5/"))
    os.kill(_forked_children(process.pid)[0], signal.SIGKILL)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 2, stderr
    assert "Traceback" not in stderr and "data loader worker" in stderr
    summary = _summary(run_dir)
    assert summary["status"] == "failed" and "checkpoints/" in summary["error"]
    assert f"mmtrain resume {run_dir}" in summary["error"]


def test_predict_refuses_to_overwrite_its_input_or_the_run(finished, tmp_path):
    manifest = tmp_path / "in.csv"
    write_csv(manifest, learnable_rows(tmp_path, "predict", 2))
    before = manifest.read_bytes()
    for output in (manifest.with_suffix(".csv"), finished / "summary.json.csv"):
        result = run_cli("predict", f"run={finished}", f"input={manifest}", f"output={output}")
        assert result.returncode == 2, result.stderr
        assert "overwrite" in result.stderr or "inside the run directory" in result.stderr
    assert manifest.read_bytes() == before and not (finished / "summary.json.csv").exists()


def test_export_replaces_an_earlier_export_whole_and_refuses_other_folders(finished, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    result = run_cli("export", f"run={finished}", f"out={other}")
    assert result.returncode == 2 and "holds other files" in result.stderr, result.stderr
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    earlier = tmp_path / "export"
    earlier.mkdir()
    for name in ("mmtrain_head.json", "head.safetensors", "stale.bin"):
        (earlier / name).write_text("an earlier export\n")
    result = run_cli("export", f"run={finished}", f"out={earlier}")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in earlier.iterdir()}
    assert "stale.bin" not in names and "config.json" in names
    assert json.loads((earlier / "mmtrain_head.json").read_text())["mmtrain_model"] == "clip_fusion"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_report_marks_damaged_jobs_instead_of_failing(finished, tmp_path):
    sweep = tmp_path / "sweep"
    for job, summary in (("0", None), ("1", "{not json"), ("2", '["a list"]')):
        shutil.copytree(finished / ".hydra", sweep / job / ".hydra")
        if summary is None:
            shutil.copy(finished / "summary.json", sweep / job / "summary.json")
        else:
            (sweep / job / "summary.json").write_text(summary)
    (sweep / "2" / ".hydra" / "overrides.yaml").write_text("[unclosed")
    result = run_cli("report", str(sweep))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "cannot be read" in result.stderr
    assert result.stdout.count("damaged") == 2 and (sweep / "report.png").is_file()


def test_a_partial_last_line_of_metrics_is_dropped_with_a_warning(tmp_path, caplog):
    from mmtrain.runlog import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "epoch": 0, "train/loss": 2.0}\n{"step": 2, "epoch": 0, "tra')
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        metrics = MetricsLog(tmp_path)
    assert [e["step"] for e in metrics.events] == [
        1
    ] and "line 2 is not a whole event" in caplog.text
    metrics.truncate_after(1)  # what a resume does: the file is whole again
    metrics.log(2, 0, {"train/loss": 1.5})
    assert [e["step"] for e in read_jsonl(path)] == [1, 2]


def test_a_job_whose_rank_0_died_still_gets_a_summary(tmp_path):
    from mmtrain.launch import summarise_failure

    (tmp_path / "checkpoints").mkdir()
    ckpt.save_atomic({"step": 4}, tmp_path / "checkpoints" / "step_4.pt")
    summarise_failure(tmp_path, "rank 0 (killed by SIGKILL)", since=time.time() - 60)
    summary = _summary(tmp_path)
    assert summary["status"] == "failed" and summary["error"] == "rank 0 (killed by SIGKILL)"
    assert summary["last_checkpoint"].endswith("step_4.pt")
    (tmp_path / "summary.json").write_text('{"status": "interrupted"}')  # rank 0's own, newer
    summarise_failure(tmp_path, "another", since=time.time() - 60)
    assert _summary(tmp_path) == {"status": "interrupted"}


def test_a_signal_during_ddp_start_up_says_no_checkpoint_exists(tmp_path):
    from mmtrain.launch import interrupted_message

    message = interrupted_message("SIGTERM", tmp_path)
    assert "no checkpoint was written" in message and "is saved" not in message
    (tmp_path / "checkpoints").mkdir()
    ckpt.save_atomic({"step": 3}, tmp_path / "checkpoints" / "last.pt")
    assert "is whole" in interrupted_message("SIGTERM", tmp_path)


def test_a_run_tokenizer_naming_its_own_code_is_refused_without_a_prompt(finished, tmp_path):
    run_dir = _copy(finished, tmp_path / "run")
    marker = tmp_path / "PWNED"
    config_file = run_dir / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(tokenizer_class="Crafted", auto_map={"AutoTokenizer": ["crafted.Crafted", None]})
    config_file.write_text(json.dumps(config))
    (run_dir / "tokenizer" / "crafted.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PreTrainedTokenizerFast as Crafted\n"
    )
    result = run_cli("eval", f"run={run_dir}")
    assert result.returncode == 2, result.stderr
    assert "never runs" in result.stderr and "[y/N]" not in result.stdout + result.stderr
    assert not marker.exists() and "Traceback" not in result.stderr


def test_damaged_labels_and_tracker_ids_are_messages(tmp_path, caplog):
    from mmtrain.data.source import load_class_names
    from mmtrain.tracking import IDS_FILE, RunInfo

    (tmp_path / "labels.json").write_text('["circle", "squ')
    with pytest.raises(UserError, match="labels.json is damaged"):
        load_class_names(tmp_path)
    (tmp_path / "labels.json").write_text('{"0": "circle"}')
    with pytest.raises(UserError, match="a JSON list expected"):
        load_class_names(tmp_path)
    (tmp_path / IDS_FILE).write_text("\x00\x01")
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        info = RunInfo.of(tmp_path, {}, True, [])
    assert info.ids == {} and "trackers start new runs" in caplog.text


def test_code_a_tokenizer_names_runs_only_when_the_user_opts_in(tmp_path):
    from mmtrain.data.tokenizer import build_word_tokenizer, load_saved_tokenizer, save_tokenizer
    from mmtrain.spec import parse

    save_tokenizer(build_word_tokenizer(["a red circle", "a blue square"]), tmp_path)
    marker = tmp_path / "RAN"
    config_file = tmp_path / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(tokenizer_class="Crafted", auto_map={"AutoTokenizer": [None, "crafted.Crafted"]})
    config_file.write_text(json.dumps(config))
    (tmp_path / "tokenizer" / "crafted.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class Crafted(PreTrainedTokenizerFast):\n    pass\n"
    )
    with pytest.raises(UserError, match="model.trust_remote_code=true"):
        load_saved_tokenizer(tmp_path)
    assert not marker.exists()
    assert type(load_saved_tokenizer(tmp_path, trust_remote_code=True)).__name__ == "Crafted"
    assert marker.exists()
    assert parse(_compose(["model.trust_remote_code=true"])).trust_remote_code is True
    assert parse(_compose([])).trust_remote_code is False
    with pytest.raises(UserError, match="model.trust_remote_code"):
        parse(_compose(["model.trust_remote_code=maybe"]))


def test_a_loader_worker_lost_mid_batch_is_named_even_as_a_broken_connection(tmp_path):
    from types import SimpleNamespace

    from mmtrain.recipe import _lost_process

    out = SimpleNamespace(checkpoints=tmp_path / "checkpoints", run_dir=tmp_path)
    reset = ConnectionResetError(104, "Connection reset by peer")
    message = _lost_process(reset, 1, out, True)
    assert message.startswith("A data loader worker process of this run stopped unexpectedly")
    assert "Connection reset by peer" in message and f"mmtrain resume {tmp_path}" in message
    assert _lost_process(reset, 1, out, False) is None  # no workers: not theirs
    assert _lost_process(RuntimeError("shape mismatch"), 1, out, True) is None
