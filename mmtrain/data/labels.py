"""The one label rule of every data source (manifest, hf, webdataset, `mmtrain shards`).

A label is an integer or a string; None and a blank string are a missing label, anything
else (a bool, a float, a list) is an invalid one. A label is a *class id* when it is a
canonical non-negative integer: a JSON/Python int >= 0 (never a bool), or a string that is
exactly `0|[1-9][0-9]*` once surrounding whitespace is stripped ("3", " 2 "; not "03",
"-1", "+1", "3.0").

The training labels decide how every split is read (`classes_of`): when each of them is a
class id, labels are class ids 0..N-1 (N = model.num_classes, else the largest id + 1);
otherwise every label is a class name, its string form (2 is "2", " 2 " stays " 2 "), and
the ids follow the sorted names. A row's label is then resolved by `resolve_label`:

- under class ids, a class id < N is that class and one >= N is "label out of range";
- otherwise a label is looked up among the class names (its string form); a label that
  names no class is an "unknown label".

Class names that come with the data (a run's labels.json, a dataset's ClassLabel, a
webdataset's classes.txt) replace the derived ones; `Classes.ids` says whether a class id
in a row is read as an id into them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# A class id as text: no sign, no leading zeros ("00" and "0" are two class names).
CLASS_ID = re.compile(r"0|[1-9][0-9]*")
SHOWN_NAMES = 20  # class names listed in an "unknown label" detail


def class_id(value: Any) -> int | None:
    """The class id `value` is (an int >= 0, or its canonical text), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and CLASS_ID.fullmatch(value.strip()):
        return int(value.strip())
    return None


def label_name(value: Any) -> str | None:
    """A label as the string that names its class, or None when it is not a label
    (None, a blank string, a bool, or neither an integer nor a string)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    return None


@dataclass(frozen=True)
class Classes:
    """The class names in id order, and whether a label that is a class id is read as one
    (`ids`) or, like any other label, as a class name."""

    names: list[str]
    ids: bool
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {name: i for i, name in enumerate(self.names)})

    @classmethod
    def given(cls, names: Iterable[str]) -> Classes:
        """Classes named elsewhere (a run's labels.json): class ids when the names are
        the ids themselves ("0", "1", ...), else names."""
        names = [str(name) for name in names]
        return cls(names, names == [str(i) for i in range(len(names))])

    def as_names(self) -> Classes:
        """The same classes, every label read as a class name."""
        return Classes(self.names, ids=False)


def classes_of(labels: Iterable[Any], num_classes: int | None = None) -> Classes:
    """The classes the training labels define: class ids when every label is one (N =
    `num_classes`, else the largest + 1), else the sorted distinct class names. Labels
    that are missing or invalid take no part."""
    names = [name for name in map(label_name, labels) if name is not None]
    if names and all(class_id(name) is not None for name in names):
        count = num_classes if num_classes is not None else max(map(class_id, names)) + 1
        return Classes([str(i) for i in range(max(count, 0))], ids=True)
    return Classes(sorted(set(names)), ids=False)


def resolve_label(
    value: Any, classes: Classes, missing: str = "the label is empty"
) -> tuple[int | None, tuple[str, str] | None]:
    """(class id, None) for a row's raw label, or (None, (reason, detail)) when it is
    missing, invalid, out of range or unknown; `missing` is the detail of a missing one."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, ("missing label", missing)
    name = label_name(value)
    if name is None:
        kind = type(value).__name__
        return None, (
            "invalid label",
            f"the label {value!r} is a {kind}, not an integer or a string",
        )
    number = class_id(value)
    if classes.ids and number is not None:
        if number < len(classes.names):
            return number, None
        return None, (
            "label out of range",
            f"the label {number} is not a class id in 0..{len(classes.names) - 1}; "
            "set model.num_classes to the number of classes, or fix the row",
        )
    if name in classes.index:
        return classes.index[name], None
    shown = ", ".join(classes.names[:SHOWN_NAMES])
    more = " ..." if len(classes.names) > SHOWN_NAMES else ""
    return None, (
        "unknown label",
        f"the label {name!r} is not one of the training labels ({shown}{more})",
    )
