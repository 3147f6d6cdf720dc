"""From a cached whole image to the model's input, at load time (in the loader workers).

The cache keeps each image whole: squeezed to an L x L array (L = the model's size times
data.cache_scale, timm's crop_pct idea) with its true width/height ratio beside it. Any box
of the original picture is a box of that array, so evaluation cuts the processor's centre
square and training's random_resized_crop samples from the whole picture, both resized
(bicubic, antialiased) to the model's size.
"""

from __future__ import annotations

import math
import random

import torch
from torch.nn import functional as F

Box = tuple[float, float, float, float]  # x, y, width, height in fractions of the picture


def centre_square(aspect: float) -> Box:
    """The processor's crop: the centre square of a picture of width/height `aspect`."""
    if aspect >= 1:
        width = 1 / aspect
        return (1 - width) / 2, 0.0, width, 1.0
    height = aspect
    return 0.0, (1 - height) / 2, 1.0, height


def random_box(
    aspect: float, rng: random.Random, scale: tuple[float, float], ratio: tuple[float, float]
) -> Box:
    """torchvision's RandomResizedCrop box: `scale` of the picture's area, width/height in
    `ratio` (in the picture's own pixels); the centre square after ten misses."""
    for _ in range(10):
        area = rng.uniform(*scale)
        box_ratio = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        width, height = math.sqrt(area * box_ratio / aspect), math.sqrt(area * aspect / box_ratio)
        if width <= 1 and height <= 1:
            return rng.uniform(0, 1 - width), rng.uniform(0, 1 - height), width, height
    return centre_square(aspect)


def crop(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """uint8 [3, size, size]: the `box` of a cached uint8 [3, L, L] image, resized."""
    side = image.shape[-1]
    x, y, width, height = box
    left, top = round(x * side), round(y * side)
    right = max(left + 1, min(side, round((x + width) * side)))
    bottom = max(top + 1, min(side, round((y + height) * side)))
    region = image[:, top:bottom, left:right]
    if region.shape[-2:] == (size, size):
        return region.contiguous()
    resized = F.interpolate(
        region[None].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return resized[0].clamp(0, 255).round().to(torch.uint8)
