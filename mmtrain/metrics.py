"""Streaming validation metrics, updated batch by batch and computed once per evaluation."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
)


class ClassificationMetrics:
    """Loss, accuracy, F1 and AUROC of a classifier (binary F1/AUROC for two classes,
    macro averages otherwise)."""

    def __init__(self, num_classes: int, device: torch.device):
        if num_classes == 2:
            metrics = {"accuracy": BinaryAccuracy(), "f1": BinaryF1Score(), "auroc": BinaryAUROC()}
        else:
            metrics = {
                "accuracy": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
                "auroc": MulticlassAUROC(num_classes, average="macro"),
            }
        self.binary = num_classes == 2
        self.scores = MetricCollection(metrics).to(device)
        self.loss = MeanMetric().to(device)

    @torch.no_grad()
    def update(self, output: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        """Add one batch: `output` has `loss` and `logits`, `batch` has `labels`."""
        probs = output["logits"].float().softmax(-1)
        self.scores.update(probs[:, 1] if self.binary else probs, batch["labels"])
        self.loss.update(output["loss"].detach().float(), weight=len(batch["labels"]))

    def compute(self) -> dict[str, float]:
        """Every metric over all batches since construction, as plain floats."""
        values = {name: float(value) for name, value in self.scores.compute().items()}
        return {"loss": float(self.loss.compute()), **values}
