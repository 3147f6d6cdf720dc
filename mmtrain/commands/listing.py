"""`mmtrain list [GROUP]`: registered components, where each is defined, and the YAML
options of each config group."""

from __future__ import annotations

import dataclasses
import inspect
import textwrap
import typing
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

import mmtrain
from mmtrain import registry, rules
from mmtrain.data.augment import IMAGE, TEXT
from mmtrain.data.augment import RUNTIME as AUGMENT_RUNTIME
from mmtrain.errors import UserError
from mmtrain.models.fusion import FUSION_ARGUMENTS
from mmtrain.spec import BATCH_KEYS, RUNTIME, TrainerConfig

# Config group -> the registry kinds it selects from (fusions are picked by model.fusion,
# augmentations by the entries of data.augment, negatives by data.negative_sampler).
GROUPS = {
    "data": ["data", "image_augment", "text_augment", "negatives"],
    "model": ["model", "fusion"],
    "optimizer": ["optimizer"],
    "scheduler": ["scheduler"],
    "trainer": [],
    "logger": ["logger"],
    "zeroshot": ["zeroshot"],
    "experiment": [],
}
# Keyword arguments mmtrain supplies at run time, not config keys: left out of the tables.
SUPPLIED = {
    **RUNTIME,
    "fusion": FUSION_ARGUMENTS,
    "image_augment": AUGMENT_RUNTIME[IMAGE],
    "text_augment": AUGMENT_RUNTIME[TEXT],
    "negatives": ("text", "rng", "k", "negatives"),
}
_PACKAGE_ROOT = Path(mmtrain.__file__).resolve().parent.parent


def _options(config_dir: Traversable, group: str) -> list[str]:
    folder = config_dir / group
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _summary(fn: object) -> str:
    doc = inspect.getdoc(fn) or ""
    return " ".join(doc.split("\n\n")[0].split())


def defined_at(fn: object) -> str:
    """`path:line` of a component's definition, relative to the installation when inside it."""
    path = Path(inspect.getsourcefile(fn) or "?").resolve()
    line = inspect.getsourcelines(fn)[1]
    shown = path.relative_to(_PACKAGE_ROOT) if path.is_relative_to(_PACKAGE_ROOT) else path
    return f"{shown}:{line}"


def print_listing(config_path: str, config_dir: Traversable, args: list[str]) -> None:
    """One table of every group, or the components of one group with the values a run uses
    (the YAML options', composed as `mmtrain train` composes them) and where each is defined."""
    console = Console()
    if len(args) > 1 or (args and args[0] not in GROUPS):
        raise UserError(
            f"mmtrain list takes at most one group, one of: {', '.join(GROUPS)} (got {' '.join(args)})."
        )
    if not args:
        table = Table(title="mmtrain: config groups and registered components")
        table.add_column("group", style="bold", no_wrap=True)
        table.add_column("config options (GROUP=OPTION)")
        table.add_column("registered components")
        for group, kinds in GROUPS.items():
            components = "; ".join(f"{kind}: {', '.join(registry.names(kind))}" for kind in kinds)
            table.add_row(group, ", ".join(_options(config_dir, group)), components or "-")
        console.print(table)
        console.print(
            "Details of one group (keys, the values a run uses, where each is defined): "
            "mmtrain list GROUP",
            soft_wrap=True,
        )
        return
    _print_group(console, args[0], _composed(config_path, config_dir, args[0]))


def _composed(config_path: str, config_dir: Traversable, group: str) -> dict[str, Any]:
    """Each YAML option of `group` (and "" for the default config) -> the config that
    `mmtrain train GROUP=OPTION` composes, as plain values."""
    from hydra import compose, initialize_config_dir, initialize_config_module
    from omegaconf import OmegaConf

    if config_path.startswith("pkg://"):
        context = initialize_config_module(config_path[len("pkg://") :], version_base=None)
    else:
        context = initialize_config_dir(config_path, version_base=None)
    picks = _options(config_dir, group)
    with context:
        return {
            option: OmegaConf.to_container(
                compose("train", [f"{group}={option}"] if option else [])
            )
            for option in ["", *picks]
        }


def _print_group(console: Console, group: str, configs: dict[str, Any]) -> None:
    console.print(
        f"[bold]{group}[/] config options: {', '.join(o for o in configs if o) or '-'}",
        soft_wrap=True,
    )
    default = configs[""]
    if group == "data":
        console.print(
            f"Keys every data option has: {', '.join(f'data.{k}' for k in BATCH_KEYS)}",
            soft_wrap=True,
        )
    if group == "trainer":
        console.print("trainer keys (typed: a wrong value or an unknown key is an error):")
        for key, hint, _ in _schema_rows(TrainerConfig, "trainer"):
            value = _dig(default, key.split("."))
            console.print(
                f"  {key}={_typed(value)}  [dim]{rules.describe(hint)}[/]", soft_wrap=True
            )
    for kind in GROUPS[group]:
        console.print(f"\n[bold]registered {kind} components[/]", soft_wrap=True)
        for name in registry.names(kind):
            fn = registry.get(kind, name)
            prefix, option, values = _values_in_force(group, kind, name, configs)
            where = f"{group}={option}, " if option else ""
            console.print(f"[bold]{name}[/]  ({where}{defined_at(fn)})", soft_wrap=True)
            summary = textwrap.fill(_summary(fn), max(console.width, 60), initial_indent="  ")
            console.print(escape(summary.replace("\n", "\n  ")), highlight=False, soft_wrap=True)
            for param in inspect.signature(fn).parameters.values():
                if param.name in SUPPLIED.get(kind, ()):
                    continue
                if values is not None and param.name in values:
                    for key, value in _flat(f"{prefix}{param.name}", values[param.name]):
                        console.print(f"    {key}={_typed(value)}", highlight=False, soft_wrap=True)
                elif param.default is not inspect.Parameter.empty:
                    note = "the function's default" + (", not set in the YAML" if values else "")
                    console.print(
                        f"    {prefix}{param.name}={_typed(param.default)}  [dim]({note})[/]",
                        highlight=False,
                        soft_wrap=True,
                    )
    if GROUPS[group]:
        console.print(
            "\nValues: what a run with that option uses (the YAML's; the function's own default "
            "where the YAML sets none). `mmtrain train --cfg job` prints a whole run's config.",
            highlight=False,
            soft_wrap=True,
        )
    if group == "data":
        console.print(
            "Augmentations (training split only) are switched on by probability: "
            "data.augment.flip.p=0.5 data.augment.word_dropout.p=0.1",
            soft_wrap=True,
        )


def _values_in_force(
    group: str, kind: str, name: str, configs: dict[str, Any]
) -> tuple[str, str | None, dict[str, Any] | None]:
    """(the keys' prefix, the option that selects component `name`, the values that option
    gives it); values None where no YAML option configures the component."""
    if kind in ("image_augment", "text_augment"):
        return f"data.augment.{name}.", None, configs[""]["data"]["augment"].get(name)
    if kind == "logger":
        chosen = configs.get(name, {}).get("logger") or {}
        return f"logger.{name}.", (name if name in configs else None), chosen.get(name)
    if kind == group:
        for option, config in configs.items():
            if option and (config.get(group) or {}).get("name") == name:
                return f"{group}.", option, config[group]
    return f"{group}.", None, None


def _flat(key: str, value: Any) -> list[tuple[str, Any]]:
    """A nested mapping as the dotted keys a command line sets."""
    if isinstance(value, dict) and value:
        return [pair for k, v in value.items() for pair in _flat(f"{key}.{k}", v)]
    return [(key, value)]


def _dig(config: dict[str, Any], path: list[str]) -> Any:
    for part in path:
        config = config[part]
    return config


def _typed(value: Any) -> str:
    """`value` as it is typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(_typed(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_typed(v)}" for k, v in value.items()) + "}"
    return str(value)


def _schema_rows(schema: type, prefix: str) -> list[tuple[str, object, object]]:
    """(key, type, default) of every leaf of a schema dataclass (`mmtrain.spec`)."""
    rows = []
    hints = typing.get_type_hints(schema, include_extras=True)
    for field in dataclasses.fields(schema):
        key, hint = f"{prefix}.{field.name}", hints[field.name]
        if dataclasses.is_dataclass(hint):
            rows += _schema_rows(hint, key)
        else:
            rows.append((key, hint, field.default))
    return rows
