"""A small registry: named factory functions per kind, built from config mappings.

    @register("fusion", "concat")
    def concat(image_dim: int, text_dim: int) -> nn.Module: ...

    fusion = build("fusion", {"name": "concat"}, image_dim=64, text_dim=64)

Config keys become keyword arguments; runtime objects (a model, an optimizer) are passed
as keyword arguments to `build`. Both are checked against the function's signature before
it is called, so a typo fails with the accepted names instead of deep inside a constructor,
and so does a value that breaks its parameter's annotation (`mmtrain.rules`: types,
choices, bounds):

    def adamw(*, lr: Annotated[float, Bounds(gt=0)] | Literal["auto"] = "auto", ...): ...

`register(kind, name, **facts)` keeps facts about a component that are needed before it is
built (a model's `traits`); `about(kind, name)` returns them.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mmtrain import rules
from mmtrain.errors import UserError

_REGISTRY: dict[str, dict[str, Callable[..., Any]]] = {}
_FACTS: dict[tuple[str, str], dict[str, Any]] = {}


def register(
    kind: str, name: str, **facts: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering `fn` as component `name` of `kind`, with `facts` about it that
    are needed before it is built; duplicates are an error."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        entries = _REGISTRY.setdefault(kind, {})
        if name in entries:
            raise ValueError(f"{kind} {name!r} is already registered by {entries[name].__module__}")
        entries[name] = fn
        _FACTS[kind, name] = facts
        return fn

    return wrap


def about(kind: str, name: str) -> dict[str, Any]:
    """The facts component `name` of `kind` was registered with (an unknown name is a
    UserError listing the registered ones)."""
    get(kind, name)
    return _FACTS.get((kind, name), {})


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
        hint = rules.did_you_mean(name, entries)
        raise UserError(
            f"Unknown {kind} {name!r}.{hint} Registered {kind} names: {', '.join(names(kind)) or '(none)'}."
        )
    return entries[name]


def accepted(kind: str, name: str, offered: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `offered` that the factory `name` has a parameter for: run-time values
    a caller offers to every component of a kind, of which each takes what it uses."""
    params = inspect.signature(get(kind, name)).parameters
    return {key: value for key, value in offered.items() if key in params}


def _name_and_options(kind: str, cfg: Mapping[str, Any] | str) -> tuple[str, dict[str, Any]]:
    if isinstance(cfg, str):
        return cfg, {}
    options = dict(cfg)
    if "name" not in options:
        raise UserError(
            f"The {kind} config has no 'name' key; set one of: {', '.join(names(kind))}."
        )
    return str(options.pop("name")), options


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an annotation that names a type only a type checker sees
        return {}


def check(kind: str, cfg: Mapping[str, Any] | str, runtime: Iterable[str] = ()) -> None:
    """Check that `cfg` (plus runtime keyword names) would bind to its factory, building nothing."""
    name, options = _name_and_options(kind, cfg)
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
        hint = rules.did_you_mean(key, config_keys)
        raise UserError(
            f"Unknown key {key!r} for {where}.{hint} Accepted keys: {', '.join(config_keys)}."
        )
    hints = _hints(fn)
    for key, value in options.items():
        try:
            rules.conform(value, hints.get(key, Any))
        except rules.Mismatch as wrong:
            raise _refusal(wrong, key, where) from None
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


def _refusal(wrong: rules.Mismatch, key: str, where: str) -> UserError:
    """The message of a key's value that breaks its rule (inside a schema: the inner key)."""
    if wrong.accepted is None:
        return UserError(f"Key {wrong.key(key)!r} of {where} must be {wrong} (got {wrong.shown}).")
    return UserError(f"Unknown key {wrong.key(key)!r} for {where}.{wrong.accepted_keys(key)}")


def build(kind: str, cfg: Mapping[str, Any] | str, **runtime: Any) -> Any:
    """Call the factory named by `cfg["name"]` with the other keys plus `runtime`."""
    check(kind, cfg, runtime)
    name, options = _name_and_options(kind, cfg)
    fn = get(kind, name)
    hints = _hints(fn)
    # Checked values as their parameters hold them (an integer given for a number is a float).
    options = {key: rules.conform(value, hints.get(key, Any)) for key, value in options.items()}
    return fn(**options, **runtime)
