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
    "mmtrain.rules": 1,
    "mmtrain.releases": 1,  # earlier releases' configs in this release's keys
    "mmtrain.distributed": 1,
    "mmtrain.retrieval": 1,
    "mmtrain.devices": 1,
    "mmtrain.registry": 2,
    "mmtrain.checkpoint": 2,
    "mmtrain.runlog": 2,
    "mmtrain.runlock": 2,
    "mmtrain.metrics": 2,
    "mmtrain.watch": 2,
    "mmtrain.data": 3,
    "mmtrain.models": 3,
    "mmtrain.tracking": 3,  # what a tracker is told, and the guard it runs in
    "mmtrain.loggers": 4,  # the built-in trackers
    "mmtrain.guard": 3,
    "mmtrain.sharding": 3,  # trainer.strategy=fsdp: FSDP2 and its sharded checkpoints
    "mmtrain.optim": 4,  # built on the model interface
    "mmtrain.evaluation": 4,
    "mmtrain.components": 5,
    "mmtrain.spec": 6,  # the config, checked, as typed values
    "mmtrain.run": 7,  # what the loop receives
    "mmtrain.loop": 8,
    "mmtrain.assemble": 9,  # builds every object of a run: above the loop it feeds
    "mmtrain.recipe": 10,
    "mmtrain.launch": 11,
    "mmtrain.commands": 11,
    "mmtrain.cli": 12,
    "mmtrain.__main__": 13,
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
        ("mmtrain.data.validate", "mmtrain.assemble"),
        ("mmtrain.distributed", "mmtrain.loop"),
        ("mmtrain.rules", "mmtrain.data.augment"),
        ("mmtrain.loop", "mmtrain.launch"),
        ("mmtrain.loop", "mmtrain.assemble"),
        ("mmtrain.assemble", "mmtrain.commands.evaluate"),
        ("mmtrain.spec", "mmtrain.assemble"),
    ]
    assert len(violations(wrong)) == len(wrong)
    right = [
        ("mmtrain.data.negatives", "mmtrain.data.augment"),
        ("mmtrain.launch", "mmtrain.loop"),
        ("mmtrain.models.classifier", "mmtrain.metrics"),
        ("mmtrain.cli", "mmtrain.spec"),
        ("mmtrain.assemble", "mmtrain.loop"),
        ("mmtrain.recipe", "mmtrain.assemble"),
    ]
    assert violations(right) == []


def test_components_are_registered_by_one_module():
    """Every module that registers components is imported by mmtrain.components, which the
    spec imports: nothing else imports modules for their side effects."""
    from mmtrain import components

    decorator = re.compile(r"^@(registry\.)?register\(", re.MULTILINE)
    registering = {
        module_name(path) for path in PACKAGE.rglob("*.py") if decorator.search(path.read_text())
    }
    assert registering == {module.__name__ for module in components.MODULES}
    importers = {source for source, target in package_edges() if target == "mmtrain.components"}
    assert importers == {"mmtrain.spec"}


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


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_modules_and_functions_stay_small():
    """A module past ~400 lines is two modules; a function past ~80 lines, two functions."""
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in _functions(ast.parse(text)):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES:
                long_functions.append(
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines}"
                )
    assert long_modules == [] and long_functions == []


def private_imports(path) -> list[str]:
    """`from mmtrain.x import _name` imports of another module's private names in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmtrain"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_no_module_imports_another_modules_private_names():
    found = {
        str(path.relative_to(ROOT)): names
        for path in sorted(PACKAGE.rglob("*.py"))
        if (names := private_imports(path))
    }
    assert found == {}


# What the commands that work on a run (eval, predict, export, validate) may not import:
# the modules that build a run's objects. They build through mmtrain.assemble.
BUILDERS = (
    "mmtrain.registry",
    "mmtrain.components",
    "mmtrain.data",
    "mmtrain.models",
    "mmtrain.optim",
    "mmtrain.loggers",
)
RUN_COMMANDS = ("evaluate", "predict", "export", "validate", "wise", "soup")
ALLOWED = ("mmtrain.data.source",)  # the split's type (SplitData) and its bad rows (BadRow)


def test_commands_build_through_the_assembler():
    wrong = []
    for name in RUN_COMMANDS:
        path = PACKAGE / "commands" / f"{name}.py"
        for line, target in imports(path):
            if target.startswith(BUILDERS) and not target.startswith(ALLOWED):
                wrong.append(f"commands/{name}.py:{line} imports {target}")
    assert wrong == []
    assert any(t == "mmtrain.assemble" for _, t in imports(PACKAGE / "commands" / "evaluate.py"))


def test_every_module_has_its_line_in_the_readmes_layout():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if path.name == "__init__.py":
            continue
        named = f"{relative}" in layout or (
            relative.parent.name in ("commands", "assemble") and f" {path.name}" in layout
        )
        if not named:
            missing.append(str(relative))
    assert missing == []
