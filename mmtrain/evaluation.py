"""One evaluation pass: a model's validation metrics over every batch of a split (the
loop's validation, `mmtrain eval`)."""

from __future__ import annotations

from typing import Any

import torch

from mmtrain import distributed, sharding
from mmtrain.errors import UserError
from mmtrain.guard import StopSignal
from mmtrain.models.interface import Metrics, Model
from mmtrain.models.zeroshot import ZeroShotTask


def fresh_metrics(model: Model, device: torch.device, zeroshot: ZeroShotTask | None) -> Metrics:
    """A fresh set of `model`'s validation metrics; with zero-shot classification, its
    classes embedded by the model as it is now (prompts are re-embedded every time)."""
    if zeroshot is None:
        return model.metrics(device)
    with sharding.root_gathered(model):  # embed_texts is not its forward
        classes = zeroshot.classes(model, device)
    return model.metrics(device, zeroshot=classes)


def reference_metrics(
    model: Model,
    references: list[tuple[str, Any, ZeroShotTask]],
    device: torch.device,
    autocast: Any,
    stop: StopSignal | None = None,
) -> dict[str, float] | None:
    """Zero-shot accuracy of `model` on each reference set ((name, batches, task): other
    labelled data than the run's, zeroshot.reference), as `val/reference/NAME/zeroshot_top1`
    and, with more than 5 classes, `.../zeroshot_top5`; None when a `stop` signal abandoned
    the pass."""
    found: dict[str, float] = {}
    for name, batches, task in references:
        scores = evaluate(
            model, fresh_metrics(model, device, task), batches, device, autocast, stop
        )
        if scores is None:
            return None
        kept = (
            ("zeroshot_top1", "zeroshot_top5") if len(task.class_names) > 5 else ("zeroshot_top1",)
        )
        found |= {f"val/reference/{name}/{k}": scores[f"val/{k}"] for k in kept}
    return found


def evaluate(
    model: Model,
    metrics: Metrics,
    batches: Any,
    device: torch.device,
    autocast: Any,
    stop: StopSignal | None = None,
) -> dict[str, float] | None:
    """Validation metrics (`val/...`) of `model` over every batch of `batches` (synced over
    ranks by the metrics object); None when a `stop` signal abandoned the pass on any rank."""
    model.eval()
    try:
        with torch.no_grad():
            for batch in _batches(model, batches, device, stop):
                repeated = batch.pop(REPEATED, False)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast():
                    output = model(**batch)
                if not repeated:
                    metrics.update(output, batch)
    finally:
        model.train()
    if stop is not None and stop.everywhere(device):
        return None
    return {f"val/{name}": value for name, value in metrics.compute().items()}


REPEATED = "_repeated"  # a batch run again only to keep a sharded model's ranks in step


def _batches(model: Model, batches: Any, device: torch.device, stop: StopSignal | None) -> Any:
    """The batches to evaluate, until a `stop` signal. Ranks may hold one batch more or less
    and see a signal at different batches. A sharded model's forward is a collective: there
    the ranks agree before each batch whether any was stopped or still has one, and a rank
    that ran out runs its last batch again (marked REPEATED: not scored)."""
    stopped = lambda: stop is not None and bool(stop.received)  # noqa: E731
    if not sharding.is_sharded(model):
        # Checked before the batches' iterator starts its worker processes, too.
        for batch in [] if stopped() else batches:
            if stopped():  # checked on this rank alone
                return
            yield batch
        return
    mine, last = iter(batches), None
    while True:
        batch = None if stopped() else next(mine, None)
        if distributed.any_rank(stopped(), device):
            return
        if not distributed.any_rank(batch is not None, device):
            return
        if batch is None and last is None:
            raise UserError(
                "The validation split has fewer rows than processes; fsdp needs one each."
            )
        yield batch if batch is not None else {**last, REPEATED: True}
        last = batch if batch is not None else last
