"""mmtrain as a package: the config groups ship inside it, runs work from any folder, and
users add their own config groups beside mmtrain's without forking."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, TINY

# A user's own config groups: an experiment overlay and a new optimizer option.
MINE = """\
# @package _global_
defaults:
  - override /optimizer: careful_adamw
model:
  fusion: concat
trainer:
  max_epochs: 1
"""
CAREFUL_ADAMW = """\
name: adamw
lr: 2.5e-4
weight_decay: 0.01
"""


def write_user_configs(folder: Path) -> Path:
    conf = folder / "conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "optimizer").mkdir()
    (conf / "experiment" / "mine.yaml").write_text(MINE)
    (conf / "optimizer" / "careful_adamw.yaml").write_text(CAREFUL_ADAMW)
    return conf


def run_in(
    folder: Path, command: list[str], env: dict | None = None
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        command,
        cwd=folder,
        env={**base, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_mine_ran(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs"] == 1
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "lr: 0.00025" in config and "fusion: concat" in config


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_users_own_config_groups_join_mmtrains(how, tmp_path):
    conf = write_user_configs(tmp_path)
    where = (
        ["--config-dir", "./conf"]
        if how == "--config-dir"
        else [f"hydra.searchpath=[file://{conf}]"]
    )
    result = run_in(
        tmp_path,
        [sys.executable, "-m", "mmtrain", "train", *where, "experiment=mine", *TINY,
         "trainer.max_epochs=1", "hydra.run.dir=run"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert_mine_ran(tmp_path / "run")


def test_validate_takes_the_users_config_groups_too(tmp_path):
    write_user_configs(tmp_path)
    result = run_in(
        tmp_path,
        [sys.executable, "-m", "mmtrain", "validate", "--config-dir", "./conf", "experiment=mine",
         "data.train_size=32", "data.val_size=16", "data.test_size=16"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Every row is usable." in result.stdout


def test_a_missing_user_option_names_the_options_there_are(tmp_path):
    write_user_configs(tmp_path)
    result = run_in(
        tmp_path,
        [sys.executable, "-m", "mmtrain", "train", "--config-dir", "./conf", "experiment=yours"],
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "experiment" in result.stderr and "mine" in result.stderr and "fast" in result.stderr


@pytest.mark.slow
def test_the_wheel_trains_from_another_folder_in_a_fresh_environment(tmp_path):
    """Build the wheel, install it alone into a new virtual environment that borrows only
    the dependencies (torch, transformers, ...) of this one, and train from a folder far
    from the source tree."""
    dist = tmp_path / "dist"
    build = run_in(
        tmp_path,
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(ROOT)],
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("mmtrain-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmtrain/conf/train.yaml" in names and "mmtrain/conf/model/clip_fusion.yaml" in names

    venv = tmp_path / "venv"
    assert run_in(tmp_path, [sys.executable, "-m", "venv", str(venv)]).returncode == 0
    python = venv / "bin" / "python"
    site = run_in(
        tmp_path, [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    )
    # The dependencies only: .pth files of that folder (this checkout's editable install of
    # mmtrain among them) are not processed when it is added this way.
    Path(site.stdout.strip(), "dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    install = run_in(
        tmp_path, [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    )
    assert install.returncode == 0, install.stderr[-2000:]

    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    where = run_in(elsewhere, [str(python), "-c", "import mmtrain; print(mmtrain.__file__)"])
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr
    mmtrain = str(venv / "bin" / "mmtrain")
    result = run_in(elsewhere, [mmtrain, "train", "experiment=fast", *TINY, "trainer.max_epochs=1"])
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (elsewhere / "outputs").glob("*/*")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"

    write_user_configs(elsewhere)
    result = run_in(
        elsewhere,
        [mmtrain, "train", "--config-dir", "./conf", "experiment=mine", *TINY,
         "trainer.max_epochs=1", "hydra.run.dir=mine"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert_mine_ran(elsewhere / "mine")
    listing = run_in(elsewhere, [mmtrain, "list", "model"])
    assert listing.returncode == 0 and "mmtrain/models/classifier.py:" in listing.stdout


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(requirements: list[str]) -> list[str]:
    """The project names of requirement strings, normalised."""
    return [_normal(re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0]) for r in requirements]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    """Each third-party module that mmtrain imports (at the top or inside a function) comes
    from a distribution pyproject.toml declares, in the core list or in an extra."""
    project = _project()
    core = set(_names(project["dependencies"]))
    declared = core.union(*map(_names, project["optional-dependencies"].values()))
    imported = set()
    for path in (ROOT / "mmtrain").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"mmtrain"}
    providers = importlib.metadata.packages_distributions()
    undeclared = {
        module: providers.get(module)
        for module in third_party
        if not {_normal(d) for d in providers.get(module, [module])} & declared
    }
    assert undeclared == {}
    assert {"pyyaml", "numpy"} <= core  # yaml is imported by the core, not only by extras


def test_the_all_extra_holds_every_integration():
    extras = _project()["optional-dependencies"]
    integrations = set(extras) - {"all", "dev"}
    assert {"tensorboard", "wandb", "mlflow", "sweep"} <= integrations
    (everything,) = extras["all"]
    assert everything == f"mmtrain[{','.join(sorted(integrations, key=list(extras).index))}]"
    assert "mmtrain[all]" in extras["dev"]  # `make test` installs what every test needs


def test_make_train_installs_the_core_package_and_make_test_the_dev_extras(tmp_path):
    """`make -n` prints what each target would run, from a fresh checkout's point of view."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    venv = tmp_path / "venv"
    train = run_in(ROOT, ["make", "-n", "train", f"VENV={venv}"]).stdout
    assert "pip install -q -e .\n" in train and "[dev" not in train
    (venv).mkdir()
    (venv / ".installed-core").touch()  # after `make train`, `make test` still adds the extras
    test = run_in(ROOT, ["make", "-n", "test", f"VENV={venv}"]).stdout
    assert "pip install -q -e '.[dev]'" in test and "pytest" in test
