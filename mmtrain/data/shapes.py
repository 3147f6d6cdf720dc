"""`shapes`: a synthetic image-text matching set, generated from a seed, with no files.

Each image holds one coloured shape in one quadrant, of varying size, on a noisy grey
background. Half of the captions describe it ("a red circle in the top left"); in the
other half one attribute (colour, shape or position) was swapped for another value, and
the label is 0. Neither modality alone predicts the label: the model must compare them.
"""

from __future__ import annotations

from typing import Annotated, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmtrain.data.source import SplitData
from mmtrain.errors import UserError
from mmtrain.registry import register
from mmtrain.rules import Bounds

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
TEMPLATES = (
    "a {colour} {shape} in the {position}",
    "there is a {colour} {shape} at the {position}",
    "{position}: {colour} {shape}",
)
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill
) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


class Sample(NamedTuple):
    """One pair: what was drawn (`truth`) and what the caption says (`described`)."""

    image: np.ndarray  # H x W x 3, uint8
    caption: str
    label: int  # 1 when described == truth
    truth: dict[str, str]
    described: dict[str, str]


def render_sample(seed: int, split: str, index: int, size: int) -> Sample:
    """Sample `index` of `split`: a pure function of its arguments."""
    rng = np.random.default_rng((seed, SPLIT_CODES[split], index))
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]

    grey = int(rng.integers(60, 140))
    background = rng.normal(grey, 12, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background)
    half = size / 2
    extent = rng.uniform(0.6, 0.9) * half
    left = (half if "right" in position else 0) + rng.uniform(0, half - extent)
    top = (half if "bottom" in position else 0) + rng.uniform(0, half - extent)
    _draw(ImageDraw.Draw(image), shape, (left, top, left + extent, top + extent), COLOURS[colour])

    truth = {"colour": colour, "shape": shape, "position": position}
    attributes = dict(truth)
    label = int(rng.integers(2))
    if label == 0:
        swapped = ("colour", "shape", "position")[rng.integers(3)]
        choices = {"colour": list(COLOURS), "shape": SHAPES, "position": POSITIONS}[swapped]
        others = [value for value in choices if value != attributes[swapped]]
        attributes[swapped] = others[rng.integers(len(others))]
    caption = TEMPLATES[rng.integers(len(TEMPLATES))].format(**attributes)
    return Sample(np.array(image), caption, label, truth, attributes)


def render_split(seed: int, split: str, size: int, image_size: int) -> SplitData:
    """Render `size` samples of `split` at `image_size` pixels."""
    images = torch.empty(size, 3, image_size, image_size, dtype=torch.uint8)
    texts, labels, drawn = [], [], []
    for index in range(size):
        sample = render_sample(seed, split, index, image_size)
        images[index] = torch.from_numpy(sample.image).permute(2, 0, 1)
        texts.append(sample.caption)
        labels.append(sample.label)
        drawn.append(SHAPES.index(sample.truth["shape"]))
    labels = torch.tensor(labels)
    return SplitData(
        images,
        texts,
        labels,
        class_names=["mismatch", "match"],
        paired=labels == 1,
        image_classes=(torch.tensor(drawn), list(SHAPES)),  # zero-shot: which shape is drawn
    )


@register("data", "shapes")
def shapes(
    *,
    image_size: int,
    train_size: Annotated[int, Bounds(ge=1)] = 6000,
    val_size: Annotated[int, Bounds(ge=1)] = 1000,
    test_size: Annotated[int, Bounds(ge=0)] = 1000,
    seed: Annotated[int, Bounds(ge=0)] = 0,
) -> dict[str, SplitData]:
    """The synthetic matching set (`test_size=0`: no test split); `image_size` comes from
    the model's backbone."""
    sizes = {"train": train_size, "val": val_size, "test": test_size}
    if image_size < 16:
        raise UserError(
            f"The shapes set needs images of at least 16 px; the backbone asks for {image_size}."
        )
    return {
        split: render_split(seed, split, size, image_size) for split, size in sizes.items() if size
    }
