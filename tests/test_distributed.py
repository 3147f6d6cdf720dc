"""DDP through torchrun and through trainer.nproc_per_node, on CPU with gloo."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY, read_jsonl, run_cli

from mmtrain import checkpoint as ckpt

pytestmark = pytest.mark.slow  # each test starts several Python processes (~30-60 s here)


def _train_losses(run_dir):
    return [e["train/loss"] for e in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in e]


def test_torchrun_writes_one_run_directory_and_learns(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29731",
        "-m", "mmtrain", "train", "trainer.device=cpu", *TINY, "trainer.max_epochs=3",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    run_dir = tmp_path / "run"
    log = (run_dir / "train.log").read_text()
    assert "2 processes" in log
    assert log.count("building model clip_fusion") == 1  # rank 1 writes nothing
    summary = json.loads((run_dir / "summary.json").read_text())
    # 256 pairs over 2 ranks of 32: 4 steps per epoch instead of 8
    assert summary["status"] == "completed" and summary["steps"] == 12
    losses = _train_losses(run_dir)
    assert losses[-1] < losses[0]

    # The same world size as two "nodes" of one process each (c10d rendezvous on 127.0.0.1),
    # started without a run directory: they agree on one, and train the same weights.
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    started = [_node(nodes, port=29791, extra=["trainer.max_epochs=3"]) for _ in range(2)]
    for node in started:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-3000:]
    [two_nodes] = list((nodes / "outputs").glob("*/*"))
    assert (two_nodes / "train.log").read_text().count("building model clip_fusion") == 1
    one = ckpt.load(run_dir / "checkpoints" / "last.pt")["model"]
    two = ckpt.load(two_nodes / "checkpoints" / "last.pt")["model"]
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


def _node(cwd, port: int, extra: list[str]) -> subprocess.Popen:
    """One "node" of a two-node torchrun job on this host: one process, c10d rendezvous."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
        "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
        "-m", "mmtrain", "train", "trainer.device=cpu", *TINY, *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _workers(agent: int) -> dict[int, int]:
    """The global RANK of each worker process a torchrun agent started: {pid: rank}."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        found.update({int(entry.name): int(v[5:]) for v in env if v.startswith(b"RANK=")})
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_a_lost_node_stops_the_other_with_a_message_and_a_whole_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    extra = [
        "trainer.max_epochs=40",
        "trainer.checkpoint.every_n_steps=2",
        f"hydra.run.dir={run_dir}",
    ]
    # The first node hosts the rendezvous; the second is the one lost. (Losing the host makes
    # torchrun's own agent on the other node fail with its traceback and stop its worker.)
    host = _node(ROOT, port=29797, extra=extra)
    deadline = time.monotonic() + 240
    while not _listening(29797):
        assert time.monotonic() < deadline and host.poll() is None
        time.sleep(0.2)
    other = _node(ROOT, port=29797, extra=extra)
    while "step 6/" not in _read(run_dir / "train.log"):
        assert time.monotonic() < deadline and host.poll() is None and other.poll() is None
        time.sleep(0.2)
    workers = _workers(other.pid)
    os.killpg(other.pid, signal.SIGKILL)  # the node: its agent and its worker
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    other.communicate()
    _, stderr = host.communicate(timeout=240)
    assert host.returncode != 0
    assert "Another process of this job stopped unexpectedly" in stderr, stderr[-3000:]
    assert f"mmtrain resume {run_dir}" in stderr
    if 1 in workers.values():  # rank 0 is left: it writes the run's end
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"
    assert ckpt.load(run_dir / "checkpoints" / "last.pt")["step"] >= 6  # whole


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def test_torchrun_without_run_dir_agrees_on_one_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29741",
        "-m", "mmtrain", "train", "trainer.device=cpu", *TINY, "trainer.max_epochs=1",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    assert (runs[0] / "summary.json").is_file() and (runs[0] / ".hydra" / "config.yaml").is_file()


def test_multirun_jobs_each_train_with_two_workers(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train", "-m", "optimizer.lr=1e-3,3e-4", "trainer.nproc_per_node=2", *TINY,
        "trainer.max_epochs=1", f"hydra.sweep.dir={sweep}", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, lr in zip(jobs, ("0.001", "0.0003"), strict=True):
        assert f"optimizer.lr={lr}" in (job / ".hydra" / "overrides.yaml").read_text()
        assert json.loads((job / "summary.json").read_text())["status"] == "completed"
        assert "starting 2 workers" in (job / "train.log").read_text()
        assert (job / "checkpoints" / "last.pt").is_file() and (job / "tokenizer").is_dir()


def test_contrastive_under_torchrun_gathers_negatives_and_resumes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"

    def torchrun(*extra, port):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
            "-m", "mmtrain", "train", "trainer.device=cpu", "model=clip_contrastive", "data.hard_negatives=2",
            *TINY, *extra, f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        return subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
        )

    result = torchrun("trainer.max_epochs=1", port=29751)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4
    result = torchrun("trainer.max_epochs=2", "trainer.resume=auto", port=29761)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at step 4" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert [
        e["step"] for e in read_jsonl(run_dir / "metrics.jsonl") if "val/recall@1_i2t" in e
    ] == [4, 8]
