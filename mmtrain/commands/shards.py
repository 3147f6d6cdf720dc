"""`mmtrain shards MANIFEST OUT_DIR [KEY=VALUE ...]`: webdataset tar shards from a manifest.

Every row gets the checks and the label rule of `data=manifest` (the image is decoded once
to prove it can be); bad rows stop the command with every one listed, or are left out with
`on_bad_sample=skip`. Each sample holds the image file's own bytes (`jpg`/`png`/`webp`;
other formats are written as PNG), its text (`txt`) and its class id (`cls`). When the
labels are class names, each sample also holds its name (`json`'s `label`, so that every
split maps names to the training split's ids) and `classes.txt` beside the shards names
the ids (one name per line, in id order: open_clip's layout). Beside them too:
`sizes.json` (samples per shard, so training needs no counting pass).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mmtrain.data.images import ImageProblem, load_image
from mmtrain.data.labels import Classes, classes_of
from mmtrain.data.rows import Checker, ManifestRow, check_fields, read_manifest
from mmtrain.data.samples import CLASSES_FILE, IMAGE_KEYS, SIZES_FILE, require_webdataset
from mmtrain.data.source import BadRow
from mmtrain.errors import UserError

log = logging.getLogger("mmtrain")
OPTIONS = {
    "shard_size": "10000",
    "image_root": "",
    "image_column": "image",
    "text_column": "text",
    "label_column": "label",
    "on_bad_sample": "error",
    "max_image_pixels": "100000000",
}
USAGE = (
    "Usage: mmtrain shards MANIFEST OUT_DIR [shard_size=10000] [image_root=DIR] "
    "[image_column=image] [text_column=text] [label_column=label|null] [on_bad_sample=error|skip]"
)


def _parse(args: list[str]) -> tuple[Path, Path, dict[str, str]]:
    positional = [a for a in args if "=" not in a]
    options = dict(OPTIONS)
    for arg in (a for a in args if "=" in a):
        key, value = arg.split("=", 1)
        if key not in options:
            raise UserError(
                f"Unknown option {key!r} of mmtrain shards; it takes: {', '.join(OPTIONS)}. {USAGE}"
            )
        options[key] = value
    if len(positional) != 2:
        raise UserError(f"mmtrain shards needs a manifest and an output folder. {USAGE}")
    for key in ("shard_size", "max_image_pixels"):
        if not options[key].isdigit() or int(options[key]) < 1:
            raise UserError(f"{key} must be a positive integer (got {options[key]!r}).")
    if options["on_bad_sample"] not in ("error", "skip"):
        raise UserError(
            f"on_bad_sample={options['on_bad_sample']} is not valid; choose error or skip."
        )
    return Path(positional[0]).expanduser().resolve(), Path(positional[1]).expanduser(), options


def _classes(rows: list[ManifestRow], problems: list, label_column: str | None) -> Classes:
    """The classes of the labels of the rows kept by every other check (one class without
    a label column): a rejected row makes no class."""
    if label_column is None:
        for row in rows:
            row.label = 0
    kept = [row.label for row, problem in zip(rows, problems, strict=True) if problem is None]
    return classes_of(kept or [row.label for row in rows])


def _progress(what: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{what}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=Console(stderr=True),
    )  # fmt: skip


def _check(
    rows: list[ManifestRow], checker: Checker, max_pixels: int
) -> list[tuple[Path | None, tuple[str, str] | None]]:
    """Per row, (image path, problem) from every check but its label's."""
    checked = []
    with _progress("checking rows") as progress:
        task = progress.add_task("check", total=len(rows))
        for row in rows:
            path, problem = check_fields(checker, row)
            if problem is None:
                try:
                    load_image(path, 32, max_pixels)  # decodes it once: a broken file is a bad row
                except ImageProblem as error:
                    problem = (error.reason, error.detail)
            checked.append((path, problem))
            progress.advance(task)
    return checked


def _labelled(
    rows: list[ManifestRow], checked: list, classes: Classes, manifest: Path
) -> tuple[list[tuple[Path, str, int]], list[BadRow]]:
    """(path, text, class id) of every good row, and the bad rows, in the manifest's order."""
    checker = Checker(str(manifest), manifest.parent, classes)
    good, bad = [], []
    for row, (path, problem) in zip(rows, checked, strict=True):
        label, label_problem = checker.label(row)
        problem = problem or label_problem
        if problem is None:
            good.append((path, row.text, label))
        else:
            bad.append(BadRow("rows", str(manifest), row.line, *problem))
    return good, bad


def _shard(
    wds, target: Path, samples: list[tuple[int, Path, str, int]], classes: Classes, advance
) -> None:
    """Write `samples` (number, path, text, class id) as the shard `target`: into a
    temporary file beside it, synced, then renamed, so `target` is whole or absent."""
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as stream:
            with wds.TarWriter(stream) as sink:
                for number, path, text, label in samples:
                    ext, data = _image_bytes(path)
                    sample = {"__key__": f"{number:09d}", ext: data, "txt": text, "cls": str(label)}
                    if not classes.ids:  # the name: every split maps it to the training ids
                        sample["json"] = json.dumps({"label": classes.names[label]})
                    sink.write(sample)
                    advance()
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


def _write(good: list[tuple[Path, str, int]], out: Path, size: int, classes: Classes) -> dict:
    """Write the good rows as shards of `size` samples into `out`; {shard name: samples}.
    A failed write (a full disk) leaves none of this command's files behind."""
    wds = require_webdataset()
    sizes: dict[str, int] = {}
    try:
        with _progress("writing shards") as progress:
            task = progress.add_task("write", total=len(good))
            for first in range(0, len(good), size):
                name = f"{first // size:05d}.tar"  # the folder is a path, never a pattern
                chunk = [(n, *good[n]) for n in range(first, min(first + size, len(good)))]
                _shard(wds, out / name, chunk, classes, lambda: progress.advance(task))
                sizes[name] = len(chunk)
        (out / SIZES_FILE).write_text(json.dumps(sizes, indent=1) + "\n")
        if not classes.ids:
            names = "".join(f"{name}\n" for name in classes.names)
            (out / CLASSES_FILE).write_text(names, encoding="utf-8")
    except OSError as error:
        for path in [*(out / name for name in sizes), out / SIZES_FILE, out / CLASSES_FILE]:
            path.unlink(missing_ok=True)
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        raise UserError(
            f"Could not write the shards into {out} "
            f"({'no space left on device' if full else error.strerror or error}); nothing of "
            f"them was kept. {'Free space' if full else 'Fix the cause'} and run mmtrain "
            "shards again."
        ) from None
    return sizes


def write_shards(args: list[str]) -> Path:
    """Check every row of the manifest and write the good ones as shards; the output folder."""
    require_webdataset()
    manifest, out, options = _parse(args)
    if not manifest.is_file():
        raise UserError(f"The manifest {manifest} does not exist.")
    label_column = None if options["label_column"] in ("null", "") else options["label_column"]
    columns = {
        "image": options["image_column"],
        "text": options["text_column"],
        "label": label_column,
    }
    _, rows = read_manifest(manifest, columns)
    max_pixels = int(options["max_image_pixels"])
    if not rows:
        raise UserError(f"The manifest {manifest} has no rows.")
    root = (
        Path(options["image_root"]).expanduser().resolve()
        if options["image_root"]
        else manifest.parent
    )
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise UserError(f"{out} already holds .tar files; choose an empty folder.")
    for stale in out.glob(".*.tar.*.tmp"):  # a shard a killed command was writing
        stale.unlink(missing_ok=True)
    checked = _check(rows, Checker(str(manifest), root, Classes([], ids=False)), max_pixels)
    classes = _classes(rows, [problem for _, problem in checked], label_column)
    good, bad = _labelled(rows, checked, classes, manifest)
    if bad and options["on_bad_sample"] == "error":
        listing = "\n".join(f"  {row}" for row in bad)
        raise UserError(
            f"{len(bad)} bad row(s) in {manifest}:\n{listing}\nFix or remove them, or pass "
            "on_bad_sample=skip to write the shards without them."
        )
    if not good:
        raise UserError(f"No usable row in {manifest}; nothing to write.")
    sizes = _write(good, out, int(options["shard_size"]), classes)
    last = len(sizes) - 1
    Console(stderr=True).print(
        f"wrote {len(good)} samples in {len(sizes)} shard(s) to {out} ({len(bad)} bad row(s) left out). "
        f"Train with: data=webdataset \"data.train='{out}/{{00000..{last:05d}}}.tar'\"",
        highlight=False,
        markup=False,  # a folder named [like this] is no markup
        soft_wrap=True,
    )
    return out


def _image_bytes(path: Path) -> tuple[str, bytes]:
    """(webdataset extension, bytes) of an image file: its own bytes when the extension is
    one webdataset readers know, else the picture re-encoded as PNG."""
    ext = path.suffix.lower().lstrip(".")
    if ext in IMAGE_KEYS:
        return ("jpg" if ext == "jpeg" else ext), path.read_bytes()
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.save(buffer, "PNG")
    return "png", buffer.getvalue()
