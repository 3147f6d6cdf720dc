"""The package keeps its layers: imports point down only, components register in one place,
and the light commands import no model code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = ROOT / "mmtrain"
# A module may import modules of its own group and of lower layers, nothing else. Groups of
# the same layer do not import each other (models never import data, nor data models).
LAYERS = {
    "mmtrain": 0,  # the empty package itself
    "mmtrain.errors": 0,
    "mmtrain.registry": 1,
    "mmtrain.distributed": 1,
    "mmtrain.config": 1,
    "mmtrain.retrieval": 1,
    "mmtrain.checkpoint": 2,
    "mmtrain.runlog": 2,
    "mmtrain.runlock": 2,
    "mmtrain.metrics": 2,
    "mmtrain.watch": 2,
    "mmtrain.data": 3,
    "mmtrain.models": 3,
    "mmtrain.optim": 3,
    "mmtrain.loggers": 3,
    "mmtrain.components": 4,
    "mmtrain.build": 5,
    "mmtrain.guard": 5,
    "mmtrain.loop": 6,
    "mmtrain.launch": 7,
    "mmtrain.commands": 7,
    "mmtrain.cli": 8,
    "mmtrain.__main__": 9,
}


def group(module: str) -> str:
    """The entry of LAYERS a module belongs to (its longest matching prefix)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return ".".join(parts[:end])
    raise KeyError(f"{module} belongs to no layer; add it to LAYERS in {__file__}")


def module_name(path) -> str:
    relative = path.relative_to(ROOT).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path) -> list[tuple[int, str]]:
    """(line, module) of every mmtrain import in a file, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.append((node.lineno, full if _is_module(full) else node.module))
    return [(line, name) for line, name in found if name.split(".")[0] == "mmtrain"]


def violations(edges: list[tuple[str, str]]) -> list[str]:
    """The edges (importer, imported) that run the wrong way."""
    wrong = []
    for source, target in edges:
        low, high = group(target), group(source)
        if low != high and LAYERS[low] >= LAYERS[high]:
            wrong.append(f"{source} -> {target}")
    return wrong


def package_edges() -> list[tuple[str, str]]:
    return [
        (module_name(path), target)
        for path in sorted(PACKAGE.rglob("*.py"))
        for _, target in imports(path)
    ]


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        group(module_name(path))


def test_imports_point_down_the_layers():
    assert violations(package_edges()) == []


def test_the_check_catches_edges_that_run_the_wrong_way():
    wrong = [
        ("mmtrain.models.negatives", "mmtrain.data.augment"),
        ("mmtrain.data.validate", "mmtrain.models.backbone"),
        ("mmtrain.data.validate", "mmtrain.build"),
        ("mmtrain.distributed", "mmtrain.loop"),
        ("mmtrain.config", "mmtrain.data.augment"),
        ("mmtrain.loop", "mmtrain.launch"),
        ("mmtrain.build", "mmtrain.commands.load"),
    ]
    assert len(violations(wrong)) == len(wrong)
    right = [
        ("mmtrain.data.negatives", "mmtrain.data.augment"),
        ("mmtrain.launch", "mmtrain.loop"),
        ("mmtrain.models.classifier", "mmtrain.metrics"),
        ("mmtrain.cli", "mmtrain.build"),
    ]
    assert violations(right) == []


def test_components_are_registered_by_one_module():
    """Every module that registers components is imported by mmtrain.components, which the
    build and `mmtrain list` import: nothing else imports modules for their side effects."""
    from mmtrain import components

    decorator = re.compile(r"^@(registry\.)?register\(", re.MULTILINE)
    registering = {
        module_name(path) for path in PACKAGE.rglob("*.py") if decorator.search(path.read_text())
    }
    assert registering == {module.__name__ for module in components.MODULES}
    importers = {source for source, target in package_edges() if target == "mmtrain.components"}
    assert importers == {"mmtrain.build", "mmtrain.commands.listing"}


LIGHT_COMMAND = """
import atexit, sys
from mmtrain.cli import main

@atexit.register  # Hydra's --help and --cfg leave through sys.exit
def report():
    heavy = ("torchmetrics", "transformers.models.clip.modeling_clip", "torchvision",
             "matplotlib", "mmtrain.loop")
    print("HEAVY", [m for m in heavy if m in sys.modules])

sys.exit(main({args!r}))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["list", "model"],
        ["--help"],
        ["train", "--help"],
        ["train", "--cfg", "job"],
        ["validate", "data.train_size=16", "data.val_size=8", "data.test_size=8"],
    ],
    ids=lambda args: " ".join(args),
)
def test_light_commands_import_no_model_code(args, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", LIGHT_COMMAND.format(args=args)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
