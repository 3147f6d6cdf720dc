"""What a config value may be, declared beside its key, and the one check of it.

A key's type annotation is its rule: `int`, `float`, `str`, `bool`, lists of them
(`list[str]`, `Sequence[float]`), mappings (`dict[str, str]`), a union with None (the key
may be null), `typing.Literal` (a choice among words), `typing.Annotated` with `Bounds` (a
numeric range; for a list of numbers, each element's), and a dataclass (a schema: a
mapping of its fields, each with its own rule, unknown keys refused):

    lr: Annotated[float, Bounds(gt=0)] | Literal["auto"] = "auto"
    precision: Literal["auto", "32", "bf16", "16"] = "auto"

The registry applies it to a factory's parameters and `mmtrain.spec` to the trainer and
batching schemas: one mechanism, one wording (`describe`). What it does not
judge (the values inside a mapping, objects) is left to the code that uses them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bounds:
    """The range a number accepts, as `typing.Annotated` metadata."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def holds(self, value: float) -> bool:
        return not (
            (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.lt is not None and not value < self.lt)
            or (self.le is not None and not value <= self.le)
        )

    def limits(self) -> str:
        """The range in symbols: ">= 0 and < 1"."""
        pairs = [(">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le)]
        return " and ".join(f"{op} {_number(limit)}" for op, limit in pairs if limit is not None)

    def describe(self, noun: str) -> str:
        """`noun` ("an integer", "a number") within this range, in words."""
        positive = {"an integer": "a positive integer", "a number": "a positive number"}
        if self == Bounds(gt=0) or (self == Bounds(ge=1) and noun == "an integer"):
            return positive[noun]
        return f"{noun} {self.limits()}"


def _number(limit: float) -> str:
    """A limit as it reads best: 4294967295, not 4.29497e+09; 0.5 as 0.5."""
    return str(int(limit)) if float(limit).is_integer() else f"{limit:g}"


# A seed every generator takes (python, numpy, torch): numpy's are 32-bit.
Seed = typing.Annotated[int, Bounds(ge=0, le=2**32 - 1)]


class Mismatch(ValueError):
    """A value that breaks its key's rule; the message says what the key takes. Inside a
    schema (a dataclass), `path` leads to the key that breaks it, `value` is that key's
    value, and `accepted` lists the schema's keys when the key is not one of them."""

    def __init__(
        self, wanted: str, value: Any, path: tuple[str, ...] = (), accepted: list[str] | None = None
    ):
        super().__init__(wanted)
        self.value, self.path, self.accepted = value, path, accepted

    @property
    def shown(self) -> str:
        """The value as a message quotes it: cut short when it is long (a 400-digit number)."""
        text = repr(self.value)
        return text if len(text) <= 60 else f"{text[:40]}...({len(text)} characters)"

    def key(self, root: str) -> str:
        """The dotted key that breaks the rule, from `root` (the key the value was given as)."""
        return ".".join((root, *self.path))

    def accepted_keys(self, root: str) -> str:
        """For a key the schema does not have: a did-you-mean hint and the keys it accepts."""
        parent = ".".join((root, *self.path[:-1]))
        hint = did_you_mean(self.path[-1], self.accepted or [], cutoff=0.5)
        return f"{hint} Accepted keys of {parent}: {', '.join(self.accepted or [])}."


def did_you_mean(name: str, names: Iterable[str], cutoff: float = 0.6) -> str:
    """ " Did you mean 'x'?" with the name of `names` closest to a mistyped `name`, or ""."""
    close = difflib.get_close_matches(str(name), list(names), n=1, cutoff=cutoff)
    return f" Did you mean {close[0]!r}?" if close else ""


_NOUNS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _alternatives(hint: Any) -> tuple[list[Any], bool]:
    """The non-None members of a union (or the hint alone), and whether None is one."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return [a for a in args if a is not type(None)], type(None) in args
    return [hint], hint is type(None)


def _parts(hint: Any) -> tuple[Any, Bounds | None]:
    if typing.get_origin(hint) is typing.Annotated:
        base, *meta = typing.get_args(hint)
        return base, next((m for m in meta if isinstance(m, Bounds)), None)
    return hint, None


def _length(base: Any) -> int | None:
    """The fixed length of a tuple[X, X] annotation (None for lists and tuple[X, ...])."""
    args = typing.get_args(base)
    if typing.get_origin(base) is tuple and args and Ellipsis not in args:
        return len(args)
    return None


_INT_LIMIT = 2**63  # every integer key is a count, a size or a seed: torch holds it in 64 bits


def _too_large(value: Any) -> bool:
    """An integer beyond what a float holds (a 400-digit number)."""
    return (
        isinstance(value, int) and not isinstance(value, bool) and abs(value) > sys.float_info.max
    )


def _sequence_item(base: Any) -> Any:
    """The element type of Sequence[X] / list[X] / tuple[X, ...] / tuple[X, X] (Any when
    mixed), else None."""
    if typing.get_origin(base) not in (list, tuple, Sequence):
        return None
    args = [a for a in typing.get_args(base) if a is not Ellipsis]
    return args[0] if args and all(a == args[0] for a in args) else Any


def _is_mapping(base: Any) -> bool:
    return typing.get_origin(base) in (dict, Mapping) or base in (dict, Mapping)


def describe(hint: Any) -> str:
    """What a key of type `hint` takes, in words: "a positive integer or null",
    "one of: auto, 32, bf16, 16", "a number > 0 or auto"."""
    options, nullable = _alternatives(hint)
    words: list[str] = []
    for option in options:
        base, bounds = _parts(option)
        if typing.get_origin(base) is typing.Literal:
            choices = ", ".join(map(str, typing.get_args(base)))
            words.append(f"one of: {choices}" if len(options) == 1 else choices)
        elif base in _NOUNS:
            noun = _NOUNS[base]
            words.append(bounds.describe(noun) if bounds and base in (int, float) else noun)
        elif (item := _sequence_item(base)) is not None:
            noun = f"a list of {_PLURALS[item]}" if item in _PLURALS else "a list"
            if (length := _length(base)) is not None:
                noun = noun.replace("a list of", f"a list of {length}", 1)
            words.append(noun + (f", each {bounds.limits()}" if bounds else ""))
        elif _is_mapping(base):
            words.append("a mapping")
        elif dataclasses.is_dataclass(base):
            keys = ", ".join(f.name for f in dataclasses.fields(base))
            words.append(f"a mapping of its keys ({keys})")
        else:
            words.append(getattr(base, "__name__", str(base)))
    return " or ".join(words) + (" or null" if nullable else "")


def _one(value: Any, base: Any, bounds: Bounds | None) -> tuple[bool, Any]:
    """(fits, the value as the key holds it) for one alternative of a union."""
    if typing.get_origin(base) is typing.Literal:
        choices = typing.get_args(base)
        # YAML and the command line read `precision: 16` as a number; the choice is "16".
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        return value in choices, value
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if base is float:
        if not number or _too_large(value) or not math.isfinite(value):
            return False, value
        value = float(value)
    elif base is int:
        if not number or not isinstance(value, int) or abs(value) >= _INT_LIMIT:
            return False, value
    elif base in (str, bool):
        return type(value) is base, value
    elif (item := _sequence_item(base)) is not None:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            return False, value
        if (length := _length(base)) is not None and len(value) != length:
            return False, value
        if dataclasses.is_dataclass(item):  # a list of schemas: each entry by its rules
            return True, [_entry(v, item, place) for place, v in enumerate(value)]
        fits = [_one(v, item, bounds) for v in value]
        items = [v for _, v in fits]
        return all(ok for ok, _ in fits), tuple(items) if isinstance(value, tuple) else items
    elif _is_mapping(base):
        return isinstance(value, Mapping), value
    elif dataclasses.is_dataclass(base):  # a schema takes a mapping (see conform)
        return False, value
    else:
        return True, value
    return bounds is None or bounds.holds(value), value


def _entry(value: Any, schema: type, place: int) -> Any:
    """Entry `place` of a list of `schema`s, with its place in a mismatch's path."""
    try:
        return conform(value, schema)
    except Mismatch as inner:
        path = (str(place), *inner.path)
        raise Mismatch(str(inner), inner.value, path, inner.accepted) from None


def _schema(value: Any, schema: type) -> Any:
    """The dataclass `schema` made of the mapping `value`, each field conformed to its rule."""
    hints = typing.get_type_hints(schema, include_extras=True)
    names = [f.name for f in dataclasses.fields(schema)]
    kept = {}
    for key, item in value.items():
        if key not in hints:
            raise Mismatch("one of its keys", item, (str(key),), names)
        try:
            kept[key] = conform(item, hints[key])
        except Mismatch as inner:
            raise Mismatch(str(inner), inner.value, (key, *inner.path), inner.accepted) from None
    return schema(**kept)


def conform(value: Any, hint: Any) -> Any:
    """`value` as a key of type `hint` holds it (an integer where a number is asked becomes
    a float, a number where a word is chosen becomes that word, a mapping where a schema is
    asked becomes the schema's dataclass); `Mismatch` when it breaks the rule."""
    options, nullable = _alternatives(hint)
    if value is None and nullable:
        return None
    for option in options:
        base = _parts(option)[0]
        if dataclasses.is_dataclass(base) and isinstance(value, base):
            return value
        if dataclasses.is_dataclass(base) and isinstance(value, Mapping):
            return _schema(value, base)
    for option in options:
        ok, converted = _one(value, *_parts(option))
        if ok:
            return converted
    wanted = describe(hint)
    if _too_large(value) or (isinstance(value, float) and not math.isfinite(value)):
        wanted = wanted.replace("a positive number", "a finite positive number")
        wanted = wanted.replace("a number", "a finite number")
    if isinstance(value, int) and abs(value) >= _INT_LIMIT and "integer" in wanted:
        wanted += f" (below {_INT_LIMIT:,})"
    raise Mismatch(wanted, value)
