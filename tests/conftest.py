"""Shared helpers: run the real CLI on tiny configs into a tmp_path run directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# The benchmarks' modules (the task suite) import as the benchmarks import each other:
# by their own names. Appended, so that no installed module is shadowed.
sys.path.append(str(ROOT / "benchmarks"))

# Under pytest-xdist (`make test`) the test processes share the cores: each gets its share
# of torch threads, and so does every command it starts (OMP_NUM_THREADS is inherited).
# Oversubscribed OpenMP threads spin and slow every process down many times over.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# A model and data small enough for a CPU run of a few seconds.
TINY = [
    "data.train_size=256",
    "data.val_size=64",
    "data.test_size=64",
    "data.batch_size=32",
    "model.backbone_config.vision.image_size=32",
    "model.backbone_config.vision.hidden_size=32",
    "model.backbone_config.vision.intermediate_size=64",
    "model.backbone_config.vision.num_hidden_layers=1",
    "model.backbone_config.text.hidden_size=32",
    "model.backbone_config.text.intermediate_size=64",
    "model.backbone_config.text.num_hidden_layers=1",
    "model.backbone_config.projection_dim=32",
    "trainer.max_epochs=2",  # an explicit budget: exactly these epochs
    "trainer.log_every_n_steps=2",
    "scheduler.warmup_steps=2",
]


def compose_train(overrides: list[str]):
    """conf/train.yaml composed with `overrides`, as `mmtrain train` composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=overrides)


def run_cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m mmtrain ARGS` in a subprocess, offline, from the repository root."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "200",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "mmtrain", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def resume_from_step(
    full_run: Path, step: int, run_dir: Path, *overrides: str
) -> subprocess.CompletedProcess:
    """Resume into `run_dir` from `full_run`'s step_N.pt: exactly the state that a run
    stopped after step N leaves behind as its last.pt."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(full_run / "checkpoints" / f"step_{step}.pt", run_dir / "checkpoints" / "last.pt")
    return run_cli("train", *overrides, "trainer.resume=auto", f"hydra.run.dir={run_dir}")


def save_tiny_clip(folder: Path, texts: list[str], text_positions: int) -> Path:
    """A tiny CLIP (32 px, width 32, one layer per tower, seeded) saved into `folder` as a
    pretrained model would be: model, a word-level tokenizer of `texts`, image processor."""
    from transformers import CLIPImageProcessor

    from mmtrain.data.tokenizer import build_word_tokenizer
    from mmtrain.models.backbone import build_backbone

    tokenizer = build_word_tokenizer(texts)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
    config = {
        "projection_dim": 32,
        "vision": {**tower, "image_size": 32, "patch_size": 8},
        "text": {**tower, "max_position_embeddings": text_positions},
    }
    torch.manual_seed(0)
    build_backbone(None, config, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


def assert_same_weights(a: Path, b: Path) -> None:
    """Every tensor of the two checkpoints' models is equal (torch.equal), key by key."""
    first = torch.load(a, map_location="cpu", weights_only=True)["model"]
    second = torch.load(b, map_location="cpu", weights_only=True)["model"]
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def build_parts(cfg, run_dir: Path | None = None, class_names: list[str] | None = None):
    """The parts of a training run of the composed config `cfg` (`mmtrain.assemble.parts`)."""
    from mmtrain import assemble
    from mmtrain.spec import parse

    return assemble.parts(parse(cfg), run_dir, class_names)


def data_loader(parts, split: str, *, train: bool, pin_memory: bool = False):
    """The DataLoader of `split` of `parts`, on the CPU (`mmtrain.assemble.loader`)."""
    from mmtrain import assemble

    device = torch.device("cuda" if pin_memory else "cpu")
    return assemble.loader(parts, split, train=train, device=device)
