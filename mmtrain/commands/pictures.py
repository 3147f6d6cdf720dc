"""The pictures `mmtrain eval` writes beside its JSON: confusion matrices and a retrieval
gallery (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from mmtrain.runlog import save_figure

MAX_ANNOTATED = 25  # classes up to which each cell shows its count


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion: torch.Tensor, names: list[str], path: Path, title: str) -> Path:
    """A confusion matrix: rows the true class, columns the predicted one, coloured by the
    share of the row (so rare classes read as well as common ones), counts in the cells."""
    plt = _pyplot()
    counts = confusion.cpu().long()
    shares = counts.double() / counts.sum(1, keepdim=True).clamp_min(1)
    size = min(4 + 0.45 * len(names), 24)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    image = axes.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    ticks = range(len(names))
    axes.set_xticks(ticks, names, rotation=90 if len(names) > 6 else 0)
    axes.set_yticks(ticks, names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(names) <= MAX_ANNOTATED:
        for i in ticks:
            for j in ticks:
                colour = "white" if shares[i, j] > 0.5 else "black"
                axes.text(j, i, int(counts[i, j]), ha="center", va="center", color=colour)
    axes.set_title(title)
    figure.tight_layout()
    save_figure(figure, path)
    return path


def plot_gallery(
    captions: list[str],
    images: torch.Tensor,
    correct: torch.Tensor,
    scores: torch.Tensor,
    path: Path,
    title: str,
) -> Path:
    """One row per caption: the caption, then its top-k images (uint8 `[n, k, 3, H, W]`)
    best first, each with its similarity; the caption's own image framed in green."""
    plt = _pyplot()
    rows, k = images.shape[:2]
    figure, axes = plt.subplots(rows, k + 1, figsize=(2 * (k + 1), 2.1 * rows), squeeze=False)
    for i in range(rows):
        axes[i, 0].axis("off")
        axes[i, 0].text(0, 0.5, _wrap(captions[i]), va="center", ha="left", fontsize=9)
        for j in range(k):
            cell = axes[i, j + 1]
            cell.imshow(images[i, j].permute(1, 2, 0).cpu().numpy())
            cell.set_xticks([])
            cell.set_yticks([])
            own = bool(correct[i, j])
            cell.set_title(
                f"{j + 1}. {float(scores[i, j]):.3f}" + (" ✓" if own else ""), fontsize=9
            )
            for spine in cell.spines.values():
                spine.set_edgecolor("limegreen" if own else "lightgrey")
                spine.set_linewidth(4 if own else 1)
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)
    return path


def _wrap(text: str, width: int = 22) -> str:
    return "\n".join(textwrap.fill(part, width) for part in text.split("\n"))
