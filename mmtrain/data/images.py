"""Decode one image file to the model's input: RGB, upright, resized and centre-cropped.

The geometry is CLIP's processor's: the shorter side is resized (bicubic) to the model's
size, then the centre square is cut. Whatever the file holds (grayscale, 16-bit, palette,
transparency, CMYK, an EXIF rotation), the result is uint8 RGB [3, size, size].
"""

from __future__ import annotations

import signal
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps

# Checked right after the header is read, before any pixel is decoded (see `load_image`),
# so PIL's own decompression-bomb check, which would raise before ours, is switched off.
Image.MAX_IMAGE_PIXELS = None

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class ImageProblem(Exception):
    """An image file that cannot be used; `reason` is a short kind, `detail` says more."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparent pixels become white (as transformers' `convert_to_rgb`)."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F" and values.max(initial=0) > 255:  # 16-bit grey
            values = values / 257.0
        image = Image.fromarray(values.clip(0, 255).round().astype(np.uint8))
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: Path | IO[bytes], size: int, max_pixels: int, name: str = "") -> np.ndarray:
    """uint8 [3, size, size] of the file at `path` (or a file object, called `name` in
    messages); raises ImageProblem for a bad file."""
    name = name or str(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageProblem(
                    "image too large",
                    f"{name} is {width}x{height} = {width * height:,} pixels, over "
                    f"data.max_image_pixels={max_pixels:,}; shrink the file or raise the limit",
                )
            # JPEGs much larger than the model's size decode at 1/2, 1/4 or 1/8 scale (never
            # below `size`): the same picture for a fraction of the decoding time.
            image.draft(None, (size, size))
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))
            image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
            return np.asarray(image).transpose(2, 0, 1)
    except ImageProblem:
        raise
    except FileNotFoundError:
        raise ImageProblem("missing file", f"{name} does not exist") from None
    # PIL raises many types for broken files (OSError for truncated data, SyntaxError,
    # ValueError, struct.error...): every one of them means this file cannot be used.
    except Exception as error:
        raise ImageProblem("unreadable image", f"{name}: {type(error).__name__}: {error}") from None


def decode_rows(
    array_path: str, first: int, paths: list[str | None], size: int, max_pixels: int
) -> list[tuple[tuple[str, str] | None, int]]:
    """Decode `paths` into rows first.. of the .npy array at `array_path` (opened here, so a
    worker process needs nothing but the path); per row, its problem and the crc32 of its
    pixels. Runs in the cache's worker processes."""
    array = np.load(array_path, mmap_mode="r+")
    results = []
    for offset, path in enumerate(paths):
        problem = None
        if path is not None:
            try:
                array[first + offset] = load_image(Path(path), size, max_pixels)
            except ImageProblem as error:
                problem = (error.reason, error.detail)
        results.append((problem, zlib.crc32(array[first + offset])))
    array.flush()
    return results


def decode_chunks(
    pipe: Any,
    array_path: str,
    chunks: list[tuple[int, list[str | None]]],
    size: int,
    max_pixels: int,
) -> None:
    """A cache worker process: decode each (first row, paths) chunk into the array and send
    (first row, results) through `pipe`. SIGINT (Ctrl-C reaches the whole group) is left to
    the parent, which stops the build; SIGTERM ends the worker at once, without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for first, paths in chunks:
        pipe.send((first, decode_rows(array_path, first, paths, size, max_pixels)))
    pipe.close()


def image_header_problem(path: Path, max_pixels: int) -> tuple[str, str] | None:
    """None, or (reason, detail) when the file's header already shows it cannot be used."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        return "missing file", f"{path} does not exist"
    except Exception as error:  # PIL's many types for a broken file, as in load_image
        return "unreadable image", f"{path}: {type(error).__name__}: {error}"
    if width * height > max_pixels:
        return (
            "image too large",
            f"{path} is {width}x{height} = {width * height:,} pixels, over "
            f"data.max_image_pixels={max_pixels:,}; shrink the file or raise the limit",
        )
    return None
