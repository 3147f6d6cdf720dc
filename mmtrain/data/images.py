"""Decode one image file to the model's input: RGB, upright, resized and centre-cropped.

The geometry is CLIP's processor's: the shorter side is resized (bicubic) to the model's
size, then the centre square is cut. Whatever the file holds (grayscale, 16-bit, palette,
transparency, CMYK, an EXIF rotation), the result is uint8 RGB [3, size, size].
"""

from __future__ import annotations

import io
import signal
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
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
    messages), the processor's centre crop; raises ImageProblem for a bad file."""
    with _decoded(path, size, max_pixels, name) as image:
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(image).transpose(2, 0, 1)


def load_whole(
    path: Path | IO[bytes], side: int, max_pixels: int, name: str = ""
) -> tuple[np.ndarray, float]:
    """(uint8 [3, side, side], width / height): the whole picture squeezed into a square, and
    its true shape, so that any box of it can be cut later (`mmtrain.data.geometry`)."""
    with _decoded(path, side, max_pixels, name) as image:
        aspect = image.width / image.height
        image = image.resize((side, side), Image.Resampling.BICUBIC)
        return np.asarray(image).transpose(2, 0, 1), aspect


@contextmanager
def _decoded(
    path: Path | IO[bytes], size: int, max_pixels: int, name: str
) -> Iterator[Image.Image]:
    """The picture in the file, RGB and upright; ImageProblem for a file that cannot be used."""
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
            rgb = to_rgb(ImageOps.exif_transpose(image))
    except ImageProblem:
        raise
    except FileNotFoundError:
        raise ImageProblem("missing file", f"{name} does not exist") from None
    # PIL raises many types for broken files (OSError for truncated data, SyntaxError,
    # ValueError, struct.error...): every one of them means this file cannot be used.
    except Exception as error:
        raise ImageProblem("unreadable image", f"{name}: {type(error).__name__}: {error}") from None
    yield rgb


def source_file(source: str | Path | bytes) -> Path | IO[bytes]:
    """What PIL opens: a path, or an image's encoded bytes (a dataset's) as a file object."""
    return io.BytesIO(source) if isinstance(source, bytes) else Path(source)


def decode_rows(
    array_path: str, first: int, paths: list[str | bytes | None], max_pixels: int
) -> list[tuple[tuple[str, str] | None, int, float]]:
    """Decode `paths` whole into rows first.. of the .npy array at `array_path` (opened
    here, so a worker process needs nothing but the path); per row, its problem, the crc32
    of its pixels and its width/height. Runs in the cache's worker processes."""
    array = np.load(array_path, mmap_mode="r+")
    results = []
    for offset, path in enumerate(paths):
        problem, aspect = None, 1.0
        if path is not None:
            try:
                array[first + offset], aspect = load_whole(
                    source_file(path), array.shape[-1], max_pixels, _name(path, first + offset)
                )
            except ImageProblem as error:
                problem = (error.reason, error.detail)
        results.append((problem, zlib.crc32(array[first + offset]), aspect))
    array.flush()
    return results


def _name(source: str | Path | bytes, row: int) -> str:
    return f"the image of row {row}" if isinstance(source, bytes) else str(source)


def decode_chunks(
    pipe: Any,
    array_path: str,
    chunks: list[tuple[int, list[str | None]]],
    max_pixels: int,
) -> None:
    """A cache worker process: decode each (first row, paths) chunk into the array and send
    (first row, results) through `pipe`. SIGINT (Ctrl-C reaches the whole group) is left to
    the parent, which stops the build; SIGTERM ends the worker at once, without a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for first, paths in chunks:
        pipe.send((first, decode_rows(array_path, first, paths, max_pixels)))
    pipe.close()


def image_header(path: Path | bytes, max_pixels: int) -> tuple[tuple[str, str] | None, float]:
    """(None or (reason, detail) when the file's header already shows it cannot be used,
    the upright picture's width / height), reading no pixels."""
    try:
        with Image.open(source_file(path)) as image:
            width, height = image.size
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF turns it by 90 degrees
                width, height = height, width
    except FileNotFoundError:
        return ("missing file", f"{path} does not exist"), 1.0
    except Exception as error:  # PIL's many types for a broken file, as in load_image
        return ("unreadable image", f"{path}: {type(error).__name__}: {error}"), 1.0
    if width * height > max_pixels:
        return (
            "image too large",
            f"{path} is {width}x{height} = {width * height:,} pixels, over "
            f"data.max_image_pixels={max_pixels:,}; shrink the file or raise the limit",
        ), 1.0
    return None, width / max(height, 1)
