"""Training-time augmentation: registered image and text components under `data.augment`.

    data.augment: {flip: {p: 0.5}, word_dropout: {p: 0.1}}

An image augmentation is `fn(images, generator, p, ...) -> images`: a float batch
[B, 3, H, W] with values in 0..255 on the training device, and a torch.Generator on that
device. A text augmentation is `fn(text, rng, p, ...) -> str` with a `random.Random`. `p`
is the probability an augmentation acts (per image; per word or character for text);
`p: 0` switches it off. They run in the order of the config, on the training split only.

Randomness never comes from a global or DataLoader-worker RNG. Image augmentations draw
from a generator seeded by (trainer.seed, key, name), where the loop's key is the batch's
place in the run: (optimizer step, micro-batch within the step, rank), so no two batches of
a run draw the same noise. Text ones draw from a Random seeded by (trainer.seed, epoch, row
index, name). Runs are reproducible, whatever data.num_workers, and a resumed run augments
exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import random
import string
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
from torch.nn import functional as F

from mmtrain import registry, rules
from mmtrain.errors import UserError
from mmtrain.registry import register
from mmtrain.rules import Bounds

IMAGE, TEXT = "image_augment", "text_augment"
# What the pipeline passes besides the config keys: the batch's images and a generator (and,
# to an image augmentation that takes them, whole pictures' `aspects` and the output `size`),
# or a text and a Random.
RUNTIME = {IMAGE: ("images", "generator", "aspects", "size"), TEXT: ("text", "rng")}
# Every augmentation's `p`: how often it acts; 0 switches it off.
Probability = Annotated[float, Bounds(ge=0, le=1)]


def _seed(*parts: Any) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _chosen(images: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """A [B, 1, 1, 1] mask: which images of the batch an augmentation changes."""
    draw = torch.rand(len(images), generator=generator, device=images.device)
    return (draw < p).view(-1, 1, 1, 1)


def _uniform(
    images: torch.Tensor, generator: torch.Generator, low: float, high: float
) -> torch.Tensor:
    draw = torch.rand(len(images), generator=generator, device=images.device)
    return (low + (high - low) * draw).view(-1, 1, 1, 1)


@register(IMAGE, "flip")
def flip(images: torch.Tensor, generator: torch.Generator, p: Probability = 0.5) -> torch.Tensor:
    """Mirror images left to right."""
    return torch.where(_chosen(images, generator, p), images.flip(-1), images)


@register(IMAGE, "random_resized_crop")
def random_resized_crop(
    images: torch.Tensor,
    generator: torch.Generator,
    p: Probability = 1.0,
    scale: Annotated[tuple[float, float], Bounds(gt=0, le=1)] = (0.9, 1.0),
    ratio: Annotated[tuple[float, float], Bounds(gt=0)] = (3 / 4, 4 / 3),
    aspects: torch.Tensor | None = None,
    size: int | None = None,
) -> torch.Tensor:
    """Cut a random box (`scale`: its share of the picture's area, `ratio`: its width/height)
    and resize it to the model's input, a different box per image (open_clip's training
    crop by default: 90-100% of the picture).

    The images are the model's input as they are, or with `aspects` (width/height of each)
    whole pictures squeezed into squares, as a decoded-image cache keeps them: the box is
    then drawn in each picture's own proportions, anywhere in it, and the output is `size`
    square; an image the crop passes over (`p`) gets the processor's centre square."""
    (low, high), (ratio_low, ratio_high) = scale, ratio
    area = _uniform(images, generator, low, high).flatten()
    aspect = torch.exp(
        _uniform(images, generator, math.log(ratio_low), math.log(ratio_high)).flatten()
    )
    if aspects is None:
        width = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the image's sides
        height = (area / aspect).sqrt().clamp(max=1.0)
    else:  # in the picture's own pixels: its width is aspects x its height
        picture = aspects.to(images.device, images.dtype)
        width = (area * aspect / picture).sqrt().clamp(max=1.0)
        height = (area * picture / aspect).sqrt().clamp(max=1.0)
    # Box centres in the [-1, 1] coordinates of affine_grid, keeping the box inside.
    centre_x = (1 - width) * _uniform(images, generator, -1, 1).flatten()
    centre_y = (1 - height) * _uniform(images, generator, -1, 1).flatten()
    chosen = _chosen(images, generator, p)
    if aspects is not None:  # the others: the centre square of their picture
        keep = chosen.flatten()
        width = torch.where(keep, width, (1 / picture).clamp(max=1.0))
        height = torch.where(keep, height, picture.clamp(max=1.0))
        centre_x, centre_y = centre_x * keep, centre_y * keep
    theta = torch.zeros(len(images), 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    side = size or images.shape[-1]
    grid = F.affine_grid(theta, [len(images), 3, side, side], align_corners=False)
    cropped = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return cropped if aspects is not None else torch.where(chosen, cropped, images)


# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@register(IMAGE, "color_jitter")
def color_jitter(
    images: torch.Tensor,
    generator: torch.Generator,
    p: Probability = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.05,
) -> torch.Tensor:
    """Scale brightness, contrast and saturation by random factors in [1 - x, 1 + x] and
    turn the hue by up to `hue` of a full turn, with different factors per image."""
    # Imported here: torchvision's import costs a second that only this function needs.
    from torchvision.transforms.v2 import functional as TF

    out = images
    factor = _uniform(images, generator, 1 - brightness, 1 + brightness)
    out = (out * factor).clamp(0, 255)
    factor = _uniform(images, generator, 1 - contrast, 1 + contrast)
    mean = TF.rgb_to_grayscale(out).mean(dim=(-3, -2, -1), keepdim=True)
    out = (out * factor + mean * (1 - factor)).clamp(0, 255)
    factor = _uniform(images, generator, 1 - saturation, 1 + saturation)
    out = (out * factor + TF.rgb_to_grayscale(out) * (1 - factor)).clamp(0, 255)
    angle = 2 * math.pi * _uniform(images, generator, -hue, hue).flatten()
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(len(images), 3, 3, device=images.device, dtype=images.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
    yiq = _YIQ.to(images.device, images.dtype)
    matrix = torch.linalg.inv(yiq) @ rotation @ yiq
    out = torch.einsum("bij,bjhw->bihw", matrix, out).clamp(0, 255)
    return torch.where(_chosen(images, generator, p), out, images)


@register(IMAGE, "gaussian_noise")
def gaussian_noise(
    images: torch.Tensor, generator: torch.Generator, p: Probability = 0.5, std: float = 0.05
) -> torch.Tensor:
    """Add pixel noise with standard deviation `std` (a fraction of the 0..255 range)."""
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    noisy = (images + noise * (std * 255)).clamp(0, 255)
    return torch.where(_chosen(images, generator, p), noisy, images)


@register(TEXT, "word_dropout")
def word_dropout(text: str, rng: random.Random, p: Probability = 0.1) -> str:
    """Drop each word with probability `p` (at least one word stays)."""
    words = text.split()
    kept = [word for word in words if rng.random() >= p]
    return " ".join(kept) if kept else rng.choice(words)


@register(TEXT, "word_swap")
def word_swap(text: str, rng: random.Random, p: Probability = 0.1) -> str:
    """Swap each word with its right neighbour with probability `p`."""
    words = text.split()
    for i in range(len(words) - 1):
        if rng.random() < p:
            words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


@register(TEXT, "char_noise")
def char_noise(text: str, rng: random.Random, p: Probability = 0.05) -> str:
    """Typos: each character is, with probability `p`, deleted, replaced by a random letter,
    followed by an inserted random letter, or swapped with the next one."""
    chars, out, i = list(text), [], 0
    while i < len(chars):
        char = chars[i]
        if char.isspace() or rng.random() >= p:
            out.append(char)
        else:
            edit = rng.randrange(4)
            if edit == 1:
                out.append(rng.choice(string.ascii_lowercase))
            elif edit == 2:
                out += [char, rng.choice(string.ascii_lowercase)]
            elif edit == 3 and i + 1 < len(chars):
                out += [chars[i + 1], char]
                i += 1
        i += 1
    return "".join(out) if "".join(out).strip() else text


Entry = tuple[str, Callable[..., Any], dict[str, Any]]


def parse(augment: Mapping[str, Any] | None) -> dict[str, list[Entry]]:
    """The switched-on augmentations of a `data.augment` mapping, per kind, in config order;
    unknown names, unknown keys and values that break their rules are UserErrors."""
    entries: dict[str, list[Entry]] = {IMAGE: [], TEXT: []}
    for name, options in (augment or {}).items():
        if name in registry.names(IMAGE):
            kind = IMAGE
        elif name in registry.names(TEXT):
            kind = TEXT
        else:
            known = registry.names(IMAGE) + registry.names(TEXT)
            raise UserError(
                f"Unknown augmentation data.augment.{name}; registered: {', '.join(known)}. "
                "A new one is a function registered with @register('image_augment', NAME) "
                "or @register('text_augment', NAME) plus its entry under data.augment."
            )
        if options is not None and not isinstance(options, Mapping):
            raise UserError(
                f"data.augment.{name} must be a mapping of options such as {{p: 0.5}} "
                f"(got {options!r}); e.g. data.augment.{name}.p=0.5."
            )
        options = dict(options or {})
        takes = registry.accepted(kind, name, dict.fromkeys(RUNTIME[kind]))
        registry.check(kind, {"name": name, **options}, runtime=takes)
        fn = registry.get(kind, name)
        default = inspect.signature(fn).parameters.get("p")
        p = options.get("p", default.default if default is not None else 1.0)
        try:  # the rule of every augmentation's p, also where its function declares none
            p = rules.conform(p, Probability)
        except rules.Mismatch as wanted:
            raise UserError(f"data.augment.{name}.p must be {wanted} (got {p!r}).") from None
        if p > 0:
            entries[kind].append((name, fn, options))
    return entries


class ImageAugment:
    """`(batch, key) -> batch` on the training device; deterministic in (seed, key). The loop's
    key is (step, micro-batch, rank). A batch of whole pictures (with `aspects`, see
    `random_resized_crop`) leaves as the model's `size` x `size` input."""

    def __init__(self, entries: list[Entry], seed: int, size: int | None = None):
        self.entries, self.seed, self.size = entries, seed, size
        # The pipeline's extras each entry takes: whole pictures' aspects, the output size.
        self.extras = [
            tuple(registry.accepted(IMAGE, name, dict.fromkeys(("aspects", "size"))))
            for name, _, _ in entries
        ]

    @property
    def cuts_whole_pictures(self) -> bool:
        """Whether an entry cuts whole pictures to the model's input (the loader then hands
        them over uncut, with their aspects)."""
        return any("aspects" in extra for extra in self.extras)

    def __call__(self, batch: dict[str, torch.Tensor], key: Any) -> dict[str, torch.Tensor]:
        if not self.entries:
            return batch
        batch = dict(batch)
        images, aspects = batch.pop("images").float(), batch.pop("aspects", None)
        for (name, fn, options), extra in zip(self.entries, self.extras, strict=True):
            generator = torch.Generator(device=images.device)
            generator.manual_seed(_seed(self.seed, key, name))
            given = {"aspects": aspects, "size": self.size}
            images = fn(images, generator, **options, **{k: given[k] for k in extra})
            if "aspects" in extra:
                aspects = None  # cut to the model's input from here on
        return {**batch, "images": images}


class TextAugment:
    """`(text, epoch, index) -> text`; deterministic in (seed, epoch, index)."""

    def __init__(self, entries: list[Entry], seed: int):
        self.entries, self.seed = entries, seed

    def __call__(self, text: str, epoch: int, index: int) -> str:
        for name, fn, options in self.entries:
            text = fn(text, random.Random(f"{self.seed}:{epoch}:{index}:{name}"), **options)
        return text
