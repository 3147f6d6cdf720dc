"""A suite of image-text tasks of different kinds, written as manifests and image files.

Each task renders images of one kind of content, each of which belongs to a class, and
writes the same files a user's data has, so it trains through `data=manifest`:

    TASK/images/{train,val}/NNNNN.png
    TASK/train.csv, TASK/val.csv     matching: image,text,label (1: the caption names what
                                     is shown, 0: it names another class; half and half)
    TASK/pairs_train.csv, ...        contrastive: image,text,label (the true caption, the class)
    TASK/classes.json                class names and the caption of each (zero-shot prompts)

The tasks (none of them is `shapes`, on which the defaults were first chosen):

- `glyphs`: one letter, in one of several font styles, rotated, on a noisy grey ground.
- `colours`: a patch of one colour and one texture (stripes, dots, checks, plain).
- `counting`: one to six small objects; the caption says how many.
- `relations`: two different shapes; the caption says where the first is from the second.
- `scenes`: photo-like landscapes from fractal noise (sea, forest, desert, snow, ...).

Every image is a pure function of (seed, task, split, index): the suite is the same on
every machine. `python benchmarks/recipes.py` trains the default and the fusions on it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mmtrain.errors import UserError

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
RENDER_SIZE = 80  # pixels; the manifest pipeline resizes to the backbone's size


class Drawn(NamedTuple):
    """One rendered image and the class it shows; `caption(name)` names a class."""

    image: Image.Image
    cls: int


class Task(NamedTuple):
    classes: tuple[str, ...]
    templates: tuple[str, ...]  # captions naming a class: "{name}" is replaced
    draw: Callable[[np.random.Generator, int], Drawn]


def _noise(rng: np.random.Generator, size: int, std: float) -> np.ndarray:
    return rng.normal(0.0, std, size=(size, size, 1))


def _finish(image: Image.Image, rng: np.random.Generator, std: float) -> Image.Image:
    """Add pixel noise: no two images of a class are the same."""
    array = np.asarray(image, dtype=np.float32)
    array = array + _noise(rng, array.shape[0], std)
    return Image.fromarray(array.clip(0, 255).astype(np.uint8))


# --- glyphs -------------------------------------------------------------------------------
LETTERS = ("A", "B", "E", "F", "H", "K", "M", "R", "T", "X")


def _draw_glyph(rng: np.random.Generator, size: int) -> Drawn:
    cls = int(rng.integers(len(LETTERS)))
    # Font styles from Pillow's own font (no system fonts): size, stroke (bold), shear (italic).
    font = ImageFont.load_default(size=int(rng.integers(size * 4 // 10, size * 6 // 10)))
    ground, ink = int(rng.integers(90, 170)), int(rng.choice([15, 240]))
    tile = Image.new("L", (size, size), ground)
    draw = ImageDraw.Draw(tile)
    stroke = int(rng.integers(0, 3))
    draw.text(
        (size / 2, size / 2), LETTERS[cls], fill=ink, font=font, anchor="mm",
        stroke_width=stroke, stroke_fill=ink,
    )  # fmt: skip
    shear = float(rng.uniform(-0.3, 0.3))
    tile = tile.transform(
        tile.size, Image.Transform.AFFINE, (1, shear, -shear * size / 2, 0, 1, 0),
        resample=Image.Resampling.BILINEAR, fillcolor=ground,
    )  # fmt: skip
    tile = tile.rotate(float(rng.uniform(-30, 30)), Image.Resampling.BILINEAR, fillcolor=ground)
    shift = rng.integers(-size // 8, size // 8 + 1, size=2)
    tile = tile.transform(
        tile.size, Image.Transform.AFFINE, (1, 0, int(shift[0]), 0, 1, int(shift[1])),
        fillcolor=ground,
    )  # fmt: skip
    return Drawn(_finish(tile.convert("RGB"), rng, 18), cls)


# --- colours and textures -----------------------------------------------------------------
PALETTE = {
    "red": (200, 45, 40),
    "orange": (235, 140, 30),
    "yellow": (230, 215, 50),
    "green": (50, 160, 70),
    "blue": (45, 85, 210),
    "purple": (130, 60, 180),
    "brown": (120, 80, 45),
    "pink": (235, 130, 180),
}
TEXTURES = ("striped", "dotted", "checked", "plain")
PATCHES = tuple(f"{colour} {texture}" for colour in PALETTE for texture in TEXTURES)


def _draw_patch(rng: np.random.Generator, size: int) -> Drawn:
    cls = int(rng.integers(len(PATCHES)))
    colour, texture = PATCHES[cls].split()
    base = np.array(PALETTE[colour], dtype=np.float32) * rng.uniform(0.8, 1.15)
    light = np.clip(base + rng.uniform(60, 110), 0, 255)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(size / 10, size / 5)
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    phase = rng.uniform(0, period, size=2)
    if texture == "striped":
        mask = ((u + phase[0]) % period) < period / 2
    elif texture == "dotted":
        du = (u + phase[0]) % period - period / 2
        dv = (v + phase[1]) % period - period / 2
        mask = du**2 + dv**2 < (period / 4) ** 2
    elif texture == "checked":
        mask = (((u + phase[0]) // (period / 2)) + ((v + phase[1]) // (period / 2))) % 2 == 0
    else:
        mask = np.zeros((size, size), dtype=bool)
    array = np.where(mask[..., None], light, base)
    return Drawn(_finish(Image.fromarray(array.astype(np.uint8)), rng, 12), cls)


# --- counting and relations: small shapes ---------------------------------------------------
NUMBERS = ("one", "two", "three", "four", "five", "six")
SHAPE_KINDS = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")


def _shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def _ground(rng: np.random.Generator, size: int) -> Image.Image:
    grey = rng.normal(int(rng.integers(70, 150)), 10, size=(size, size, 3))
    return Image.fromarray(grey.clip(0, 255).astype(np.uint8))


def _draw_count(rng: np.random.Generator, size: int) -> Drawn:
    cls = int(rng.integers(len(NUMBERS)))
    image = _ground(rng, size)
    draw = ImageDraw.Draw(image)
    cells = rng.permutation(16)[: cls + 1]  # a 4 x 4 grid: objects never overlap
    cell = size / 4
    for c in cells:
        r = cell * rng.uniform(0.22, 0.4)
        cx = (c % 4 + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
        cy = (c // 4 + 0.5) * cell + rng.uniform(-1, 1) * (cell / 2 - r)
        colour = tuple(int(v) for v in rng.integers(160, 256, size=3))
        _shape(draw, SHAPE_KINDS[int(rng.integers(3))], cx, cy, r, colour)
    return Drawn(_finish(image, rng, 8), cls)


RELATION_CLASSES = tuple(
    f"{a} {rel} {b}" for a in SHAPE_KINDS for b in SHAPE_KINDS if a != b for rel in RELATIONS
)


def _draw_relation(rng: np.random.Generator, size: int) -> Drawn:
    cls = int(rng.integers(len(RELATION_CLASSES)))
    name = RELATION_CLASSES[cls]
    first, second = name.split()[0], name.split()[-1]
    relation = name[len(first) + 1 : -len(second) - 1]
    image = _ground(rng, size)
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.1, 0.15)
    along = sorted(rng.uniform(r + 1, size - r - 1, size=2))  # distinct places on one axis
    if along[1] - along[0] < 2 * r + 2:
        along = [r + 1, size - r - 1]
    across = rng.uniform(r + 1, size - r - 1, size=2)
    # The first shape is at along[0] (left / top) for "left of" and "above".
    a_pos, b_pos = (0, 1) if relation in ("left of", "above") else (1, 0)
    points = [None, None]
    for who, pos in ((0, a_pos), (1, b_pos)):
        if relation in ("left of", "right of"):
            points[who] = (along[pos], across[who])
        else:
            points[who] = (across[who], along[pos])
    for who, kind in ((0, first), (1, second)):
        colour = tuple(int(v) for v in rng.integers(150, 256, size=3))
        _shape(draw, kind, *points[who], r, colour)
    return Drawn(_finish(image, rng, 8), cls)


# --- scenes from fractal noise ------------------------------------------------------------
SCENES = {  # sky top, sky bottom, ground near, ground far, ground roughness
    "sea": ((70, 130, 210), (170, 200, 235), (20, 60, 120), (50, 110, 170), 0.3),
    "beach": ((90, 160, 230), (190, 215, 240), (225, 200, 140), (200, 175, 120), 0.4),
    "forest": ((120, 160, 200), (190, 205, 210), (20, 70, 25), (40, 100, 45), 1.0),
    "desert": ((150, 190, 235), (235, 220, 190), (215, 160, 90), (230, 190, 120), 0.5),
    "snow": ((150, 170, 200), (215, 220, 230), (235, 240, 245), (200, 210, 225), 0.4),
    "night": ((5, 8, 30), (25, 30, 70), (10, 12, 20), (20, 22, 35), 0.6),
    "sunset": ((60, 40, 110), (250, 140, 60), (40, 25, 30), (80, 45, 40), 0.6),
    "meadow": ((100, 160, 225), (200, 220, 235), (80, 160, 50), (130, 190, 80), 0.6),
}
SCENE_NAMES = tuple(SCENES)


def _fractal(rng: np.random.Generator, size: int, octaves: int = 4) -> np.ndarray:
    """Value noise: random grids of growing resolution, upsampled and summed; in [0, 1]."""
    total = np.zeros((size, size), dtype=np.float32)
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
        total += np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC)) / 255 / 2**octave
    total -= total.min()
    return total / max(float(total.max()), 1e-6)


def _draw_scene(rng: np.random.Generator, size: int) -> Drawn:
    cls = int(rng.integers(len(SCENE_NAMES)))
    sky_top, sky_low, near, far, rough = SCENES[SCENE_NAMES[cls]]
    shade = rng.uniform(0.8, 1.2)
    y = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    sky = np.array(sky_top) * (1 - y) + np.array(sky_low) * y
    sky = sky + (_fractal(rng, size)[..., None] - 0.5) * 40  # clouds
    horizon = rng.uniform(0.35, 0.65) * size
    edge = horizon + (_fractal(rng, size)[size // 2] - 0.5) * size * 0.3 * rough
    depth = np.clip((np.arange(size)[:, None] - edge[None, :]) / (size - edge[None, :]), 0, 1)
    ground = np.array(far) * (1 - depth[..., None]) + np.array(near) * depth[..., None]
    ground = ground * (1 + (_fractal(rng, size, 5)[..., None] - 0.5) * rough)
    below = np.arange(size)[:, None] >= edge[None, :]
    array = np.where(below[..., None], ground, sky) * shade
    image = Image.fromarray(array.clip(0, 255).astype(np.uint8)).filter(ImageFilter.SMOOTH)
    return Drawn(_finish(image, rng, 6), cls)


TASKS: dict[str, Task] = {
    "glyphs": Task(LETTERS, ("the letter {name}", "a picture of the character {name}", "{name}"), _draw_glyph),
    "colours": Task(PATCHES, ("a {name} patch", "a {name} pattern", "{name}"), _draw_patch),
    "counting": Task(NUMBERS, ("{name} objects", "there are {name} shapes", "a picture of {name} things"), _draw_count),
    "relations": Task(RELATION_CLASSES, ("a {name}", "the {name}", "{name}"), _draw_relation),
    "scenes": Task(SCENE_NAMES, ("a photo of {name}", "a landscape: {name}", "{name} scene"), _draw_scene),
}  # fmt: skip


class Pair(NamedTuple):
    """One row of a task: its image, the true caption and the matching row's caption and label."""

    image: Image.Image
    cls: int
    caption: str  # names the class shown
    matching_text: str  # the true caption or one naming another class
    label: int  # 1 when matching_text names the class shown


def render_pair(
    task: str, seed: int, split: str, index: int, size: int = RENDER_SIZE, noise: float = 0.0
) -> Pair:
    """Row `index` of `split` of `task`: a pure function of its arguments. `noise` > 0 adds
    pixel noise of that standard deviation (0-255 scale) on top, from a generator of its own
    (the same rows, captions and labels as without it: a shifted copy of the task)."""
    spec = TASKS[task]
    rng = np.random.default_rng((seed, list(TASKS).index(task), SPLIT_CODES[split], index))
    drawn = spec.draw(rng, size)
    if noise > 0:
        extra = np.random.default_rng((seed, list(TASKS).index(task), SPLIT_CODES[split], index, 1))
        drawn = Drawn(_finish(drawn.image, extra, noise), drawn.cls)
    template = spec.templates[int(rng.integers(len(spec.templates)))]
    label = int(rng.integers(2))
    named = drawn.cls
    if label == 0:
        named = (drawn.cls + 1 + int(rng.integers(len(spec.classes) - 1))) % len(spec.classes)
    return Pair(
        drawn.image,
        drawn.cls,
        template.format(name=spec.classes[drawn.cls]),
        template.format(name=spec.classes[named]),
        label,
    )


def write_task(
    task: str,
    out_dir: Path | str,
    train_size: int,
    val_size: int,
    seed: int = 0,
    noise: float = 0.0,
) -> Path:
    """Write `task`'s images and manifests under `out_dir/task`; return that folder.
    `noise` > 0 adds pixel noise of that standard deviation to every image (`render_pair`).

    An existing folder written with the same arguments is reused as it is.
    """
    if task not in TASKS:
        raise UserError(f"Unknown suite task {task!r}; choose one of: {', '.join(TASKS)}.")
    if train_size < 2 or val_size < 2:
        raise UserError(
            f"A suite task needs at least 2 training and 2 validation pairs "
            f"(got {train_size} and {val_size})."
        )
    folder = Path(out_dir) / task
    stamp = {"task": task, "train": train_size, "val": val_size, "seed": seed}
    if noise > 0:
        stamp["noise"] = noise
    done = folder / "suite.json"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return folder
    spec = TASKS[task]
    for split, size in (("train", train_size), ("val", val_size)):
        images = folder / "images" / split
        images.mkdir(parents=True, exist_ok=True)
        matching, pairs = [], []
        for index in range(size):
            pair = render_pair(task, seed, split, index, noise=noise)
            name = f"images/{split}/{index:05d}.png"
            pair.image.save(folder / name)
            matching.append((name, pair.matching_text, pair.label))
            pairs.append((name, pair.caption, spec.classes[pair.cls]))
        for file, rows in ((f"{split}.csv", matching), (f"pairs_{split}.csv", pairs)):
            with open(folder / file, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(("image", "text", "label"))
                writer.writerows(rows)
    classes = {"classes": list(spec.classes), "prompt": spec.templates[0]}
    (folder / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    done.write_text(json.dumps(stamp) + "\n")
    return folder
