"""Real image files and manifests for the manifest tests, written into a tmp folder."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from conftest import TINY
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230)}
# TINY's model, trainer and scheduler overrides (its data.* keys belong to `shapes`).
MODEL_TINY = [o for o in TINY if not o.startswith("data.")]


def colour_image(colour: str, seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A noisy image of one colour (width x height)."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(COLOURS[colour], 25, size=(size[1], size[0], 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_csv(path: Path, rows: list[dict], columns=("image", "text", "label")) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def learnable_rows(folder: Path, split: str, count: int) -> list[dict]:
    """Rows whose image colour is the label (PNG and JPEG alternate)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        colour = list(COLOURS)[index % len(COLOURS)]
        name = f"images/{split}_{index}.{'png' if index % 2 else 'jpg'}"
        colour_image(colour, seed=index + 100_000 * len(split)).save(folder / name)
        rows.append({"image": name, "text": f"a picture that is mostly {colour}", "label": colour})
    return rows


def write_learnable(folder: Path, train: int = 96, val: int = 48) -> tuple[Path, Path]:
    """train.csv and val.jsonl of a colour-classification set with string labels."""
    folder.mkdir(parents=True, exist_ok=True)
    return (
        write_csv(folder / "train.csv", learnable_rows(folder, "train", train)),
        write_jsonl(folder / "val.jsonl", learnable_rows(folder, "val", val)),
    )


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def write_messy(folder: Path) -> dict:
    """A train.csv and a val.jsonl with every kind of problem and every odd image mode.

    Returns {"train": path, "val": path, "bad": {(split, line): reason}, "good": {...}}.
    """
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    colour_image("red", 1).save(images / "red.png")
    colour_image("blue", 2).save(images / "blue.jpg", quality=95)
    colour_image("green", 3).convert("L").save(images / "grey.png")
    colour_image("red", 4).convert("CMYK").save(images / "cmyk.jpg")
    rgba = colour_image("blue", 5).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(images / "rgba.png")
    palette = colour_image("green", 6).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    palette.save(images / "palette.png")
    (images / "corrupt.jpg").write_bytes(b"this is not an image at all")
    whole = jpeg_bytes(colour_image("red", 7, size=(200, 160)))
    (images / "truncated.jpg").write_bytes(whole[: len(whole) // 2])

    train_rows = [
        {"image": "images/red.png", "text": "a red one", "label": "red"},  # line 2
        {"image": "images/blue.jpg", "text": "a blue one", "label": "blue"},  # 3
        {"image": "images/grey.png", "text": "a grey one", "label": "green"},  # 4
        {"image": "images/cmyk.jpg", "text": "a cmyk one", "label": "red"},  # 5
        {"image": "images/rgba.png", "text": "see-through", "label": "blue"},  # 6
        {"image": "images/palette.png", "text": "few colours", "label": "green"},  # 7
        {"image": "images/corrupt.jpg", "text": "broken", "label": "red"},  # 8
        {"image": "images/truncated.jpg", "text": "cut short", "label": "red"},  # 9
        {"image": "images/nowhere.png", "text": "gone", "label": "blue"},  # 10
        {"image": "images/red.png", "text": "   ", "label": "red"},  # 11
        {"image": "images/blue.jpg", "text": "no label", "label": ""},  # 12
    ]
    val_rows = [
        {"image": "images/red.png", "text": "a red one", "label": "red"},  # line 1
        {"image": "images/blue.jpg", "text": "unseen", "label": "purple"},  # 2
        {"image": "images/grey.png", "text": 42, "label": "green"},  # 3
        {"image": "images/rgba.png", "text": "fine", "label": "blue"},  # 4
        {"image": "images/palette.png", "text": "fine too", "label": "green"},  # 5
    ]
    train = write_csv(folder / "train.csv", train_rows)
    val = write_jsonl(folder / "val.jsonl", val_rows)
    with open(val, "a") as handle:
        handle.write("{not json\n")  # line 6
    bad = {
        ("train", 8): "unreadable image",
        ("train", 9): "unreadable image",
        ("train", 10): "missing file",
        ("train", 11): "empty text",
        ("train", 12): "missing label",
        ("val", 2): "unknown label",
        ("val", 3): "invalid text",
        ("val", 6): "invalid row",
    }
    return {"train": train, "val": val, "bad": bad, "good": {"train": 6, "val": 3}}
