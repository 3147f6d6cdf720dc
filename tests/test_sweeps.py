"""Sweeps through Hydra's launchers and sweepers, and `mmtrain report` over them."""

import json

import pytest
import yaml
from conftest import TINY, run_cli

ONE_EPOCH = [*TINY, "trainer.max_epochs=1"]


def test_report_sorts_jobs_by_metric_and_shows_failures(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train", "-m", "optimizer.lr=1e-3,-1,3e-3", *ONE_EPOCH, f"hydra.sweep.dir={sweep}"
    )
    assert result.returncode != 0  # one job failed, and the sweep says so ...
    assert (
        "Key 'lr' of optimizer 'adamw' must be a positive number or auto (got -1)" in result.stderr
    )
    for job in ("0", "2"):  # ... after running the others
        assert json.loads((sweep / job / "summary.json").read_text())["status"] == "completed"

    result = run_cli("report", str(sweep))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(lines) == 3
    assert "failed" in lines[-1] and "-1" in lines[-1]  # no metric: sorted last
    values = [
        json.loads((sweep / job / "summary.json").read_text())["best"]["value"]
        for job in ("0", "2")
    ]
    first_job = "0" if values[0] >= values[1] else "2"
    assert lines[0].split("│")[1].strip() == first_job
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_a_wrong_directory_is_a_clear_error(tmp_path):
    result = run_cli("report", str(tmp_path))
    assert result.returncode == 2 and "holds no job folders" in result.stderr
    result = run_cli("report", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "is not a directory" in result.stderr


@pytest.mark.slow
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optimizer.lr=1e-3,3e-4",
        *ONE_EPOCH, f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_optuna_sweeper_maximises_what_train_returns(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",  # mmtrain sets the direction
        "optimizer.lr=tag(log,interval(1e-4,1e-2))", *ONE_EPOCH, f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    values = [
        json.loads((sweep / str(i) / "summary.json").read_text())["best"]["value"] for i in range(3)
    ]
    assert best == pytest.approx(max(values))


@pytest.mark.slow
def test_submitit_local_runs_a_sweep_that_report_reads(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
        "optimizer.lr=1e-3,3e-4", *ONE_EPOCH, f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    for job, lr in (("0", "0.001"), ("1", "0.0003")):
        assert f"optimizer.lr={lr}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert json.loads((sweep / job / "summary.json").read_text())["status"] == "completed"
    report = run_cli("report", str(sweep))
    assert report.returncode == 0, report.stderr
    rows = [line.split("│")[1].strip() for line in report.stdout.splitlines() if "│" in line]
    assert sorted(rows) == ["0", "1"]  # the jobs, not submitit's own folder


@pytest.mark.parametrize(
    ("override", "extra"),
    [("hydra/launcher=submitit_slurm", "slurm"), ("hydra/sweeper=optuna", "sweep")],
)
def test_a_missing_hydra_plugin_is_refused_with_its_install_command(monkeypatch, override, extra):
    import importlib.util

    from mmtrain.errors import UserError
    from mmtrain.launch import require_plugins

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=rf"pip install 'mmtrain\[{extra}\]'"):
        require_plugins(["-m", override, "optimizer.lr=1e-3,3e-4"])
    monkeypatch.undo()
    require_plugins(["-m", "optimizer.lr=1e-3,3e-4"])  # no plugin asked for: nothing to check
