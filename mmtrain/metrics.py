"""Streaming validation metrics, updated batch by batch and computed once per evaluation.

Each class names what `compute` returns in `NAMES`, readable without building it: torchmetrics
(a second to import) is imported when the first evaluation builds one.
"""

from __future__ import annotations

import torch

from mmtrain import distributed


class ClassificationMetrics:
    """Loss, accuracy, F1 and AUROC of a classifier (binary F1/AUROC for two classes,
    macro averages otherwise)."""

    NAMES = ("loss", "accuracy", "f1", "auroc")

    def __init__(self, num_classes: int, device: torch.device):
        from torchmetrics import MeanMetric, MetricCollection
        from torchmetrics.classification import (
            BinaryAccuracy,
            BinaryAUROC,
            BinaryF1Score,
            MulticlassAccuracy,
            MulticlassAUROC,
            MulticlassF1Score,
        )

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


class RetrievalMetrics:
    """Recall@1 and @5, image-to-text and text-to-image, over a whole split.

    Each update keeps the normalised embeddings of the batch's genuine pairs (O(N x D)
    memory); compute scores all N x N pairs once. A retrieved text counts as a hit when it
    is the same text (same token ids) as the image's own, so duplicate captions are not
    counted as misses.
    """

    KS = (1, 5)
    NAMES = ("loss", *(f"recall@{k}_{way}" for k in KS for way in ("i2t", "t2i")))

    def __init__(self, device: torch.device):
        from torchmetrics import MeanMetric

        self.images: list[torch.Tensor] = []
        self.texts: list[torch.Tensor] = []
        self.keys: list[tuple[int, ...]] = []
        self.loss = MeanMetric().to(device)

    @torch.no_grad()
    def update(self, output: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        """Add one batch: `output` has `loss`, `image_embeds`, `text_embeds`."""
        keep = batch["paired"].bool() if "paired" in batch else slice(None)
        self.images.append(output["image_embeds"][keep].float())
        self.texts.append(output["text_embeds"][keep].float())
        for ids, mask in zip(
            batch["input_ids"][keep].tolist(), batch["attention_mask"][keep].tolist(), strict=True
        ):
            self.keys.append(tuple(i for i, m in zip(ids, mask, strict=True) if m))
        self.loss.update(
            output["loss"].detach().float(), weight=int(batch["input_ids"][keep].shape[0])
        )

    def compute(self) -> dict[str, float]:
        """recall@k_i2t, recall@k_t2i for k in 1, 5, and the loss."""
        images, texts, keys = torch.cat(self.images), torch.cat(self.texts), self.keys
        if distributed.world_size() > 1:  # every rank scores the whole split
            device = images.device
            images = torch.cat(distributed.gather_objects([images.cpu()])).to(device)
            texts = torch.cat(distributed.gather_objects([texts.cpu()])).to(device)
            keys = distributed.gather_objects(keys)
        index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
        groups = torch.tensor([index[key] for key in keys], device=images.device)
        similarity = images @ texts.T  # [N images, N texts]
        same = groups[:, None] == groups[None, :]
        values = {"loss": float(self.loss.compute())}
        for k in self.KS:
            k_eff = min(k, len(groups))
            top_texts = similarity.topk(k_eff, dim=1).indices  # per image
            top_images = similarity.topk(k_eff, dim=0).indices.T  # per text
            values[f"recall@{k}_i2t"] = float(same.gather(1, top_texts).any(1).float().mean())
            values[f"recall@{k}_t2i"] = float(same.gather(1, top_images).any(1).float().mean())
        return values
