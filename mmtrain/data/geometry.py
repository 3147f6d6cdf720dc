"""From a cached whole image to the model's input: the processor's centre square, cut at
load time (in the loader workers).

The cache keeps each image whole: squeezed to an L x L array (L = the model's size times
data.cache_scale, timm's crop_pct idea) with its true width/height ratio beside it. Any box
of the original picture is a box of that array: evaluation (and training without a random
crop) cuts the centre square here, resized (bicubic, antialiased) to the model's size;
training's random_resized_crop cuts its boxes from the whole picture on the device
(`mmtrain.data.augment`).
"""

from __future__ import annotations

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
