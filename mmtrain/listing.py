"""`mmtrain list [GROUP]`: registered components and the YAML options of each config group."""

from __future__ import annotations

import inspect
from pathlib import Path

from rich.console import Console
from rich.table import Table

import mmtrain.setup  # noqa: F401  (registers every component)
from mmtrain import registry
from mmtrain.config import SOURCE_RUNTIME
from mmtrain.data.augment import IMAGE, TEXT
from mmtrain.data.augment import RUNTIME as RUNTIME_ARGS
from mmtrain.errors import UserError

# Config group -> the registry kinds it selects from (fusions are picked by model.fusion,
# augmentations by the entries of data.augment).
GROUPS = {
    "data": ["data", "image_augment", "text_augment"],
    "model": ["model", "fusion"],
    "optimizer": ["optimizer"],
    "scheduler": ["scheduler"],
    "trainer": [],
    "experiment": [],
}
# Keyword arguments mmtrain supplies at run time, not config keys: left out of the tables.
RUNTIME = {
    "data": ("image_size", *SOURCE_RUNTIME),
    "image_augment": RUNTIME_ARGS[IMAGE],
    "text_augment": RUNTIME_ARGS[TEXT],
}


def _options(config_dir: Path, group: str) -> list[str]:
    return sorted(path.stem for path in (config_dir / group).glob("*.yaml"))


def _summary(fn: object) -> str:
    doc = inspect.getdoc(fn) or ""
    return " ".join(doc.split("\n\n")[0].split())


def print_listing(config_dir: Path, args: list[str]) -> None:
    """One table of every group, or the components of one group with their keys."""
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
        console.print("Details of one group: mmtrain list GROUP")
        return
    group = args[0]
    console.print(
        f"[bold]{group}[/] config options: {', '.join(_options(config_dir, group)) or '-'}"
    )
    for kind in GROUPS[group]:
        table = Table(title=f"registered {kind} components")
        table.add_column("name", style="bold")
        table.add_column("keys (defaults)")
        table.add_column("description")
        for name in registry.names(kind):
            fn = registry.get(kind, name)
            keys = [
                f"{p.name}={p.default!r}" if p.default is not inspect.Parameter.empty else p.name
                for p in inspect.signature(fn).parameters.values()
                if p.name not in RUNTIME.get(kind, ())
            ]
            table.add_row(name, ", ".join(keys), _summary(fn))
        console.print(table)
    if group == "data":
        console.print(
            "Augmentations (training split only) are switched on by probability: "
            "data.augment.flip.p=0.5 data.augment.word_dropout.p=0.1"
        )
