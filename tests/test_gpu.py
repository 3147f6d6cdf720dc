"""Every CUDA path run once: bf16 and fp16 autocast, the grad scaler, torch.compile, exact
enough resume, NCCL under torchrun, and a GPU-trained run used on the CPU.

Marked `gpu`: `pytest -m gpu` runs them (skipped without CUDA); the CPU suite (`make test`)
deselects them. `benchmarks/gpu_check.sh` runs them with the speed measurements.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY, read_jsonl, resume_from_step, run_cli

from mmtrain import checkpoint as ckpt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ON_GPU = [*TINY, "trainer.device=cuda", "data.num_workers=2"]
# Resumed GPU runs match within this (cuBLAS/cuDNN kernels are not bit-deterministic).
WEIGHT_TOLERANCE = 1e-3


def _summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_a_default_run_on_cuda_learns_in_bf16(tmp_path):
    result = run_cli(
        "train", "trainer.device=cuda", "trainer.max_epochs=3", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    log = (tmp_path / "train.log").read_text()
    expected = "bf16" if torch.cuda.is_bf16_supported() else "precision 32"
    assert "device cuda" in log and expected in log
    summary = _summary(tmp_path)
    assert summary["status"] == "completed" and summary["best"]["value"] >= 0.75  # chance 0.5


def test_fp16_uses_the_grad_scaler(tmp_path):
    result = run_cli("train", *ON_GPU, "trainer.precision=16", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    assert saved["scaler"].get("scale", 0) > 0  # an enabled scaler keeps its scale
    losses = [e["train/loss"] for e in read_jsonl(tmp_path / "metrics.jsonl") if "train/loss" in e]
    assert all(loss is not None for loss in losses) and losses[-1] < losses[0]


def test_compile_trains(tmp_path):
    result = run_cli(
        "train", *ON_GPU, "trainer.compile=true", f"hydra.run.dir={tmp_path}", timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert _summary(tmp_path)["status"] == "completed"


def test_resume_on_cuda_continues_the_run(tmp_path):
    full = tmp_path / "full"
    args = [*ON_GPU, "trainer.checkpoint.every_n_steps=1", "trainer.checkpoint.keep_last=null"]
    result = run_cli("train", *args, f"hydra.run.dir={full}")
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = tmp_path / "resumed"
    result = resume_from_step(full, 5, resumed, *ON_GPU)
    assert result.returncode == 0, result.stderr[-2000:]
    first = ckpt.load(full / "checkpoints" / "last.pt")["model"]
    second = ckpt.load(resumed / "checkpoints" / "last.pt")["model"]
    worst = max((first[k].float() - second[k].float()).abs().max().item() for k in first)
    assert worst < WEIGHT_TOLERANCE, worst
    assert _summary(resumed)["steps"] == _summary(full)["steps"]


def test_torchrun_with_nccl(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29811",
         "-m", "mmtrain", "train", *ON_GPU, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "process group: nccl" in (tmp_path / "train.log").read_text()
    assert _summary(tmp_path)["status"] == "completed"


def test_a_gpu_trained_run_is_used_on_the_cpu(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", *ON_GPU, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    cpu = {"CUDA_VISIBLE_DEVICES": ""}
    result = run_cli("eval", f"run={run_dir}", "trainer.device=cpu", env=cpu)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run_dir / "eval_val.json").read_text())["val/accuracy"] > 0.5
    export = tmp_path / "export"
    result = run_cli("export", f"run={run_dir}", f"out={export}", env=cpu)
    assert result.returncode == 0, result.stderr[-2000:]
    from transformers import CLIPModel

    assert CLIPModel.from_pretrained(export).device.type == "cpu"
