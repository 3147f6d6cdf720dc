"""What a data source returns: per split, images as uint8 tensors, texts and labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SplitData:
    """One split, decoded: `images` is uint8 [N, 3, H, W] at the model's resolution.

    `paired[i]` is True when text i genuinely describes image i (every row of a manifest of
    real pairs; only the matching rows of `shapes`).
    """

    images: torch.Tensor
    texts: list[str]
    labels: torch.Tensor
    class_names: list[str]
    paired: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.paired is None:
            self.paired = torch.ones(len(self.texts), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.texts)
