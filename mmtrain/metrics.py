"""Streaming validation metrics, updated batch by batch and computed once per evaluation.

Each class names what `compute` returns in `NAMES`, readable without building it: torchmetrics
(a second to import) is imported when the first evaluation builds one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from mmtrain import distributed
from mmtrain.retrieval import recall_at_k


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
            MulticlassConfusionMatrix,
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
        # Rows: true class, columns: predicted (argmax); for eval's per-class scores and plot.
        self.confusion = MulticlassConfusionMatrix(num_classes).to(device)
        self.loss = MeanMetric().to(device)

    @torch.no_grad()
    def update(self, output: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        """Add one batch: `output` has `loss` and `logits`, `batch` has `labels`."""
        probs = output["logits"].float().softmax(-1)
        self.scores.update(probs[:, 1] if self.binary else probs, batch["labels"])
        self.confusion.update(probs.argmax(-1), batch["labels"])
        self.loss.update(output["loss"].detach().float(), weight=len(batch["labels"]))

    def compute(self) -> dict[str, float]:
        """Every metric over all batches since construction, as plain floats."""
        values = {name: float(value) for name, value in self.scores.compute().items()}
        return {"loss": float(self.loss.compute()), **values}


@dataclass
class ZeroShotClasses:
    """What zero-shot classification scores against: one normalised text embedding per class
    (the mean over its prompts) and the class of each row's image in the split."""

    weights: torch.Tensor  # [C, D], on the evaluation device
    labels: torch.Tensor  # [rows of the split], class ids (looked up by the batch's `index`)
    names: list[str]  # the class names, in id order


class RetrievalMetrics:
    """Recall@1 and @5, image-to-text and text-to-image, over a whole split; with
    `zeroshot`, also zero-shot top-1/top-5 accuracy of every row's image.

    Each update keeps the normalised embeddings of the batch's genuine pairs (O(N x D)
    memory); compute scores them in blocks of bounded memory (`mmtrain.retrieval`). A
    retrieved text counts as a hit when it is the same text (same token ids) as the image's
    own, so duplicate captions are not counted as misses. Under DDP every rank gathers the
    whole split's embeddings as tensors and scores all of it.
    """

    KS = (1, 5)
    NAMES = ("loss", *(f"recall@{k}_{way}" for k in KS for way in ("i2t", "t2i")))
    ZEROSHOT_NAMES = ("zeroshot_top1", "zeroshot_top5")

    def __init__(self, device: torch.device, zeroshot: ZeroShotClasses | None = None):
        from torchmetrics import MeanMetric

        self.device = device
        self.zeroshot = zeroshot
        self.images: list[torch.Tensor] = []
        self.texts: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []  # token ids, real tokens first, -1 after
        self.rows: list[torch.Tensor] = []  # the split's row of each kept pair
        self.zeroshot_top: list[torch.Tensor] = []  # [n, min(5, C)] predicted classes
        self.zeroshot_labels: list[torch.Tensor] = []
        self.gathered: dict[str, torch.Tensor] = {}  # the whole split's, after compute
        self.loss = MeanMetric().to(device)

    @torch.no_grad()
    def update(self, output: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        """Add one batch: `output` has `loss`, `image_embeds`, `text_embeds`; `batch` has
        `input_ids`, `attention_mask` and (for zero-shot) `index`."""
        keep = batch["paired"].bool() if "paired" in batch else slice(None)
        self.images.append(output["image_embeds"][keep].float())
        self.texts.append(output["text_embeds"][keep].float())
        ids, mask = batch["input_ids"][keep], batch["attention_mask"][keep]
        order = (mask == 0).long().argsort(dim=1, stable=True)  # real tokens first, in order
        real = mask.gather(1, order).bool()
        self.tokens.append(ids.gather(1, order).masked_fill(~real, -1))
        if "index" in batch:
            self.rows.append(batch["index"][keep])
        if self.zeroshot is not None:
            weights = self.zeroshot.weights
            logits = output["image_embeds"].float() @ weights.T
            self.zeroshot_top.append(logits.topk(min(5, len(weights)), dim=1).indices)
            labels = self.zeroshot.labels.to(logits.device)
            self.zeroshot_labels.append(labels[batch["index"].to(logits.device)])
        self.loss.update(output["loss"].detach().float(), weight=int(ids.shape[0]))

    def compute(self) -> dict[str, float]:
        """recall@k_i2t, recall@k_t2i for k in 1, 5, the loss, and with zero-shot classes
        zeroshot_top1 and zeroshot_top5."""
        length = distributed.maximum(max(t.shape[1] for t in self.tokens), self.device)
        tokens = torch.cat([F.pad(t, (0, length - t.shape[1]), value=-1) for t in self.tokens])
        gathered = {
            "images": torch.cat(self.images),
            "texts": torch.cat(self.texts),
            "tokens": tokens,
        }
        if self.rows:
            gathered["rows"] = torch.cat(self.rows)
        if self.zeroshot is not None:
            gathered["zeroshot_top"] = torch.cat(self.zeroshot_top)
            gathered["zeroshot_labels"] = torch.cat(self.zeroshot_labels)
        # Every rank scores the whole split: gathered as tensors, padded to the longest rank.
        self.gathered = {name: distributed.gather_rows(t) for name, t in gathered.items()}
        groups = torch.unique(self.gathered["tokens"], dim=0, return_inverse=True)[1]
        values = {"loss": float(self.loss.compute())}
        values |= recall_at_k(self.gathered["images"], self.gathered["texts"], groups, self.KS)
        if self.zeroshot is not None:
            top, labels = self.gathered["zeroshot_top"], self.gathered["zeroshot_labels"]
            values["zeroshot_top1"] = float((top[:, 0] == labels).float().mean())
            values["zeroshot_top5"] = float((top == labels[:, None]).any(1).float().mean())
        return values


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """[C, C] counts: row = true class, column = predicted class."""
    pairs = labels.long().cpu() * classes + predicted.long().cpu()
    return torch.bincount(pairs, minlength=classes * classes).view(classes, classes)


def per_class_scores(confusion: torch.Tensor, names: list[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class from a confusion matrix (rows: true
    class, columns: predicted); a class never predicted has precision 0."""
    confusion = confusion.double().cpu()
    correct = confusion.diagonal()
    predicted, support = confusion.sum(0), confusion.sum(1)
    precision = torch.where(predicted > 0, correct / predicted.clamp_min(1), 0.0)
    recall = torch.where(support > 0, correct / support.clamp_min(1), 0.0)
    total = precision + recall
    f1 = torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-12), 0.0)
    return {
        name: {
            "precision": round(float(precision[i]), 6),
            "recall": round(float(recall[i]), 6),
            "f1": round(float(f1[i]), 6),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
