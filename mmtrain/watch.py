"""A hint, once, when a classifier's validation stays at chance for a share of its budget.

Chance is what a model that learned nothing scores: accuracy equal to the validation
split's majority-class share, AUROC 0.5. A run counts as at chance while every validation
so far is within `ACCURACY_MARGIN` of the first and `AUROC_MARGIN` of the second; once
`SHARE` of the run's optimizer steps have passed that way, the log says so with what to
try. Nothing stops: a slow start can still learn.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("mmtrain")
ACCURACY_MARGIN = 0.02
AUROC_MARGIN = 0.05
SHARE = 0.3


class ChanceWatch:
    """Follows validation metrics of one run; `update` logs the hint at most once."""

    def __init__(self, val_labels: torch.Tensor, max_steps: int):
        counts = torch.bincount(val_labels) if len(val_labels) else torch.ones(1)
        self.chance = float(counts.max()) / max(len(val_labels), 1)
        self.max_steps = max_steps
        self.learning = False  # some validation was above chance
        self.told = False

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Take one validation's metrics at optimizer step `step`; True when the hint is
        logged by this call."""
        accuracy, auroc = metrics.get("val/accuracy"), metrics.get("val/auroc", 0.5)
        if accuracy is None or self.told:
            return False
        above = accuracy > self.chance + ACCURACY_MARGIN or auroc > 0.5 + AUROC_MARGIN
        self.learning = self.learning or above
        if self.learning or step < SHARE * self.max_steps:
            return False
        self.told = True
        log.warning(
            "not learning yet: after %d of %d steps, validation is still at chance (accuracy "
            "within %.2f of %.3f, the majority class's share; AUROC within %.2f of 0.5). Try: "
            "a pretrained backbone (model.backbone=NAME_OR_DIR), a longer budget "
            "(trainer.min_steps=%d or trainer.max_epochs=N), another fusion (model.fusion=concat), "
            "or a lower optimizer.lr.",
            step, self.max_steps, ACCURACY_MARGIN, self.chance, AUROC_MARGIN, 2 * self.max_steps,
        )  # fmt: skip
        return True
