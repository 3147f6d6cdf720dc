"""Tasks that `srun` starts without torchrun: SLURM's variables read as torchrun's."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY

from mmtrain.distributed import from_slurm, hostnames

TASK = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242"}


def test_slurm_tasks_become_torchrun_ranks_with_the_first_host_as_master():
    found = from_slurm({**TASK, "SLURM_JOB_NODELIST": "node[07-08]"})
    assert found == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node07",
        "MASTER_PORT": str(15000 + 4242),
    }
    # The same job gives every task the same master; the user's address and port win.
    assert from_slurm({**TASK, "SLURM_PROCID": "0", "SLURM_NODELIST": "node[07-08]"})[
        "MASTER_PORT"
    ] == str(15000 + 4242)
    mine = from_slurm({**TASK, "SLURM_NODELIST": "a", "MASTER_ADDR": "b", "MASTER_PORT": "1234"})
    assert (mine["MASTER_ADDR"], mine["MASTER_PORT"]) == ("b", "1234")


def test_one_task_or_torchrun_leaves_the_environment_alone():
    assert from_slurm({**TASK, "SLURM_NTASKS": "1"}) == {}
    assert from_slurm({**TASK, "RANK": "0", "WORLD_SIZE": "4"}) == {}
    assert from_slurm({"SLURM_NTASKS": "4"}) == {}  # an allocation's shell, not an srun task


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a,b", ["a", "b"]),
        ("rack1-[8-10],login", ["rack1-8", "rack1-9", "rack1-10", "login"]),
        ("localhost", ["localhost"]),
    ],
)
def test_host_lists_expand_as_scontrol_does(nodelist, hosts):
    assert hostnames(nodelist) == hosts


@pytest.mark.slow
def test_two_srun_tasks_train_into_one_run_directory(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_"))}
    base.pop("LOCAL_RANK", None)
    base.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    base.update(SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", MASTER_PORT="29761")
    command = [sys.executable, "-m", "mmtrain", "train", "trainer.device=cpu", *TINY]
    tasks = [
        subprocess.Popen(
            [*command, "trainer.max_epochs=2"],
            cwd=tmp_path,
            env={**base, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][1][-3000:]
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs
    log = (runs[0] / "train.log").read_text()
    assert "2 processes" in log
    assert log.count("building model") == 1  # rank 1 writes nothing
    summary = json.loads((runs[0] / "summary.json").read_text())
    # 256 pairs over 2 ranks of 32: 4 steps per epoch instead of 8
    assert summary["status"] == "completed" and summary["steps"] == 8
