"""trainer.strategy=fsdp: torch's FSDP2 (`fully_shard`) over a model's tower layers and its
root, and its training-state checkpoints through `torch.distributed.checkpoint` (DCP).

- `refuse_unsupported`: the combinations fsdp does not take, said before anything is built.
- `shard`: `fully_shard` on every layer the towers' transformers classes name as their unit
  of placement (`_no_split_modules`: CLIP's encoder layers and embeddings, a ConvNeXt's
  stages, ...), then on the whole model; mixed precision from trainer.precision.
- `save` / `restore`: a sharded checkpoint is a folder `NAME.dcp` in which every rank writes
  its shards of the model and optimizer, and rank 0 `train_state.pt` (schedule, scaler, loop
  position, every rank's RNG states, config). It is written beside its final name and renamed
  into place, so a killed save leaves the previous one whole.
- `full_weights`: the whole model's weights gathered on rank 0, for the single-file
  checkpoints (best.pt, and last.pt at the end) that eval, predict and export read.

Nothing read from a checkpoint runs code: DCP's index and non-tensor values are unpickled
with the same allow-list as `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from mmtrain import checkpoint as ckpt
from mmtrain import distributed
from mmtrain.errors import UserError

COMPUTE_DTYPE = {"bf16": torch.bfloat16}


def refuse_unsupported(trainer: Any, world: int, gradcache: bool) -> None:
    """A UserError for a trainer.strategy=fsdp run (`trainer`: the trainer group) mmtrain
    cannot shard as asked, in `world` processes (`gradcache`: a contrastive model that
    accumulates micro-batches with shared negatives)."""
    if trainer.strategy != "fsdp":
        return
    precision, compile = trainer.precision, trainer.compile
    why = None
    if world < 2:
        why = (
            "it shards the model across processes and this run has one; start several with "
            "trainer.nproc_per_node=N (or torchrun --nproc_per_node=N)"
        )
    elif precision == "16":
        why = "fp16 needs a grad scaler that spans the shards; use trainer.precision=bf16"
    elif compile:
        why = "mmtrain compiles whole models, not sharded ones; set trainer.compile=false"
    elif gradcache:
        why = (
            "a contrastive model accumulating micro-batches (shared negatives) calls the "
            "model outside its forward; set trainer.accumulate_grad_batches=1"
        )
    if why:
        raise UserError(
            f"trainer.strategy=fsdp cannot run this config: {why}, or use trainer.strategy=ddp."
        )


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def tower_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of the layer classes that `model`'s transformers models name as their
    units of placement (`_no_split_modules`), innermost first."""
    names = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    return found[::-1]


def shard(model: nn.Module, precision: str) -> list[nn.Module]:
    """Shard `model` in place over this job's processes: each tower layer, then the root
    (the fusion, head and what no layer holds); return the layers. A UserError when it has
    no such layers."""
    layers = tower_layers(model)
    if not layers:
        raise UserError(
            f"trainer.strategy=fsdp: {type(model).__name__} has no tower layers to shard (none of "
            "its modules is a transformers layer class); use trainer.strategy=ddp."
        )
    dtype = COMPUTE_DTYPE.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    # FSDP shards tensors of one dimension or more: a scalar (CLIP's temperature) stays whole
    # on every rank, its gradient averaged over the ranks as DDP would.
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_averaged)
    for layer in layers:
        fully_shard(layer, mp_policy=policy, ignored_params=scalars)
    fully_shard(model, mp_policy=policy, ignored_params=scalars)
    # FSDP takes the first module to run forward as its root; zero-shot prompts reach the
    # text tower's layers before any forward of the whole model, so the root is set now.
    model._get_fsdp_state()._lazy_init()
    return layers


def _averaged(param: nn.Parameter) -> None:
    """Average `param`'s gradient over the ranks (linear: a gradient accumulated over
    micro-batches, each averaged in turn, is the average of the sums)."""
    dist.all_reduce(param.grad)
    param.grad.div_(distributed.world_size())


def grad_norm(params: list[nn.Parameter], clip: float | None) -> torch.Tensor:
    """The total norm of a sharded model's gradients (shards and whole scalars alike), and
    the gradients clipped to `clip` if set, as `clip_grad_norm_` does unsharded."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    norms = [torch.nn.utils.get_total_norm(sharded).full_tensor()] if sharded else []
    norms += [torch.nn.utils.get_total_norm(whole)] if whole else []
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)
    if clip:
        torch.nn.utils.clip_grads_with_norm_(params, clip, total)
    return total


@contextmanager
def root_gathered(model: nn.Module) -> Iterator[None]:
    """The root's own parameters whole for the duration, for a call of one of its methods
    other than forward (zero-shot prompts embedded by `embed_texts`); a no-op unsharded."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0, on the CPU (the same keys as an unsharded
    model's); empty on the other ranks. Every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def save(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rest: dict[str, Any]
) -> None:
    """Write the sharded checkpoint folder `path`: every rank its shards, rank 0 `rest` (a
    `ckpt.snapshot` without model and optimizer) and every rank's RNG states. Every rank
    must call it."""
    main = distributed.is_main()
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    # Before the first step the optimizer has no state, and asking DCP for it would make one
    # by a step at rate 0 (AdamW would count that step): the weights alone then.
    fresh = not optimizer.state
    if fresh:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    rngs: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(rngs, ckpt.rng_state())
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp))
        if main:
            kept = {**rest, "model": {}, "optimizer": {}, "rngs": rngs, "format": ckpt.SHARDED}
            ckpt.save_atomic({**kept, "optimizer_fresh": fresh}, tmp / ckpt.STATE_FILE)
            # A kill between the two renames leaves `old`, which the next run puts back
            # (ckpt.remove_stale_temporaries).
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
    except (OSError, dcp.api.CheckpointException) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else repr(error)
        raise UserError(
            f"Could not write the checkpoint {path} ({reason}). The checkpoints written before "
            "are intact; fix the cause (disk space, permissions) and resume with trainer.resume=auto."
        ) from None


def restore(
    saved: dict[str, Any], model: nn.Module, optimizer, scheduler, scaler, path: Path
) -> None:
    """Load the sharded checkpoint `path` (whose train_state.pt `saved` holds) into the
    sharded `model` and its optimizer, then the rest as `ckpt.restore` does, with this
    rank's own RNG states. Every rank must call it."""
    fresh = saved.get("optimizer_fresh", False)
    if fresh:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, storage_reader=_SafeReader(path), planner=_SafePlanner())
    except (OSError, dcp.api.CheckpointException, RuntimeError, pickle.UnpicklingError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else repr(error)
        raise UserError(
            f"The sharded checkpoint {path} could not be read into this run ({reason}): it is "
            "damaged, or was written by a run of another model."
        ) from None
    if fresh:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )
    rngs, rank = saved.get("rngs") or [], distributed.rank()
    own = {**saved, "rng": rngs[rank] if len(rngs) == distributed.world_size() else saved["rng"]}
    ckpt.restore(own, None, None, scheduler, scaler, path)


# What DCP's index (.metadata) is made of: its own records, and the torch and pathlib types in
# them (torch dtypes are allowed by name below).
INDEX_TYPES = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "ChunkStorageMetadata",
            "TensorStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}  # fmt: skip


class _Restricted(pickle.Unpickler):
    """Unpickles DCP's index, refusing every other global (no crafted index runs code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in INDEX_TYPES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


def read_index(path: Path) -> Any:
    """The index (.metadata) of the DCP folder `path`; pickle.UnpicklingError for anything
    in it but DCP's records."""
    with open(Path(path) / ".metadata", "rb") as handle:
        return _Restricted(handle).load()


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        metadata = read_index(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(dcp.DefaultLoadPlanner):
    """DCP's planner, reading a non-tensor value (the optimizer's settings) only once
    `torch.load(weights_only=True)` has found nothing but tensors and plain values in it."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        torch.load(value, weights_only=True)  # refuses anything but tensors and plain values
        value.seek(0)
        super().load_bytes(read_item, value)
