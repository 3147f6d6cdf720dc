"""Experiment trackers, read back offline with each tracker's own reader: TensorBoard's event
reader, MlflowClient on a local store, and W&B's offline run folder (its transaction log)."""

from __future__ import annotations

import csv
import json
import math
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CONF, ROOT, TINY, read_jsonl, run_cli
from hydra import compose, initialize_config_dir

from mmtrain import loggers
from mmtrain.errors import UserError
from mmtrain.runlog import MetricsLog
from mmtrain.spec import parse

ALL = "logger=[tensorboard,wandb,mlflow,csv]"


def tracker_env(tmp_path: Path) -> dict[str, str]:
    """W&B offline; MLflow in a store of the test's own (its file store, which MLflow 3 keeps
    behind a flag)."""
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
    }


def mlflow_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient((tmp_path / "mlruns").as_uri())


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event of every event file in `folder`, in file order: (step, value) per tag."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    point = (event.step, value.tensor.float_val[0])
                    found.setdefault(value.tag, []).append(point)
    return found


def wandb_records(run_file: Path):
    """The records of a W&B run file (run-ID.wandb): a LevelDB-style log of protobufs, in
    32 KiB blocks after a 7-byte header, each record chunk with a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunk)
            yield record
            chunk = b""


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B nests "train/loss" as ["train", "loss"]


def wandb_run(run_dir: Path) -> dict:
    """What the offline folders of RUN_DIR/wandb hold: ids, run records, history, exits."""
    out = {"ids": set(), "runs": [], "history": [], "summary": {}, "exit": []}
    for run_file in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out["ids"].add(record.run.run_id)
                out["runs"].append(record.run)
            elif kind == "history":
                row = {_key(item): json.loads(item.value_json) for item in record.history.item}
                out["history"].append(row)
            elif kind == "summary":
                for item in record.summary.update:
                    out["summary"][_key(item)] = json.loads(item.value_json)
            elif kind == "exit":
                out["exit"].append(record.exit.exit_code)
    return out


def assert_same_points(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    """The same steps, and the same values up to metrics.jsonl's rounding."""
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [value for _, value in got] == pytest.approx([v for _, v in expected], abs=1e-5)


def logged(run_dir: Path, name: str) -> list[tuple[int, float]]:
    return [(e["step"], e[name]) for e in read_jsonl(run_dir / "metrics.jsonl") if name in e]


@pytest.mark.slow  # W&B's service starts and stops (~30-90 s here)
def test_every_sink_gets_config_metrics_run_dir_and_outcome(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", *TINY, ALL, "optimizer.lr=0.002", "logger.wandb.tags=[tiny,ci]",
        "logger.mlflow.experiment=tiny", f"hydra.run.dir={run_dir}", env=tracker_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    losses, accuracy = logged(run_dir, "train/loss"), logged(run_dir, "val/accuracy")
    assert len(losses) == 8 and len(accuracy) == 2
    ids = json.loads((run_dir / "trackers.json").read_text())

    # TensorBoard, in the run directory, through its EventAccumulator.
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    board = EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}
    )
    board.Reload()
    for name, expected in (("train/loss", losses), ("val/accuracy", accuracy)):
        points = [(e.step, e.tensor_proto.float_val[0]) for e in board.Tensors(name)]
        assert_same_points(points, expected)
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        board.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info.hparams
    assert hparams["optimizer.lr"].number_value == pytest.approx(0.002)
    assert hparams["model.name"].string_value == "clip_fusion"
    text = {
        tag: board.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
        for tag in board.Tags()["tensors"]
        if tag.endswith("/text_summary")
    }
    assert '"status": "completed"' in text["summary/text_summary"]
    assert str(run_dir) in text["run_dir/text_summary"]

    # MLflow: params, metric history with steps, status, the summary artifact.
    client = mlflow_client(tmp_path, monkeypatch)
    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED" and run.data.tags["mmtrain.status"] == "completed"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.data.params["optimizer.lr"] == "0.002"
    assert run.data.params["in_force.trainer.samples_per_step"] == "32"
    assert "curves.png" in [artifact.path for artifact in client.list_artifacts(ids["mlflow"])]
    assert run.data.tags["mmtrain.run_dir"] == str(run_dir)
    history = [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "train/loss")]
    assert_same_points(history, losses)
    assert len(client.get_metric_history(ids["mlflow"], "val/accuracy")) == 2
    summary = json.loads(Path(client.download_artifacts(ids["mlflow"], "summary.json")).read_text())
    assert summary == json.loads((run_dir / "summary.json").read_text())

    # W&B: the offline run folder in the run directory.
    wandb = wandb_run(run_dir)
    assert wandb["ids"] == {ids["wandb"]}
    record = wandb["runs"][0]
    assert record.project == "mmtrain" and list(record.tags) == ["tiny", "ci"]
    config = {item.key: json.loads(item.value_json) for item in record.config.update}
    assert config["optimizer"]["lr"] == 0.002
    assert config["in_force"]["optimizer"]["lr"] == 0.002
    assert config["in_force"]["trainer"]["precision"] == "32"
    pictures = [row for row in wandb["history"] if "curves/_type" in row]  # nested keys
    assert len(pictures) == 1 and pictures[0]["curves/_type"] == "image-file"
    assert pictures[0]["_step"] == 16 and pictures[0]["curves/path"].endswith(".png")
    wandb_losses = [
        (row["_step"], row["train/loss"]) for row in wandb["history"] if "train/loss" in row
    ]
    assert_same_points(wandb_losses, losses)
    assert wandb["summary"]["summary/status"] == "completed"
    assert wandb["summary"]["run_dir"] == str(run_dir)
    assert wandb["exit"] == [0]

    # CSV: a row per event, the same numbers.
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    table = [(int(r["step"]), float(r["train/loss"])) for r in rows if r["train/loss"]]
    assert_same_points(table, losses)
    assert "lr: 0.002" in (run_dir / "csv" / "hparams.yaml").read_text()
    assert "in_force:" in (run_dir / "csv" / "hparams.yaml").read_text()


@pytest.mark.slow  # W&B's service starts and stops (~30-90 s here)
def test_an_interrupted_and_resumed_run_is_one_tracked_run_with_each_step_once(
    tmp_path, monkeypatch
):
    """SIGTERM mid-run, then trainer.resume=auto: the same W&B and MLflow runs reopen, and
    every sink holds each step once; curves.png is drawn before the run ends."""
    run_dir, env = tmp_path / "run", tracker_env(tmp_path)
    args = [*TINY, ALL, "trainer.max_epochs=6", "trainer.log_every_n_steps=1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "mmtrain", "train", *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env={**__import__("os").environ, **env, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 180
    while not (run_dir / "curves.png").exists() and time.time() < deadline:
        time.sleep(0.05)
    # The first validation has drawn the curves of a run that is still training.
    assert (run_dir / "curves.png").exists() and not (run_dir / "summary.json").exists()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "Interrupted by SIGTERM" in stderr, stderr
    stopped = json.loads((run_dir / "summary.json").read_text())["steps"]
    assert 8 <= stopped < 48
    ids = json.loads((run_dir / "trackers.json").read_text())
    client = mlflow_client(tmp_path, monkeypatch)
    assert client.get_run(ids["mlflow"]).info.status == "KILLED"

    result = run_cli("train", *args, "trainer.resume=auto", f"hydra.run.dir={run_dir}", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    steps = list(range(1, 49))
    assert [s for s, _ in logged(run_dir, "train/loss")] == steps

    run = client.get_run(ids["mlflow"])
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "train/loss")] == steps
    assert len(client.get_metric_history(ids["mlflow"], "val/loss")) == 6

    board = tb_scalars(run_dir / "tensorboard")
    assert [s for s, _ in board["train/loss"]] == steps
    assert [s for s, _ in board["val/loss"]] == [8, 16, 24, 32, 40, 48]

    wandb = wandb_run(run_dir)
    assert wandb["ids"] == {ids["wandb"]}  # two offline folders, one W&B run
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 2
    assert [r["_step"] for r in wandb["history"] if "train/loss" in r] == steps
    assert wandb["exit"][-1] == 0

    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == steps


@pytest.mark.slow  # W&B's service starts and stops (~30-90 s here)
def test_a_sweep_is_one_tracked_run_per_job_grouped_by_the_sweep(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "train", "-m", *TINY, "trainer.max_epochs=1", "logger=[wandb,mlflow]",
        "optimizer.lr=0.001,0.002", f"hydra.sweep.dir={sweep}", env=tracker_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    client = mlflow_client(tmp_path, monkeypatch)
    runs = client.search_runs([client.get_experiment_by_name("mmtrain").experiment_id])
    assert sorted(r.data.params["optimizer.lr"] for r in runs) == ["0.001", "0.002"]
    assert {r.data.tags["mmtrain.sweep"] for r in runs} == {str(sweep)}
    assert sorted(r.info.run_name for r in runs) == [
        "0: optimizer.lr=0.001",
        "1: optimizer.lr=0.002",
    ]
    records = [wandb_run(sweep / job)["runs"][0] for job in ("0", "1")]
    assert records[0].run_id != records[1].run_id
    assert {r.run_group for r in records} == {str(sweep)}


class Recorder:
    def __init__(self):
        self.calls = []

    def log(self, step, epoch, metrics):
        self.calls.append((step, sorted(metrics)))

    def finish(self, status, summary):
        self.calls.append(("finish", status))


class FullDisk(Recorder):
    """A tracker whose store's disk fills after its first write."""

    def log(self, step, epoch, metrics):
        if self.calls:
            raise OSError(28, "No space left on device")
        super().log(step, epoch, metrics)

    def finish(self, status, summary):
        raise OSError(28, "No space left on device")


def test_a_tracker_failing_mid_run_is_one_warning_and_is_marked_failed(tmp_path, caplog):
    full, fine = loggers.Guarded("mlflow", FullDisk()), loggers.Guarded("csv", Recorder())
    metrics = MetricsLog(tmp_path, sinks=[full, fine])
    with caplog.at_level("WARNING", logger="mmtrain"):
        for step in range(1, 5):
            metrics.log(step, 0, {"train/loss": 1.0 / step})
        for sink in (full, fine):
            sink.picture("curves", tmp_path / "curves.png", 4)  # Recorders take no pictures
        states = loggers.states(metrics.sinks)
        metrics.finish("completed", {"status": "completed"})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "the mlflow tracker failed (OSError:" in warnings[0]
    assert states == {"mlflow": "failed: OSError: [Errno 28] No space left on device", "csv": "ok"}
    assert full.sink.calls == [(1, ["train/loss"])]  # nothing more was tried after the failure
    assert fine.sink.calls[-1] == ("finish", "completed") and len(fine.sink.calls) == 5


def test_a_failed_tracker_leaves_the_run_whole_and_trackers_get_what_is_in_force(tmp_path):
    """A CSV table that cannot be written (its file is a folder) mid-run: the run completes,
    warns once and marks it failed; TensorBoard has the values in force and the curves."""
    run_dir = tmp_path / "run"
    (run_dir / "csv" / "metrics.csv").mkdir(parents=True)
    result = run_cli(
        "train", *TINY, "trainer.max_epochs=1", "logger=[tensorboard,csv]",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    log = (run_dir / "train.log").read_text()
    assert log.count("the csv tracker failed") == 1, log
    assert "Traceback" not in result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["trackers"]["tensorboard"] == "ok"
    assert summary["trackers"]["csv"].startswith("failed: IsADirectoryError")

    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    board = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    board.Reload()
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        board.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    ).session_start_info.hparams
    assert hparams["optimizer.lr"].string_value == "auto"  # as written, and as in force:
    assert hparams["in_force.optimizer.lr"].number_value == pytest.approx(1e-3 * 32 / 64)
    assert hparams["in_force.trainer.precision"].string_value == "32"
    assert hparams["in_force.trainer.samples_per_step"].number_value == 32
    image = board.Tensors("curves")[-1]
    assert image.step == 8 and image.tensor_proto.string_val[2][:4] == b"\x89PNG"


def test_a_resumed_log_sends_the_trackers_only_what_they_lack(tmp_path):
    """A run that crashed after its checkpoint at step 3 had logged steps 4-5 (step 5 without
    its validation); resumed at 3, it logs 4-6 again: the trackers get only the new pairs."""
    first = MetricsLog(tmp_path)
    for step in range(1, 6):
        first.log(step, 0, {"train/loss": 1.0 / step})
    first.log(3, 0, {"val/loss": 0.5})
    resumed, recorder = MetricsLog(tmp_path, sinks=[Recorder()]), None
    recorder = resumed.sinks[0]
    resumed.truncate_after(3)
    for step in range(4, 7):
        resumed.log(step, 0, {"train/loss": 1.0 / step})
        resumed.log(step, 0, {"val/loss": 0.5}) if step == 5 else None
    resumed.finish("completed", {})
    resumed.close(RuntimeError("already finished: nothing more is sent"))
    assert recorder.calls == [(5, ["val/loss"]), (6, ["train/loss"]), ("finish", "completed")]
    assert [e["step"] for e in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 3, 4, 5, 5, 6]


def test_an_exception_closes_the_trackers_as_failed(tmp_path):
    metrics = MetricsLog(tmp_path, sinks=[Recorder()])
    recorder = metrics.sinks[0]
    metrics.log(1, 0, {"train/loss": math.nan})
    metrics.close(OSError("disk full"))
    metrics.close(OSError("a second close does nothing"))
    assert recorder.calls == [(1, ["train/loss"]), ("finish", "failed")]


def test_a_missing_tracker_package_fails_before_training_with_the_install_command(tmp_path):
    code = (
        "import sys; sys.modules['wandb'] = None\n"  # as if it were not installed
        "from mmtrain.cli import main\n"
        f"sys.exit(main(['train', 'logger=[tensorboard,wandb]', 'hydra.run.dir={tmp_path / 'run'}']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "pip install 'mmtrain[wandb]'" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was built


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+logger.tensorboard.subdirr=tb",
            "Unknown key 'subdirr' for logger 'tensorboard'. Did you mean 'subdir'?",
        ),
        ("logger=tensorbord", "Could not find 'logger/tensorbord'"),
        ("+logger.neptune.project=x", "Unknown logger 'neptune'"),
        (
            "logger=mlflow logger.mlflow.tags=abc",
            "Key 'tags' of logger 'mlflow' must be a mapping or null (got 'abc')",
        ),
        (
            "logger=wandb logger.wandb.tags=abc",
            "Key 'tags' of logger 'wandb' must be a list of strings or null (got 'abc')",
        ),
    ],
)
def test_a_bad_logger_config_fails_before_training(tmp_path, override, message):
    result = run_cli("train", *override.split(), f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_logger_entries_and_names():
    assert loggers.entries(None) == [] and loggers.entries({}) == []
    assert loggers.entries({"csv": None}) == [("csv", {})]
    with pytest.raises(UserError, match="logger must be a mapping"):
        loggers.entries("tensorboard")
    with pytest.raises(UserError, match="logger.csv must be a mapping of its keys"):
        loggers.entries({"csv": 5})
    assert loggers.mlflow_key("val/recall@1_i2t") == "val/recall_at_1_i2t"


LOGGER_OPTIONS = sorted(path.stem for path in (CONF / "logger").glob("*.yaml"))


@pytest.mark.parametrize("option", LOGGER_OPTIONS)
def test_each_logger_option_composes_builds_logs_and_finishes(option, tmp_path, monkeypatch):
    for key, value in tracker_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=[f"logger={option}", *TINY])
    config = parse(cfg).config
    run = loggers.RunInfo.of(tmp_path, config, resumed=False, metric_names=["train/loss"])
    sinks = loggers.build(config.get("logger"), run)
    assert [type(sink.sink).__name__.lower() for sink in sinks] == (
        [] if option == "none" else [f"{option}sink"]
    )
    assert all(isinstance(sink, loggers.Guarded) for sink in sinks)
    metrics = MetricsLog(tmp_path, sinks=sinks)
    metrics.log(1, 0, {"train/loss": 0.5})
    metrics.finish("completed", {"status": "completed", "steps": 1})
    ids_file = tmp_path / "trackers.json"  # the runs a resume reopens
    ids = json.loads(ids_file.read_text()) if ids_file.exists() else {}
    assert set(ids) == ({option} if option in ("wandb", "mlflow") else set())


@pytest.mark.slow  # two worker processes (~40 s here)
def test_under_ddp_only_rank_0_logs(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", *TINY, "trainer.nproc_per_node=2", "trainer.device=cpu",
        "logger=[tensorboard,csv]", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    steps = [s for s, _ in logged(run_dir, "train/loss")]
    assert [s for s, _ in tb_scalars(run_dir / "tensorboard")["train/loss"]] == steps
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == steps


def test_a_run_trained_with_trackers_evaluates_without_their_packages(tmp_path):
    """eval/predict/export rebuild a run from its config; its logger entries are not needed."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", *TINY, "trainer.max_epochs=1", "logger=csv", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr
    config_file = run_dir / ".hydra" / "config.yaml"
    config_file.write_text(config_file.read_text().replace("  csv:\n", "  wandb:\n"))
    assert "logger:\n  wandb:\n" in config_file.read_text()
    code = (
        "import sys; sys.modules['wandb'] = None\n"
        "from mmtrain.cli import main\n"
        f"sys.exit(main(['eval', 'run={run_dir}']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (run_dir / "eval_val.json").is_file()
