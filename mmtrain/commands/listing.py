"""`mmtrain list [GROUP]`: registered components, where each is defined, and the YAML
options of each config group."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from importlib.resources.abc import Traversable
from pathlib import Path

from rich.console import Console
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


def print_listing(config_dir: Traversable, args: list[str]) -> None:
    """One table of every group, or the components of one group with their keys and files."""
    console = Console()
    if len(args) > 1 or (args and args[0] not in GROUPS):
        raise UserError(
            f"mmtrain list takes at most one group, one of: {', '.join(GROUPS)} (got {' '.join(args)})."
        )
    if not args:
        table = Table(title="mmtrain: config groups and registered components")
        table.add_column("group", style="bold")
        table.add_column("config options (GROUP=OPTION)")
        table.add_column("registered components")
        for group, kinds in GROUPS.items():
            components = "; ".join(f"{kind}: {', '.join(registry.names(kind))}" for kind in kinds)
            table.add_row(group, ", ".join(_options(config_dir, group)), components or "-")
        console.print(table)
        console.print(
            "Details of one group (keys, defaults, where each is defined): mmtrain list GROUP"
        )
        return
    group = args[0]
    console.print(
        f"[bold]{group}[/] config options: {', '.join(_options(config_dir, group)) or '-'}"
    )
    if group == "data":
        console.print(f"Keys every data option has: {', '.join(f'data.{k}' for k in BATCH_KEYS)}")
    if group == "trainer":
        table = Table(title="trainer keys (typed: a wrong value or an unknown key is an error)")
        table.add_column("key", style="bold")
        table.add_column("takes")
        table.add_column("default")
        for key, hint, default in _schema_rows(TrainerConfig, "trainer"):
            table.add_row(key, rules.describe(hint), repr(default))
        console.print(table)
    for kind in GROUPS[group]:
        table = Table(title=f"registered {kind} components")
        table.add_column("name", style="bold")
        table.add_column("keys (defaults)")
        table.add_column("description")
        table.add_column("defined at", no_wrap=True)
        for name in registry.names(kind):
            fn = registry.get(kind, name)
            keys = [
                f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty else p.name
                for p in inspect.signature(fn).parameters.values()
                if p.name not in SUPPLIED.get(kind, ())
            ]
            table.add_row(name, ", ".join(keys), _summary(fn), defined_at(fn))
        console.print(table)
    if GROUPS[group]:
        console.print(
            "The defaults shown are the functions' own; each YAML option sets its values "
            "(`mmtrain train --cfg job` prints what a run uses).",
            highlight=False,
        )
    if group == "data":
        console.print(
            "Augmentations (training split only) are switched on by probability: "
            "data.augment.flip.p=0.5 data.augment.word_dropout.p=0.1"
        )


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
