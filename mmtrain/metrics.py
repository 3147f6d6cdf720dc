"""Streaming validation metrics, updated batch by batch and computed once per evaluation.

Each class names what `compute` returns in `NAMES`, readable without building it: torchmetrics
(a second to import) is imported when the first evaluation builds one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from mmtrain import distributed
from mmtrain.errors import UserError
from mmtrain.retrieval import image_keys, recall_at_k

log = logging.getLogger("mmtrain")

# Label names that read as "the positive class" of a two-class task (any case).
POSITIVE_NAMES = ("match", "1", "true", "yes", "positive")


def positive_class(class_names: list[str], given: str | int | bool | None) -> int | None:
    """The id of the class that binary F1, precision, recall and AUROC score (None for more
    than two classes): `given` (data.positive_label) when set, else the one of the two labels
    that reads as positive (`POSITIVE_NAMES`), else the second. Logs which is in force."""
    shown = ", ".join(class_names[:20]) + (" ..." if len(class_names) > 20 else "")
    if given is not None and len(class_names) != 2:
        raise UserError(
            f"data.positive_label={given} applies to a two-class task, but the data has "
            f"{len(class_names)} classes ({shown}); remove it (with more classes, F1, "
            "precision, recall and AUROC are macro averages over every class)."
        )
    if len(class_names) != 2:
        return None
    if given is not None:
        wanted = str(given).lower() if isinstance(given, bool) else str(given)
        found = [i for i, name in enumerate(class_names) if name == wanted]
        found = found or [i for i, n in enumerate(class_names) if n.lower() == wanted.lower()]
        if len(found) != 1:
            raise UserError(
                f"data.positive_label={given} is not one of the two labels ({shown}); set it "
                "to the label whose F1, precision and recall you want, or remove it to let "
                "mmtrain choose."
            )
        index, why = found[0], "set by data.positive_label"
    else:
        reads = [i for i, name in enumerate(class_names) if name.strip().lower() in POSITIVE_NAMES]
        index = reads[0] if len(reads) == 1 else 1
        why = (
            f"chosen: it reads as positive ({', '.join(POSITIVE_NAMES)})"
            if len(reads) == 1
            else "chosen: the second label, as neither reads as positive"
        )
        why += "; set data.positive_label to choose the other"
    log.info(
        "positive class of val/f1, val/precision, val/recall, val/auroc: %r (%s)",
        class_names[index], why,
    )  # fmt: skip
    return index


class ClassificationMetrics:
    """Loss, accuracy, F1, precision, recall and AUROC of a classifier: for two classes,
    those of the `positive` class (`positive_class`); macro averages otherwise."""

    NAMES = ("loss", "accuracy", "f1", "precision", "recall", "auroc")

    def __init__(self, num_classes: int, device: torch.device, positive: int = 1):
        from torchmetrics import MeanMetric, MetricCollection
        from torchmetrics.classification import (
            BinaryAccuracy,
            BinaryAUROC,
            BinaryF1Score,
            BinaryPrecision,
            BinaryRecall,
            MulticlassAccuracy,
            MulticlassAUROC,
            MulticlassConfusionMatrix,
            MulticlassF1Score,
            MulticlassPrecision,
            MulticlassRecall,
        )

        if num_classes == 2:
            metrics = {
                "accuracy": BinaryAccuracy(),
                "f1": BinaryF1Score(),
                "precision": BinaryPrecision(),
                "recall": BinaryRecall(),
                "auroc": BinaryAUROC(),
            }
        else:
            metrics = {
                "accuracy": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
                "precision": MulticlassPrecision(num_classes, average="macro"),
                "recall": MulticlassRecall(num_classes, average="macro"),
                "auroc": MulticlassAUROC(num_classes, average="macro"),
            }
        self.binary = num_classes == 2
        self.positive = positive
        self.scores = MetricCollection(metrics).to(device)
        # Rows: true class, columns: predicted (argmax); for eval's per-class scores and plot.
        self.confusion = MulticlassConfusionMatrix(num_classes).to(device)
        self.loss = MeanMetric().to(device)

    @torch.no_grad()
    def update(self, output: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        """Add one batch: `output` has `loss` and `logits`, `batch` has `labels`."""
        probs, labels = output["logits"].float().softmax(-1), batch["labels"]
        if self.binary:  # the positive class's probability against "is it the positive class"
            self.scores.update(probs[:, self.positive], (labels == self.positive).long())
        else:
            self.scores.update(probs, labels)
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
    `zeroshot`, also zero-shot top-1 accuracy of every row's image, and top-5 when there are
    more than 5 classes (with 5 or fewer, every image is in its top 5).

    Each update keeps the normalised embeddings of the batch's genuine pairs (O(N x D)
    memory) and a key of each image's pixels; compute scores them in blocks of bounded
    memory (`mmtrain.retrieval.recall_at_k`) by the COCO/Flickr30k protocol: rows with the
    same pixels (the same file, or files with the same content) are one image with several
    captions; image-to-text queries each unique image (a hit: any of its captions),
    text-to-image each caption (a hit: its image). A retrieved text also counts as a hit
    when it is the same text (same token ids) as one of the image's own, so duplicate
    captions are not counted as misses. Under DDP every rank gathers the whole split's
    embeddings as tensors and scores all of it.
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
        self.image_keys: list[torch.Tensor] = []  # [n, 4] per kept pair: equal pixels, equal key
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
        if "images" in batch:
            self.image_keys.append(image_keys(batch["images"][keep]))
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
        if self.image_keys and len(self.image_keys) == len(self.images):
            gathered["image_keys"] = torch.cat(self.image_keys)
        if self.zeroshot is not None:
            gathered["zeroshot_top"] = torch.cat(self.zeroshot_top)
            gathered["zeroshot_labels"] = torch.cat(self.zeroshot_labels)
        # Every rank scores the whole split: gathered as tensors, padded to the longest rank.
        self.gathered = {name: distributed.gather_rows(t) for name, t in gathered.items()}
        groups = torch.unique(self.gathered["tokens"], dim=0, return_inverse=True)[1]
        images = None  # without pixels (embeddings given directly), every row is an image
        if "image_keys" in self.gathered:
            images = torch.unique(self.gathered["image_keys"], dim=0, return_inverse=True)[1]
        values = {"loss": float(self.loss.compute())}
        values |= recall_at_k(
            self.gathered["images"], self.gathered["texts"], groups, self.KS, image_ids=images
        )
        if self.zeroshot is not None:
            top, labels = self.gathered["zeroshot_top"], self.gathered["zeroshot_labels"]
            values["zeroshot_top1"] = float((top[:, 0] == labels).float().mean())
            if len(self.zeroshot.names) > 5:  # with 5 classes or fewer, top-5 is always 1
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
