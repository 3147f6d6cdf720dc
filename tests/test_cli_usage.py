"""What the command line says about itself: its version, each command's usage, and the
values `mmtrain list GROUP` shows."""

import inspect
import re

import pytest
import yaml
from conftest import CONF, ROOT

import mmtrain
from mmtrain.cli import COMMANDS, main


def test_version_is_the_packages(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"mmtrain {mmtrain.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", mmtrain.__version__)
    assert 'version = {attr = "mmtrain.__version__"}' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "train"])
def test_each_command_prints_its_own_usage(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as leaving:  # eval, predict and export leave through parse_args
        code = leaving.code
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(f"mmtrain {command} ")  # its own usage line, not train's or an error
    for other in COMMANDS:
        assert other == command or f"mmtrain {other} " not in out.splitlines()[0]


def test_list_shows_the_yaml_values_whole_at_80_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["list", "data"]) == 0
    lines = capsys.readouterr().out.splitlines()
    augment = yaml.safe_load((CONF / "data" / "augment" / "default.yaml").read_text())
    from mmtrain.data.augment import flip

    # flip is off in the YAML (what a run uses), on by half in the function's own default
    assert augment["flip"]["p"] != inspect.signature(flip).parameters["p"].default
    assert f"    data.augment.flip.p={augment['flip']['p']}" in lines
    ratio = ",".join(str(v) for v in augment["random_resized_crop"]["ratio"])
    assert f"    data.augment.random_resized_crop.ratio=[{ratio}]" in lines  # 50 characters, whole
    shapes = yaml.safe_load((CONF / "data" / "shapes.yaml").read_text())
    assert f"    data.train_size={shapes['train_size']}" in lines
