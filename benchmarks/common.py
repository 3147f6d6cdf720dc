"""Shared by the benchmarks: config composition, thread count, the step clock, peak memory,
the models, and the summary statistics."""

from __future__ import annotations

import contextlib
import logging
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.optim.optimizer import register_optimizer_step_post_hook

CONF = Path(__file__).resolve().parent.parent / "conf"

# CLIP ViT-B/32's sizes (the reference figures in benchmarks/RESULTS.md), built from a config with the concat head.
VIT_B32 = [
    "model.fusion=concat",
    "model.backbone_config.projection_dim=512",
    "model.backbone_config.vision.image_size=224",
    "model.backbone_config.vision.patch_size=32",
    "model.backbone_config.vision.hidden_size=768",
    "model.backbone_config.vision.intermediate_size=3072",
    "model.backbone_config.vision.num_hidden_layers=12",
    "model.backbone_config.vision.num_attention_heads=12",
    "model.backbone_config.text.hidden_size=512",
    "model.backbone_config.text.intermediate_size=2048",
    "model.backbone_config.text.num_hidden_layers=12",
    "model.backbone_config.text.num_attention_heads=8",
    "model.backbone_config.text.max_position_embeddings=77",
]
MODELS = {"small": [], "vit-b32": VIT_B32}  # small: conf/model/clip_fusion.yaml as it is


def compose_cfg(overrides: list[str]) -> DictConfig:
    """conf/train.yaml composed with `overrides`, as `mmtrain train` would (without Hydra's node)."""
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=overrides)


def set_threads(threads: int | None) -> None:
    """Fix torch's CPU threads (intra-op and inter-op) before any parallel work runs; None
    keeps torch's default. On a CPU shared with other jobs, 1 avoids OpenMP spin-waits on a
    descheduled partner thread (benchmarks/RESULTS.md)."""
    if not threads:
        return
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first inter-op work
        torch.set_num_interop_threads(threads)


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max, quartiles and interquartile range of `values`, and their number."""
    values = list(values)
    q1, _, q3 = (
        statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    )
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "n": len(values),
        "all": [round(v, 4) for v in values],
    }


def quiet() -> None:
    """No console output from mmtrain (which also turns its progress bar off) or transformers."""
    logging.getLogger("mmtrain").setLevel(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)


class StepClock:
    """Times optimizer steps with a global post-step hook, so every loop is timed alike.

    `samples_per_s` is batch * (steps after warm-up) / (end of the last step - end of the
    warm-up's last step). On CUDA the two boundary steps synchronize the device; the steps
    between run as the loop lets them. `samples_per_cpu_s` divides by the process's CPU
    time instead (all its threads): on a CPU shared with other jobs it counts the work done,
    not the time spent waiting for a core.
    """

    def __init__(self, device: torch.device, warmup: int, steps: int):
        self.sync = device.type == "cuda"
        self.marks = {warmup, steps}
        self.warmup = warmup
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.start = 0.0

    def _tick(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.sync and len(self.times) + 1 in self.marks:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())

    def __enter__(self) -> StepClock:
        self.times, self.cpu_times, self.start = [], [], time.perf_counter()
        self.handle = register_optimizer_step_post_hook(self._tick)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()

    def samples_per_s(self, batch_size: int, cpu: bool = False) -> float:
        measured = (self.cpu_times if cpu else self.times)[self.warmup - 1 :]
        if len(measured) < 2:
            raise RuntimeError(f"only {len(self.times)} steps ran; need more than --warmup")
        return batch_size * (len(measured) - 1) / (measured[-1] - measured[0])

    def first_step_s(self) -> float:
        """Seconds from entering the clock to the end of the first optimizer step."""
        return self.times[0] - self.start


class PeakMemory:
    """Peak device memory (CUDA) or peak resident set size of this process (CPU), in MiB.

    On Linux, writing 5 to /proc/self/clear_refs resets the peak RSS that getrusage reports,
    so each phase gets its own peak (it still counts everything resident in the process).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        with contextlib.suppress(OSError):  # if so, the peak covers the whole process so far
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class ClipVocab:
    """Stands in for CLIP's 49,408-token tokenizer: the sizes and ids that build_backbone reads."""

    pad_token_id, bos_token_id, eos_token_id = 49407, 49406, 49407

    def __len__(self) -> int:
        return 49408


def synthetic_batch(
    batch_size: int, image_size: int, text_len: int, vocab: int, eos: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """uint8 images, token ids ending in end-of-text, a full mask and labels, on `device`."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=generator)
    input_ids = torch.randint(0, vocab, (batch_size, text_len), generator=generator)
    input_ids[input_ids == eos] = (eos + 1) % vocab  # CLIP's text tower pools at the first eos
    input_ids[:, -1] = eos
    batch = {
        "images": images.to(torch.uint8),
        "input_ids": input_ids,
        "attention_mask": torch.ones(batch_size, text_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=generator),
    }
    return {k: v.to(device) for k, v in batch.items()}
