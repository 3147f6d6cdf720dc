"""One evaluation pass: a model's validation metrics over every batch of a split (the
loop's validation, `mmtrain eval`)."""

from __future__ import annotations

from typing import Any

import torch

from mmtrain.guard import StopSignal
from mmtrain.models.interface import Metrics, Model
from mmtrain.models.zeroshot import ZeroShotTask


def fresh_metrics(model: Model, device: torch.device, zeroshot: ZeroShotTask | None) -> Metrics:
    """A fresh set of `model`'s validation metrics; with zero-shot classification, its
    classes embedded by the model as it is now (prompts are re-embedded every time)."""
    if zeroshot is None:
        return model.metrics(device)
    return model.metrics(device, zeroshot=zeroshot.classes(model, device))


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
            # Checked before the batches' iterator starts its worker processes, too.
            for batch in [] if stop is not None and stop.received else batches:
                # Checked on this rank alone: ranks may hold one batch more or less.
                if stop is not None and stop.received:
                    break
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast():
                    metrics.update(model(**batch), batch)
    finally:
        model.train()
    if stop is not None and stop.everywhere(device):
        return None
    return {f"val/{name}": value for name, value in metrics.compute().items()}
