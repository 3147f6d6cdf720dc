"""`manifest`: the user's own image-text pairs, listed in CSV or JSONL files.

Each row names an image file (relative to `data.image_root`, else to the manifest's own
folder), a text and a label. Labels are integers (class ids) or strings (class names,
mapped to ids in sorted order of the training labels). Every row is checked; a row that
cannot be used (missing or broken image, empty text, missing or unknown label) is a
`BadRow` with its file, line and reason. Under `on_bad_sample=error` (the default) every
bad row of every split is listed and nothing is trained; under `skip` they are dropped and
counted. No row is ever changed to make it fit.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch

from mmtrain.data.cache import cache_options, cached_images
from mmtrain.data.cached import decoded_on_read
from mmtrain.data.source import BadRow, SplitData, matching_class
from mmtrain.errors import UserError
from mmtrain.registry import register
from mmtrain.rules import Bounds

log = logging.getLogger("mmtrain")
# A class id as text: no sign, no leading zeros ("00" and "0" are two class names).
_INTEGER = re.compile(r"0|[1-9]\d*")
# Characters that show nothing: controls, format characters (zero-width space, joiners,
# BOM), separators, and code points with no assigned meaning.
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}


@dataclass
class Row:
    """One manifest row as read, before any check; `line` is 1-based in the file."""

    line: int
    image: Any
    text: Any
    label: Any
    negatives: Any = None
    problem: tuple[str, str] | None = None  # (reason, detail) when the line itself is broken


def _read_error(path: Path, what: str) -> UserError:
    return UserError(f"Cannot read the manifest {path}: {what}.")


def read_manifest(path: Path, columns: dict[str, str | None]) -> tuple[bytes, list[Row]]:
    """The raw bytes (for the cache key) and the rows of a .csv or .jsonl file.

    `columns` maps image/text/label to the column names; a column missing from the file
    is a UserError that lists the columns it has. A JSONL line that is not a JSON object
    becomes a row whose fields are all None (it is then reported as a bad row).
    """
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise UserError(
            f"The manifest {path} is neither .csv nor .jsonl; mmtrain reads the format from "
            "the extension. Rename or convert the file."
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _read_error(
            path, f"it is not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    wanted = {kind: name for kind, name in columns.items() if name is not None}
    rows: list[Row] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        found = set(header)
        start = 2
        try:
            for record in reader:
                rows.append(Row(start, *(record.get(wanted.get(k)) for k in columns)))
                # csv puts extra fields under None and fills missing ones with None: either
                # means the row does not line up with the header, e.g. a caption with an
                # unquoted comma, which would otherwise shift its tail into the label.
                fields = sum(v is not None for k, v in record.items() if k is not None)
                fields += len(record.get(None) or [])
                if fields != len(header):
                    rows[-1].problem = (
                        "wrong number of fields",
                        f"{fields} fields, the header has {len(header)}: quote captions "
                        'that contain commas ("a red, round ball")',
                    )
                start = reader.line_num + 1
        except csv.Error as error:
            raise _read_error(path, f"line {reader.line_num}: {error}") from None
    else:
        found = set()
        header = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                rows.append(Row(number, *(_NOT_JSON,) * 3))
                continue
            for key in record:
                if key not in found:
                    found.add(key)
                    header.append(key)
            rows.append(Row(number, *(record.get(wanted.get(k)) for k in columns)))
    for kind, name in wanted.items():
        if kind == "negative":  # only the training split needs negatives
            continue
        if name not in found and (suffix == ".csv" or rows):
            raise UserError(
                f"The manifest {path} has no {kind} column {name!r}; its columns are: "
                f"{', '.join(map(str, header)) or '(none)'}. Name the right one with "
                f"data.{kind}_column=COLUMN."
            )
    return data, rows


def _negatives(value: Any) -> list[str]:
    """A row's negative texts: a JSON list, or one CSV cell with texts separated by '|'."""
    if isinstance(value, list):
        return [str(text) for text in value if str(text).strip()]
    if isinstance(value, str):
        return [text.strip() for text in value.split("|") if text.strip()]
    return []


class _NotJson:
    def __repr__(self) -> str:
        return "<not a JSON object>"


_NOT_JSON = _NotJson()


def _label_key(value: Any) -> str | None:
    """A label as the string that names its class, or None when it is not a label."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


def class_names_of(keys: list[str], num_classes: int | None) -> tuple[list[str], bool]:
    """(class names in id order, True when labels are integer class ids) from the
    training labels: integers when every label is one, else the sorted distinct strings."""
    if keys and all(_INTEGER.fullmatch(key.strip()) for key in keys):
        count = num_classes if num_classes is not None else max(int(k) for k in keys) + 1
        return [str(i) for i in range(max(count, 0))], True
    return sorted(set(keys)), False


def _is_id_list(class_names: list[str]) -> bool:
    return class_names == [str(i) for i in range(len(class_names))]


class Checker:
    """Checks the text, label and image path of one row; returns the problems."""

    def __init__(self, file: str, root: Path, class_names: list[str], integer_labels: bool):
        self.file, self.root = file, root
        self.class_names, self.integer_labels = class_names, integer_labels
        self.ids = {name: i for i, name in enumerate(class_names)}

    def path(self, row: Row) -> Path | None:
        """The image file of `row`, resolved, or None when the row names none."""
        if not isinstance(row.image, str) or not row.image.strip():
            return None
        path = Path(row.image).expanduser()
        return path if path.is_absolute() else self.root / path

    def label(self, row: Row) -> tuple[int | None, tuple[str, str] | None]:
        """(class id, None) or (None, (reason, detail))."""
        if row.label is None or (isinstance(row.label, str) and not row.label.strip()):
            return None, ("missing label", "the label is empty")
        key = _label_key(row.label)
        if key is None:
            return None, (
                "invalid label",
                f"the label {row.label!r} is a {type(row.label).__name__}, not an integer or a string",
            )
        if self.integer_labels and _INTEGER.fullmatch(key.strip()):
            value = int(key)
            if 0 <= value < len(self.class_names):
                return value, None
            return None, (
                "label out of range",
                f"the label {value} is not a class id in 0..{len(self.class_names) - 1}; "
                "set model.num_classes to the number of classes, or fix the row",
            )
        if key in self.ids:
            return self.ids[key], None
        shown = ", ".join(self.class_names[:20]) + (" ..." if len(self.class_names) > 20 else "")
        return None, (
            "unknown label",
            f"the label {key!r} is not one of the training labels ({shown})",
        )

    def text(self, row: Row) -> tuple[str, str] | None:
        """None, or (reason, detail) when the text cannot be used."""
        if row.text is None:
            return "missing text", "the text is missing"
        if not isinstance(row.text, str):
            return (
                "invalid text",
                f"the text {row.text!r} is a {type(row.text).__name__}, not a string",
            )
        if not row.text.strip():
            return "empty text", "the text is empty"
        if all(unicodedata.category(ch) in _INVISIBLE for ch in row.text):
            return "empty text", f"the text {row.text!r} has no visible character"
        return None


def check_row(checker: Checker, row: Row) -> tuple[Path | None, int | None, tuple[str, str] | None]:
    """(image path to decode, class id, problem) of one row, from every check but the
    image's decoding; the path is None when there is nothing to decode."""
    label, label_problem = checker.label(row)
    path = checker.path(row)
    if row.image is _NOT_JSON:
        return None, label, ("invalid row", "the line is not a JSON object")
    if row.problem is not None:
        return None, label, row.problem
    if path is None:
        return None, label, ("missing image path", "the image path is empty or missing")
    if path.is_dir():
        return None, label, ("not a file", f"{path} is a directory, not an image file")
    if path.exists() and not path.is_file():
        return (
            None,
            label,
            ("not a file", f"{path} is not a regular file (a device, pipe or socket)"),
        )
    if not path.is_file():
        return (
            None,
            label,
            (
                "missing file",
                f"{path} does not exist (image paths are relative to "
                f"data.image_root, else to the manifest's folder: {checker.root})",
            ),
        )
    return path, label, checker.text(row) or label_problem


def _bad_row_report(bad: list[BadRow]) -> str:
    counts = Counter(row.reason for row in bad)
    summary = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
    listing = "\n".join(f"  {row.split}  {row}" for row in bad)
    return (
        f"{len(bad)} bad row(s) in the manifests ({summary}):\n{listing}\n"
        "Fix or remove these rows, or set data.on_bad_sample=skip to train without them "
        "(they are then counted in the log and summary.json). `mmtrain validate` lists them "
        "without training."
    )


def _load_split(
    split: str,
    path: Path,
    rows: list[Row],
    manifest_bytes: bytes,
    checker: Checker,
    image_size: int,
    cache_dir: Path,
    max_image_pixels: int,
    with_negatives: bool = False,
    cache: dict[str, Any] | None = None,
) -> SplitData:
    paths, problems, labels = [], [], []
    for row in rows:
        image, label, problem = check_row(checker, row)
        paths.append(image)
        labels.append(label)
        problems.append(problem)
    cache = cache or {}
    if cache.get("enabled", True):
        cache = cached_images(
            paths, manifest_bytes, cache_dir, image_size, max_image_pixels,
            cache.get("workers", 0), cache.get("verify", False), cache.get("scale", 1.0),
        )  # fmt: skip
    else:
        cache = decoded_on_read(paths, image_size, max_image_pixels, cache.get("scale", 1.0))
    bad: list[BadRow] = []
    good: list[int] = []
    for position, (row, problem) in enumerate(zip(rows, problems, strict=True)):
        problem = cache.problems[position] or problem
        if problem is None:
            good.append(position)
        else:
            bad.append(BadRow(split, str(path), row.line, *problem))
    index = None if len(good) == len(rows) else torch.tensor(good, dtype=torch.long)
    return SplitData(
        images=cache.images,
        negatives=[_negatives(rows[i].negatives) for i in good] if with_negatives else None,
        texts=[rows[i].text for i in good],
        labels=torch.tensor([labels[i] for i in good], dtype=torch.long),
        class_names=checker.class_names,
        index=index,
        bad_rows=bad,
        aspects=cache.aspects,
        image_size=image_size,
        paths=[str(paths[i]) for i in good],
    )


@register("data", "manifest")
def manifest(
    *,
    image_size: int,
    train: str | None = None,
    val: str | None = None,
    test: str | None = None,
    image_root: str | None = None,
    image_column: str = "image",
    text_column: str = "text",
    label_column: str | None = "label",
    negative_column: str | None = None,
    cache_dir: str | None = None,
    max_image_pixels: Annotated[int, Bounds(ge=1)] = 100_000_000,
    on_bad_sample: Literal["error", "skip"] = "error",
    cache: bool = True,
    cache_workers: Annotated[int, Bounds(ge=0)] | None = None,
    cache_scale: Annotated[float, Bounds(ge=1, le=4)] = 1.143,
    match_label: str | int | None = "auto",
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    full_check: bool = False,
) -> dict[str, SplitData]:
    """Image-text pairs from CSV or JSONL manifests (`train`, `val`, optional `test`).

    `image_size` comes from the backbone. `class_names` (from a run's labels.json) fixes
    the label mapping instead of deriving it from the training labels; with it, `train`
    may be left out (`mmtrain predict` reads one manifest as `val`). Decoded images are
    cached in `cache_dir` (default: `.mmtrain_cache/` beside each manifest) by
    `cache_workers` processes (null: one per CPU, at most 8, or threads for < 256 images), whole at `cache_scale` x the
    model's size (the loader cuts the model's input), or decoded by the loader every
    epoch with `cache=False`; `full_check` (`mmtrain validate`) checks every cached pixel.
    """
    if val is None or (train is None and class_names is None):
        raise UserError(
            "data=manifest needs data.train=PATH and data.val=PATH (CSV or JSONL files with "
            f"the columns {image_column!r}, {text_column!r}, {label_column!r}); "
            "data.test is optional."
        )
    columns = {"image": image_column, "text": text_column, "label": label_column}
    if negative_column:
        columns["negative"] = negative_column
    given = {"train": train, "val": val, "test": test}
    read: dict[str, tuple[Path, bytes, list[Row]]] = {}
    for split, name in given.items():
        if name is None:
            continue
        path = Path(str(name)).expanduser().resolve()
        if not path.is_file():
            raise UserError(
                f"data.{split}={name}: no such file ({path}). Relative paths are resolved "
                "against the directory mmtrain was started from."
            )
        read[split] = (path, *read_manifest(path, columns))

    if label_column is None:  # no labels: one class, every row in it
        for _, _, rows in read.values():
            for row in rows:
                row.label = 0
    if class_names is not None:
        names, integer = list(class_names), _is_id_list(list(class_names))
    else:
        keys = [_label_key(row.label) for row in read["train"][2]]
        names, integer = class_names_of([k for k in keys if k is not None], num_classes)
    if "train" in read and not read["train"][2]:
        raise UserError(f"The training manifest {read['train'][0]} has no rows.")
    if not names:
        raise UserError(
            f"The training manifest {read['train'][0]} has no usable label in column "
            f"{label_column!r}; every row needs an integer class id or a class name."
        )

    genuine = matching_class(names, None if label_column is None else match_label)
    splits: dict[str, SplitData] = {}
    for split, (path, data, rows) in read.items():
        root = Path(image_root).expanduser().resolve() if image_root else path.parent
        folder = Path(cache_dir).expanduser().resolve() if cache_dir else path.parent
        if not cache_dir:
            folder = folder / ".mmtrain_cache"
        checker = Checker(str(path), root, names, integer)
        splits[split] = _load_split(
            split,
            path,
            rows,
            data,
            checker,
            image_size,
            folder,
            max_image_pixels,
            bool(negative_column),
            cache_options(cache, cache_workers, cache_scale, full_check),
        )
        if genuine is not None:  # a matching task: only its matching rows are true pairs
            splits[split].paired = splits[split].labels == genuine
        if splits[split].bad_rows:
            log.info(
                "  %s: %d of %d rows of %s are bad",
                split,
                len(splits[split].bad_rows),
                len(rows),
                path.name,
            )

    bad = [row for split in splits.values() for row in split.bad_rows]
    if bad and on_bad_sample == "error":
        raise UserError(_bad_row_report(bad))
    if bad:
        counts = Counter(row.reason for row in bad)
        log.warning(
            "skipped %d bad row(s) (data.on_bad_sample=skip): %s",
            len(bad),
            ", ".join(f"{reason}: {n}" for reason, n in counts.most_common()),
        )
    return splits
