"""A hint, once, when a classifier's validation stays at chance for a share of its budget.

Chance is what a model that learned nothing scores: accuracy equal to the validation
split's majority-class share, AUROC 0.5. A run counts as at chance while every validation
so far is within a margin of both: `ACCURACY_MARGIN` and `AUROC_MARGIN`, or three standard
errors of chance on a validation split of this size when that is wider (on 300 rows a
model that learned nothing wanders about 0.03 either way). Once `SHARE` of the run's
optimizer steps have passed that way, the log says so with what to try (for a ViT built
from scratch, first the small-data recipe: a convolutional image tower). Nothing stops: a
slow start can still learn.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger("mmtrain")
ACCURACY_MARGIN = 0.02
AUROC_MARGIN = 0.05
SHARE = 0.3


class ChanceWatch:
    """Follows validation metrics of one run; `update` logs the hint at most once."""

    def __init__(
        self, val_labels: torch.Tensor | None, max_steps: int, from_scratch_vit: bool = False
    ):
        # A streamed validation split's labels are not known before it is read: no hint.
        self.told = val_labels is None
        val_labels = torch.zeros(0, dtype=torch.long) if val_labels is None else val_labels
        n = max(len(val_labels), 1)
        counts = torch.bincount(val_labels) if len(val_labels) else torch.ones(1)
        self.chance = float(counts.max()) / n
        self.accuracy_margin = max(
            ACCURACY_MARGIN, 3 * math.sqrt(self.chance * (1 - self.chance) / n)
        )
        # The spread of a random scorer's AUROC (Hanley and McNeil) between the two classes
        # it is computed over (the largest two).
        top = sorted(counts.tolist())[-2:]
        positives, negatives = (top[0], top[1]) if len(top) == 2 and top[0] else (1, 1)
        spread = math.sqrt((positives + negatives + 1) / (12 * positives * negatives))
        self.auroc_margin = max(AUROC_MARGIN, 3 * spread)
        self.max_steps = max_steps
        self.from_scratch_vit = from_scratch_vit  # a ViT image tower with random weights
        self.learning = False  # some validation was above chance

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Take one validation's metrics at optimizer step `step`; True when the hint is
        logged by this call."""
        accuracy, auroc = metrics.get("val/accuracy"), metrics.get("val/auroc", 0.5)
        if accuracy is None or self.told:
            return False
        above = accuracy > self.chance + self.accuracy_margin or auroc > 0.5 + self.auroc_margin
        self.learning = self.learning or above
        if self.learning or step < SHARE * self.max_steps:
            return False
        self.told = True
        small_data = (
            "experiment=small_data (a from-scratch ViT learns little from a few thousand "
            "pictures; this recipe trains a convolutional image tower), "
            if self.from_scratch_vit
            else ""
        )
        log.warning(
            "not learning yet: after %d of %d steps, validation is still at chance (accuracy "
            "within %.2f of %.3f, the majority class's share; AUROC within %.2f of 0.5). Try: "
            "%sa pretrained backbone (model.backbone=NAME_OR_DIR), a longer budget "
            "(trainer.max_steps=%d or trainer.max_epochs=N), another fusion (model.fusion=concat), "
            "or a lower optimizer.lr.",
            step, self.max_steps, self.accuracy_margin, self.chance, self.auroc_margin,
            small_data, 2 * self.max_steps,
        )  # fmt: skip
        return True
