"""A small registry: named factory functions per kind, built from config mappings.

    @register("fusion", "concat")
    def concat(image_dim: int, text_dim: int) -> nn.Module: ...

    fusion = build("fusion", {"name": "concat"}, image_dim=64, text_dim=64)

Config keys become keyword arguments; runtime objects (a model, an optimizer) are passed
as keyword arguments to `build`. Both are checked against the function's signature before
it is called, so a typo fails with the accepted names instead of deep inside a constructor,
and so does a value of the wrong type for a parameter annotated int, float, str or bool,
a number that is NaN or infinite, and one outside the `Bounds` a parameter is annotated with:

    def adamw(*, lr: Annotated[float, Bounds(gt=0)] = 3e-4, ...): ...
"""

from __future__ import annotations

import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmtrain.errors import UserError

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}


def register(kind: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering `fn` as component `name` of `kind`; duplicates are an error."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        entries = _REGISTRY.setdefault(kind, {})
        if name in entries:
            raise ValueError(f"{kind} {name!r} is already registered by {entries[name].__module__}")
        entries[name] = fn
        return fn

    return wrap


def names(kind: str) -> list[str]:
    """Sorted names registered under `kind`."""
    return sorted(_REGISTRY.get(kind, {}))


def kinds() -> list[str]:
    """Every kind that has at least one registered component."""
    return sorted(_REGISTRY)


def get(kind: str, name: str) -> Callable[..., Any]:
    """The factory registered as `name`; an unknown name lists the registered ones."""
    entries = _REGISTRY.get(kind, {})
    if name not in entries:
        close = difflib.get_close_matches(str(name), entries, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"Unknown {kind} {name!r}.{hint} Registered {kind} names: {', '.join(names(kind)) or '(none)'}."
        )
    return entries[name]


def accepted(kind: str, name: str, offered: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `offered` that the factory `name` has a parameter for: run-time values
    a caller offers to every component of a kind, of which each takes what it uses."""
    params = inspect.signature(get(kind, name)).parameters
    return {key: value for key, value in offered.items() if key in params}


def _split(kind: str, cfg: Mapping[str, Any] | str) -> tuple[str, dict[str, Any]]:
    if isinstance(cfg, str):
        return cfg, {}
    options = dict(cfg)
    if "name" not in options:
        raise UserError(
            f"The {kind} config has no 'name' key; set one of: {', '.join(names(kind))}."
        )
    return str(options.pop("name")), options


_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class Bounds:
    """The range a numeric parameter accepts, as `typing.Annotated` metadata; for a sequence
    of numbers (Adam's betas) it bounds each element."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def describe(self) -> str:
        parts = [
            f"{word} {limit:g}"
            for word, limit in (
                ("above", self.gt), ("at least", self.ge), ("below", self.lt), ("at most", self.le)
            )
            if limit is not None
        ]  # fmt: skip
        return " and ".join(parts)

    def holds(self, value: float) -> bool:
        return not (
            (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.lt is not None and not value < self.lt)
            or (self.le is not None and not value <= self.le)
        )


def _out_of_range(value: Any, hint: Any) -> str | None:
    """None when the number(s) in `value` are finite and inside the parameter's `Bounds`,
    else what they should be, in words."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(
            (a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Annotated), hint
        )
    bounds = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Bounds)), None)
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    for item in values:
        if not isinstance(item, int | float) or isinstance(item, bool):
            continue
        if not math.isfinite(item):
            return "a finite number" + (f" {bounds.describe()}" if bounds else "")
        if bounds is not None and not bounds.holds(item):
            each = "numbers each " if values is value else ""
            return f"{each}{bounds.describe()}"
    return None


def _wanted(value: Any, hint: Any) -> str | None:
    """None when `value` fits the annotation `hint`, else what it should be, in words. Only
    int, float, str, bool and their unions with None are judged; the factory checks the rest."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        wanted = [_wanted(value, a) for a in args if a is not type(None)]
        if None in wanted:
            return None
        return " or ".join(wanted) + (" or null" if type(None) in args else "")
    if typing.get_origin(hint) is typing.Annotated:
        return _wanted(value, typing.get_args(hint)[0])
    if hint not in _WORDS:
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    fits = {float: number, int: number and isinstance(value, int)}.get(hint, type(value) is hint)
    return None if fits else _WORDS[hint]


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an annotation that names a type only a type checker sees
        return {}


def check(kind: str, cfg: Mapping[str, Any] | str, runtime: Iterable[str] = ()) -> None:
    """Check that `cfg` (plus runtime keyword names) would bind to its factory, building nothing."""
    name, options = _split(kind, cfg)
    fn = get(kind, name)
    runtime = list(runtime)
    signature = inspect.signature(fn)
    params = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [p for p in params if params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    config_keys = [p for p in accepted if p not in runtime]
    where = f"{kind} {name!r}"
    unknown = [key for key in options if key not in params and not takes_any]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, config_keys, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"Unknown key {key!r} for {where}.{hint} Accepted keys: {', '.join(config_keys)}."
        )
    hints = _hints(fn)
    for key, value in options.items():
        wanted = _wanted(value, hints.get(key)) or _out_of_range(value, hints.get(key))
        if wanted:
            raise UserError(f"Key {key!r} of {where} must be {wanted} (got {value!r}).")
    clash = [key for key in options if key in runtime]
    if clash:
        raise UserError(
            f"Key {clash[0]!r} of {where} is supplied by mmtrain at run time; remove it from the config."
        )
    try:
        signature.bind(**options, **dict.fromkeys(runtime))
    except TypeError:
        missing = [
            p
            for p, param in params.items()
            if param.default is inspect.Parameter.empty
            and param.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
            and p not in options
            and p not in runtime
        ]
        raise UserError(
            f"Missing key {missing[0]!r} for {where}; set it in the config "
            f"(e.g. {kind}.{missing[0]}=...). Accepted keys: {', '.join(config_keys)}."
        ) from None


def build(kind: str, cfg: Mapping[str, Any] | str, **runtime: Any) -> Any:
    """Call the factory named by `cfg["name"]` with the other keys plus `runtime`."""
    check(kind, cfg, runtime)
    name, options = _split(kind, cfg)
    return get(kind, name)(**options, **runtime)
