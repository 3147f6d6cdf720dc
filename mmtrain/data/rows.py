"""Manifest rows: reading a CSV or JSONL manifest, checking each row, reporting bad rows.

`read_manifest` reads a file into `ManifestRow`s without judging them; a `Checker` judges
a row's image path, text and label (the label through `mmtrain.data.labels`), and
`check_row` puts the checks together (`check_fields` all but the label's: the classes come
from the rows that pass them). `settle_bad_rows` applies `data.on_bad_sample` to the
bad rows of every split: the report of `error`, or the count of `skip`. The manifest
source, the hf source and `mmtrain shards` all check rows this way.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmtrain.data.labels import Classes, resolve_label
from mmtrain.data.source import BadRow
from mmtrain.errors import UserError, read_text

log = logging.getLogger("mmtrain")
# Characters that show nothing: controls, format characters (zero-width space, joiners,
# BOM), separators, and code points with no assigned meaning.
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"}


@dataclass
class ManifestRow:
    """One manifest row as read, before any check; `line` is 1-based in the file."""

    line: int
    image: Any
    text: Any
    label: Any
    negatives: Any = None
    problem: tuple[str, str] | None = None  # (reason, detail) when the line itself is broken


class _NotJson:
    def __repr__(self) -> str:
        return "<not a JSON object>"


NOT_JSON = _NotJson()  # every field of a JSONL line that is not a JSON object


def _read_error(path: Path, what: str) -> UserError:
    return UserError(f"Cannot read the manifest {path}: {what}.")


def _csv_rows(
    path: Path, text: str, columns: dict[str, str | None]
) -> tuple[list[str], list[ManifestRow]]:
    """The header and the rows of a CSV manifest."""
    wanted = {kind: name for kind, name in columns.items() if name is not None}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = list(reader.fieldnames or [])
    rows: list[ManifestRow] = []
    start = 2
    try:
        for record in reader:
            rows.append(ManifestRow(start, *(record.get(wanted.get(k)) for k in columns)))
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
    return header, rows


def _jsonl_rows(text: str, columns: dict[str, str | None]) -> tuple[list[str], list[ManifestRow]]:
    """Every key met in a JSONL manifest (in order) and its rows."""
    wanted = {kind: name for kind, name in columns.items() if name is not None}
    header: list[str] = []
    rows: list[ManifestRow] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            rows.append(ManifestRow(number, *(NOT_JSON,) * 3))
            continue
        header += [key for key in record if key not in header]
        rows.append(ManifestRow(number, *(record.get(wanted.get(k)) for k in columns)))
    return header, rows


def read_manifest(path: Path, columns: dict[str, str | None]) -> tuple[bytes, list[ManifestRow]]:
    """The raw bytes (for the cache key) and the rows of a .csv or .jsonl file.

    `columns` maps image/text/label to the column names; a column missing from the file
    is a UserError that lists the columns it has. A JSONL line that is not a JSON object
    becomes a row whose fields are all `NOT_JSON` (it is then reported as a bad row).
    """
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise UserError(
            f"The manifest {path} is neither .csv nor .jsonl; mmtrain reads the format from "
            "the extension. Rename or convert the file."
        )
    text = read_text(path, "The manifest")
    data = text.encode("utf-8")
    if suffix == ".csv":
        header, rows = _csv_rows(path, text, columns)
    else:
        header, rows = _jsonl_rows(text, columns)
    for kind, name in columns.items():
        if name is None or kind == "negative":  # only the training split needs negatives
            continue
        if name not in header and (suffix == ".csv" or rows):
            raise UserError(
                f"The manifest {path} has no {kind} column {name!r}; its columns are: "
                f"{', '.join(map(str, header)) or '(none)'}. Name the right one with "
                f"data.{kind}_column=COLUMN."
            )
    return data, rows


def row_negatives(value: Any) -> list[str]:
    """A row's negative texts: a JSON list, or one CSV cell with texts separated by '|'."""
    if isinstance(value, list):
        return [str(text) for text in value if str(text).strip()]
    if isinstance(value, str):
        return [text.strip() for text in value.split("|") if text.strip()]
    return []


class Checker:
    """Checks the text, label and image path of one row; returns the problems."""

    def __init__(self, file: str, root: Path, classes: Classes):
        self.file, self.root, self.classes = file, root, classes

    @property
    def class_names(self) -> list[str]:
        """The class names, in id order."""
        return self.classes.names

    def path(self, row: ManifestRow) -> Path | None:
        """The image file of `row`, resolved, or None when the row names none."""
        if not isinstance(row.image, str) or not row.image.strip():
            return None
        path = Path(row.image).expanduser()
        return path if path.is_absolute() else self.root / path

    def label(self, row: ManifestRow) -> tuple[int | None, tuple[str, str] | None]:
        """(class id, None) or (None, (reason, detail))."""
        return resolve_label(row.label, self.classes)

    def text(self, row: ManifestRow) -> tuple[str, str] | None:
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


def _path_problem(checker: Checker, row: ManifestRow, path: Path | None) -> tuple[str, str] | None:
    """None, or (reason, detail) when the row's line or image path cannot be used."""
    if row.image is NOT_JSON:
        return "invalid row", "the line is not a JSON object"
    if row.problem is not None:
        return row.problem
    if path is None:
        return "missing image path", "the image path is empty or missing"
    if path.is_dir():
        return "not a file", f"{path} is a directory, not an image file"
    if path.exists() and not path.is_file():
        return "not a file", f"{path} is not a regular file (a device, pipe or socket)"
    if not path.is_file():
        return (
            "missing file",
            f"{path} does not exist (image paths are relative to "
            f"data.image_root, else to the manifest's folder: {checker.root})",
        )
    return None


def check_fields(checker: Checker, row: ManifestRow) -> tuple[Path | None, tuple[str, str] | None]:
    """(image path to decode, problem) of one row, from every check but its label's and
    its image's decoding: what decides whether a row is kept before any class exists. The
    path is None when there is nothing to decode."""
    path = checker.path(row)
    problem = _path_problem(checker, row, path)
    if problem is not None:
        return None, problem
    return path, checker.text(row)


def check_row(
    checker: Checker, row: ManifestRow
) -> tuple[Path | None, int | None, tuple[str, str] | None]:
    """(image path to decode, class id, problem) of one row, from every check but the
    image's decoding; the path is None when there is nothing to decode."""
    label, label_problem = checker.label(row)
    path, problem = check_fields(checker, row)
    return path, label, problem or label_problem


def bad_row_report(bad: list[BadRow], where: str = "in the manifests") -> str:
    """The message that lists every bad row (of every split) and how to go on."""
    counts = Counter(row.reason for row in bad)
    summary = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
    listing = "\n".join(f"  {row.split}  {row}" for row in bad)
    return (
        f"{len(bad)} bad row(s) {where} ({summary}):\n{listing}\n"
        "Fix or remove these rows, or set data.on_bad_sample=skip to train without them "
        "(they are then counted in the log and summary.json). `mmtrain validate` lists them "
        "without training."
    )


def settle_bad_rows(bad: list[BadRow], on_bad_sample: str, where: str = "in the manifests") -> None:
    """`data.on_bad_sample` for the bad rows of every split: `error` stops with the report
    of them all, `skip` logs how many were dropped, per reason."""
    if bad and on_bad_sample == "error":
        raise UserError(bad_row_report(bad, where))
    if bad:
        counts = Counter(row.reason for row in bad)
        log.warning(
            "skipped %d bad row(s) (data.on_bad_sample=skip): %s",
            len(bad),
            ", ".join(f"{reason}: {n}" for reason, n in counts.most_common()),
        )
