"""Collectives for data-parallel training: who this process is, its process group, and
the reductions and gathers the loop, the losses and the metrics need.

Every function works unchanged in a single process (world size 1), so callers never ask
whether they run under DDP. Starting the worker processes is `mmtrain.launch`'s job.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in this job (1 without torchrun or nproc_per_node)."""
    return (
        dist.get_world_size()
        if dist.is_available() and dist.is_initialized()
        else int(os.environ.get("WORLD_SIZE", 1))
    )


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    return (
        dist.get_rank()
        if dist.is_available() and dist.is_initialized()
        else int(os.environ.get("RANK", 0))
    )


def is_main() -> bool:
    """Whether this process writes the run directory, logs and checkpoints."""
    return rank() == 0


@contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the job's process group (gloo on CPU, nccl on CUDA) for the duration, when
    torchrun or mmtrain.launch started this process as one of several."""
    # torchrun's one-process jobs join a group too: the same code path as many processes.
    if dist.is_initialized() or (world_size() == 1 and "TORCHELASTIC_RUN_ID" not in os.environ):
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
        # Leave together: a rank that tears down its connections while another still
        # finishes (rank 0 writes the last files) could abort at exit. Not after an error,
        # where the other ranks may never arrive.
        dist.barrier()
    finally:
        dist.destroy_process_group()


TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def from_slurm(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from
    SLURM's, for a process `srun` started as one of several tasks without torchrun; empty
    when SLURM ran one task or torchrun's variables are already set.

    The master is MASTER_ADDR if set, else the job's first host; the port MASTER_PORT if
    set, else one derived from SLURM_JOB_ID (the same on every task of the job)."""
    tasks = int(environ.get("SLURM_NTASKS", 1))
    if tasks <= 1 or "SLURM_PROCID" not in environ or any(k in environ for k in TORCHRUN_KEYS):
        return {}
    nodes = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
    job = int(environ.get("SLURM_JOB_ID", 0) or 0)
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(tasks),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or hostnames(nodes)[0],
        # Below the ephemeral range, with room for the run-directory store on port + 1.
        "MASTER_PORT": environ.get("MASTER_PORT") or str(15000 + job % 20000),
    }


def hostnames(nodelist: str) -> list[str]:
    """SLURM's compact host list expanded as `scontrol show hostnames` does, for the common
    forms: `a,b`, `node[01-03,07]`, `rack1-[1-2],login`."""
    hosts = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", nodelist):
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{len(first)}d}{suffix}")
    return hosts


def backend() -> str:
    """The process group's backend (gloo, nccl), or "none" in a single plain process."""
    return dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"


def mean(value: float, device: torch.device) -> float:
    """The mean of `value` over all ranks."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor) / world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on any rank (e.g. a signal reached one)."""
    if world_size() == 1:
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor)


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, keeping gradients to each rank's
    own part (what a contrastive loss needs for negatives from the whole global batch)."""
    if world_size() == 1:
        return tensor
    if not tensor.requires_grad:
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=0)
    import torch.distributed.nn.functional as dist_nn

    return torch.cat(dist_nn.all_gather(tensor), dim=0)


def maximum(value: int, device: torch.device) -> int:
    """The largest `value` over all ranks."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor)


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order, as tensors (no pickling),
    when ranks hold different numbers of rows: each pads to the longest, gathers, and the
    padding is cut off again. Other dimensions must agree between ranks."""
    if world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([len(tensor)], device=tensor.device))
    longest = max(int(size) for size in sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(size)] for part, size in zip(parts, sizes, strict=True)])
