"""MLflow tracking against real local stores, and the TensorBoard export read back."""

import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import task.config
from server.export import tracking
from server.export.tracking import TRACKING_FILE, start_tracking
from server.record.checkpoints import model_hash
from server.record.store import RoundRecord, RunStore
from task.config import ConfigError, parse_run_config
from task.config_values import TRACKING_FORMS
from tests.helpers import (
    APP_DIR,
    add_round,
    fedcoord,
    history,
    make_run,
    mlflow_client,
    round_record,
)

ACCURACIES = (0.1, 0.5, 0.8, 0.9)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module: creating one runs MLflow's migrations (seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlruns.db'}"


@pytest.fixture(autouse=True)
def quick_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking, "SYNC_INTERVAL_S", 0.05)


def arrays_of(server_round: int) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), server_round, dtype=np.float32)}


def tracked_round(server_round: int) -> RoundRecord:
    metrics = {"central-accuracy": ACCURACIES[server_round], "central-loss": 2.0 - server_round}
    if server_round > 0:
        metrics |= {"train-loss": 1.0 / server_round, "federated-accuracy": 0.7, "x": float("nan")}
    return round_record(
        server_round,
        started_at=1000.0 + server_round,
        ended_at=1000.5 + server_round,
        sampled=3 if server_round else 0,
        accepted=2 if server_round else 0,
        rejected=1 if server_round else 0,
        metrics=metrics,
    )


# Each round with its checkpoint of arrays_of(round).
TRACKED_ROUND = {"record_fn": tracked_round, "model_fn": arrays_of}
TRACKED_RUN = {"config": {}, "state": None, "nodes": False, **TRACKED_ROUND}


def track(store: RunStore, state: str, **run_config: object) -> str:
    """Mirror the run as the ServerApp does, with the run in ``state`` at the end."""
    settings = {"run-name": store.run_dir.name, "runs-dir": str(store.run_dir.parent)}
    config = parse_run_config({**settings, **run_config})
    tracker = start_tracking(config, store.run_dir)
    assert tracker is not None
    store.update_run(state=state)
    tracker.finish(timeout_s=60)
    return json.loads((store.run_dir / TRACKING_FILE).read_text())["run-id"]


def test_run_config_params_round_metrics_tags_and_artifacts(tmp_path, tracking_uri):
    # Prepare
    store = make_run(tmp_path, "tracked", rounds=range(3), **TRACKED_RUN)

    # Execute
    run_id = track(store, "completed", **{"tracking-uri": tracking_uri, "strategy": "median"})

    # Assert: one finished MLflow run, named after the run, in experiment "fedcoord"
    client = mlflow_client(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "fedcoord"
    # params: the run-config
    params = run.data.params
    assert params["strategy"] == "median" and params["num-server-rounds"] == "5"
    assert params["resume"] == "false" and params["tracking-uri"] == tracking_uri
    assert params["dataset-defaults"] == "local-epochs,batch-size,lr,momentum"
    # metrics: every round at step=round, round 0 the initial model; NaN left out
    assert history(client, run_id, "central-accuracy") == [(0, 0.1), (1, 0.5), (2, 0.8)]
    assert history(client, run_id, "train-loss") == [(1, 1.0), (2, 0.5)]
    assert history(client, run_id, "federated-accuracy") == [(1, 0.7), (2, 0.7)]
    assert history(client, run_id, "accepted") == [(0, 0.0), (1, 2.0), (2, 2.0)]
    assert history(client, run_id, "rejected") == [(0, 0.0), (1, 1.0), (2, 1.0)]
    assert history(client, run_id, "duration-s") == [(0, 0.5), (1, 0.5), (2, 0.5)]
    assert "x" not in run.data.metrics
    # tags: run name, the final model's hash, the state
    tags = run.data.tags
    assert tags["fedcoord.run-name"] == "tracked"
    assert tags["fedcoord.model-hash"] == model_hash(arrays_of(2))
    assert tags["fedcoord.chain-hash"] == str(store.rounds()[-1]["chain_hash"])
    assert tags["fedcoord.state"] == "completed"
    # artifacts: the final checkpoint (the same bytes) and the plot, beside the database
    assert {a.path for a in client.list_artifacts(run_id)} == {"checkpoints", "rounds.png"}
    checkpoint = Path(
        client.download_artifacts(run_id, "checkpoints/round-00002.safetensors", str(tmp_path))
    )
    original = store.run_dir / "checkpoints" / "round-00002.safetensors"
    assert hashlib.sha256(checkpoint.read_bytes()).digest() == (
        hashlib.sha256(original.read_bytes()).digest()
    )
    plot = Path(client.download_artifacts(run_id, "rounds.png", str(tmp_path)))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    assert run.info.artifact_uri.startswith((database.parent / "mlartifacts").as_uri())


def test_resumed_run_continues_the_same_mlflow_run(tmp_path, tracking_uri):
    # Prepare: a run stopped after round 2, mirrored
    store = make_run(tmp_path, "resumed", rounds=range(3), **TRACKED_RUN)
    settings = {"tracking-uri": tracking_uri, "num-server-rounds": 2}
    first_id = track(store, "stopped", **settings)
    client = mlflow_client(tracking_uri)
    assert client.get_run(first_id).info.status == "KILLED"

    # Execute: resumed to 3 rounds
    add_round(store, 3, **TRACKED_ROUND)
    run_id = track(store, "completed", **{**settings, "num-server-rounds": 3, "resume": True})

    # Assert: the same MLflow run, each round once, the changed keys as tags
    assert run_id == first_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert history(client, run_id, "central-accuracy") == [(0, 0.1), (1, 0.5), (2, 0.8), (3, 0.9)]
    assert run.data.params["num-server-rounds"] == "2" and run.data.params["resume"] == "false"
    assert run.data.tags["fedcoord.config.num-server-rounds"] == "3"
    assert run.data.tags["fedcoord.config.resume"] == "true"
    assert run.data.tags["fedcoord.model-hash"] == model_hash(arrays_of(3))
    checkpoints = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert "checkpoints/round-00003.safetensors" in checkpoints


def test_a_folder_is_mlflows_file_store_opted_in(tmp_path, monkeypatch):
    # Prepare: MLflow 3 refuses its file store unless asked; fedcoord asks for it
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    store = make_run(tmp_path, "folder", rounds=range(2), **TRACKED_RUN)

    # Execute
    run_id = track(store, "completed", **{"tracking-uri": str(tmp_path / "mlruns")})

    # Assert
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    assert client.get_run(run_id).info.status == "FINISHED"
    assert history(client, run_id, "central-accuracy") == [(0, 0.1), (1, 0.5)]
    assert {a.path for a in client.list_artifacts(run_id)} == {"checkpoints", "rounds.png"}


def tracking_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("tracking:")
    ]


def test_unreachable_store_is_one_warning_and_never_raises(tmp_path, caplog):
    # Prepare: the database's folder is a file; syncs fail again and again
    (tmp_path / "not-a-folder").write_text("")
    uri = f"sqlite:///{tmp_path / 'not-a-folder' / 'mlruns.db'}"
    store = make_run(tmp_path, "unreachable", rounds=range(2), **TRACKED_RUN)
    config = parse_run_config({"run-name": "unreachable", "runs-dir": str(tmp_path)})
    tracker = tracking.RunTracker(store.run_dir, uri, "fedcoord", tracking.tracked_params(config))

    # Execute
    with caplog.at_level(logging.WARNING):
        tracker.start()
        time.sleep(0.5)
        add_round(store, 2, **TRACKED_ROUND)
        tracker.finish(timeout_s=30)

    # Assert: the failure said once, in one line; the tracker ended; nothing recorded
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert "the run goes on" in warnings[0]
    assert not tracker._thread.is_alive()
    assert not (store.run_dir / TRACKING_FILE).exists()


def test_a_store_that_comes_back_gets_the_rounds_it_missed(tmp_path, monkeypatch, caplog):
    # Prepare: a file store whose folder cannot be made yet
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    (tmp_path / "blocked").write_text("")
    uri = (tmp_path / "blocked" / "mlruns").as_uri()
    store = make_run(tmp_path, "later", rounds=range(2), **TRACKED_RUN)
    config = parse_run_config({"run-name": "later", "runs-dir": str(tmp_path)})
    tracker = tracking.RunTracker(store.run_dir, uri, "fedcoord", tracking.tracked_params(config))

    # Execute: rounds go on while it fails, then the folder can be made
    with caplog.at_level(logging.INFO):
        tracker.start()
        deadline = time.monotonic() + 30
        while not tracking_warnings(caplog) and time.monotonic() < deadline:
            time.sleep(0.05)
        add_round(store, 2, **TRACKED_ROUND)
        (tmp_path / "blocked").unlink()
        store.update_run(state="completed")
        tracker.finish(timeout_s=30)

    # Assert: one warning, one line saying it answers again, every round logged
    assert len(tracking_warnings(caplog)) == 1
    assert any("MLflow answers again" in r.getMessage() for r in caplog.records)
    run_id = json.loads((store.run_dir / TRACKING_FILE).read_text())["run-id"]
    client = mlflow_client(uri)
    assert history(client, run_id, "central-accuracy") == [(0, 0.1), (1, 0.5), (2, 0.8)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_store_damaged_during_the_run_is_a_warning_and_the_tracker_ends(tmp_path, caplog):
    # Prepare: a store that works for the first rounds
    database = tmp_path / "damaged.db"
    store = make_run(tmp_path, "damaged", rounds=range(2), **TRACKED_RUN)
    config = parse_run_config({"run-name": "damaged", "runs-dir": str(tmp_path)})
    tracker = tracking.RunTracker(
        store.run_dir, f"sqlite:///{database}", "fedcoord", tracking.tracked_params(config)
    )
    tracker.start()
    deadline = time.monotonic() + 60
    while tracker._logged_through < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tracker._logged_through == 1

    # Execute: the database is overwritten (as by a full disk's or another program's damage)
    with caplog.at_level(logging.WARNING):
        database.write_bytes(b"\x00not a database" * 4096)
        add_round(store, 2, **TRACKED_ROUND)
        store.update_run(state="completed")
        tracker.finish(timeout_s=30)

    # Assert: said, never twice the same (SQLite may word a damaged file two ways)
    warnings = tracking_warnings(caplog)
    assert warnings and len(set(warnings)) == len(warnings), warnings
    assert not tracker._thread.is_alive()


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql://db/mlflow",
        "s3://bucket/mlruns",
        "http://",
        "sqlite://x.db",
        "sqlite:///",
        # parse in no way (urlparse raises), or parse but cannot work
        "http://[::1",
        "file://[::1/x",
        "http://a:99999",
        "http://a:-1/",
        "http://a:0",
        "http://a:x",
        "http://h/\n",
        "http://h\x00",
        "https://h /x",
        "sqlite:///x.db?mode=ro",
        "sqlite:///x.db#f",
    ],
)
def test_unsupported_tracking_uri_is_refused_at_start(uri):
    with pytest.raises(ConfigError) as error:
        parse_run_config({"tracking-uri": uri})
    assert str(error.value) == f"tracking-uri {uri!r} is not supported; valid: {TRACKING_FORMS}"


@pytest.mark.parametrize(
    "uri", ["/", "file:///", "sqlite:////", "~", "~/", "/..", ".", "file:///%2e"]
)
def test_a_tracking_uri_that_is_root_home_or_fedcoord_home_is_refused(uri, monkeypatch, tmp_path):
    # MLflow's file store would write its experiment folders straight into them
    monkeypatch.setenv("FEDCOORD_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as error:
        parse_run_config({"tracking-uri": uri})
    message = str(error.value)
    assert message.startswith(f"tracking-uri {uri!r} is ")
    assert message.endswith(
        ", which MLflow would fill with its own files; name a file or folder in it, e.g. sqlite:///mlruns.db"
    )


def test_tracking_without_the_extra_is_refused_naming_the_install(monkeypatch):
    monkeypatch.setattr(task.config, "mlflow_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'fedcoord\[mlflow\]'"):
        parse_run_config({"tracking-uri": "sqlite:///mlruns.db"})
    assert parse_run_config({}).tracking_uri == ""  # off: MLflow is not needed


def test_relative_paths_go_under_fedcoord_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDCOORD_HOME", str(tmp_path))
    resolved = {
        text: parse_run_config({"tracking-uri": text}).tracking_uri
        for text in ("sqlite:///mlruns.db", "mlruns", "file:///abs/mlruns", "http://h:5000")
    }
    assert resolved == {
        "sqlite:///mlruns.db": f"sqlite:///{tmp_path}/mlruns.db",
        "mlruns": (tmp_path / "mlruns").as_uri(),
        "file:///abs/mlruns": "file:///abs/mlruns",
        "http://h:5000": "http://h:5000",
    }


def test_launcher_refuses_a_bad_tracking_uri_before_starting(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "server.launch.simulation", "--flwr-home", str(tmp_path / "flwr")]
        + ["--run-config", "tracking-uri='ftp://host/x'"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=APP_DIR,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"fedcoord: tracking-uri 'ftp://host/x' is not supported; valid: {TRACKING_FORMS}"
    ]
    assert not (tmp_path / "flwr").exists()


def test_tensorboard_export_reads_back_with_tensorboard(tmp_path):
    # Prepare
    store = make_run(tmp_path / "runs", "tb", rounds=range(3), **TRACKED_RUN)
    logdir = tmp_path / "logs"

    # Execute: twice, as a user re-exporting a run
    for _ in range(2):
        result = fedcoord(
            tmp_path / "runs", "export", "tb", "--format", "tensorboard", "-o", logdir
        )
    assert result.stdout.startswith("wrote 3 rounds to ")

    # Assert: one event file, every round's scalars at step=round
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((logdir / "tb").iterdir())
    assert [f.name.startswith("events.out.tfevents.") for f in files] == [True]
    events = EventAccumulator(str(logdir / "tb"))
    events.Reload()
    scalars = {
        t: [(e.step, round(e.value, 6)) for e in events.Scalars(t)]
        for t in events.Tags()["scalars"]
    }
    assert scalars["central-accuracy"] == [(0, 0.1), (1, 0.5), (2, 0.8)]
    assert scalars["train-loss"] == [(1, 1.0), (2, 0.5)]
    assert scalars["accepted"] == [(0, 0.0), (1, 2.0), (2, 2.0)]
    assert [e.wall_time for e in events.Scalars("central-loss")] == [1000.5, 1001.5, 1002.5]
    assert "x" not in scalars
    assert store.rounds()[0]["round"] == 0

    # Assert: without -o, one line and exit 2
    refused = fedcoord(tmp_path / "runs", "export", "tb", "--format", "tensorboard", check=False)
    assert refused.returncode == 2
    assert refused.stderr == "fedcoord: --format tensorboard needs -o DIR, the TensorBoard logdir\n"


def test_a_tracking_uri_is_logged_without_its_credentials():
    from server.export.tracking import without_credentials

    assert without_credentials("https://ann:s3cret@mlflow.example:5000/x") == (
        "https://mlflow.example:5000/x"
    )
    assert without_credentials("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


def export_tensorboard(runs_dir: Path, name: str, logdir: Path, capsys) -> tuple[int, str, str]:
    from server.ui import cli

    code = cli.main(
        ["--runs-dir", str(runs_dir), "export", name, "--format", "tensorboard"]
        + ["-o", str(logdir)]
    )
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_tensorboard_export_leaves_out_values_beyond_float32_and_says_so(tmp_path, capsys):
    # Prepare: a node's train-loss of 1e300 stored as the round's mean
    store = RunStore.create(tmp_path / "runs" / "big", "big", {}, 2)
    metrics = {"central-accuracy": 0.5, "train-loss": 5e299, "train-x": -3.5e38}
    store.record_round(RoundRecord(1, 10.0, 11.0, 3, 3, 0, 0, True, metrics, "h"))
    store.close()
    logdir = tmp_path / "logs"

    # Execute
    code, out, err = export_tensorboard(tmp_path / "runs", "big", logdir, capsys)

    # Assert: exit 0, one line naming what was left out, the other values written, no temp file
    assert code == 0
    assert out.startswith("wrote 1 rounds to ")
    assert err == (
        "fedcoord: left out 2 value(s) beyond float32's range (TensorBoard's scalar type): "
        "'train-loss' at round 1, 'train-x' at round 1\n"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [f.name.startswith("events.out.tfevents.") for f in (logdir / "big").iterdir()] == [True]
    events = EventAccumulator(str(logdir / "big"))
    events.Reload()
    assert "train-loss" not in events.Tags()["scalars"]
    assert [e.value for e in events.Scalars("central-accuracy")] == [0.5]


def test_tensorboard_export_writes_under_the_run_folder_name_never_run_db_s(tmp_path, capsys):
    # Prepare: run.db's run_name changed to escape the logdir, or unusable
    import sqlite3

    names = ("../../escaped", str(tmp_path / "abs"), "", "a\0b", "..")
    for index, stored in enumerate(names):
        RunStore.create(tmp_path / "runs" / f"r{index}", f"r{index}", {}, 2).close()
        with sqlite3.connect(tmp_path / "runs" / f"r{index}" / "run.db") as db:
            db.execute("UPDATE run SET run_name = ?", (stored,))
    logdir = tmp_path / "out" / "logs"

    # Execute
    results = [
        export_tensorboard(tmp_path / "runs", f"r{i}", logdir, capsys) for i in range(len(names))
    ]

    # Assert: each run in its own folder under the logdir, nothing anywhere else
    assert [code for code, _, _ in results] == [0] * len(names)
    assert sorted(p.name for p in logdir.iterdir()) == [f"r{i}" for i in range(len(names))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "runs"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["logs"]


@pytest.mark.parametrize(
    "column, value", [("created_at", "9e999"), ("created_at", "-1"), ("ended_at", "1e300")]
)
def test_tensorboard_export_refuses_a_time_that_is_not_one_in_one_line(
    tmp_path, capsys, column, value
):
    # Prepare
    import sqlite3

    store = RunStore.create(tmp_path / "runs" / "t", "t", {}, 2)
    store.record_round(RoundRecord(1, 10.0, 11.0, 3, 3, 0, 0, True, {"central-accuracy": 0.5}, "h"))
    store.close()
    table = "run" if column == "created_at" else "rounds"
    with sqlite3.connect(tmp_path / "runs" / "t" / "run.db") as db:
        db.execute(f"UPDATE {table} SET {column} = {value}")

    # Execute
    code, out, err = export_tensorboard(tmp_path / "runs", "t", tmp_path / "logs", capsys)

    # Assert: one line, exit 2, nothing written
    assert code == 2
    assert out == ""
    assert err.startswith("fedcoord: t: ") and err.count("\n") == 1
    assert "not a time between 1970 and 9999" in err
    assert not (tmp_path / "logs").exists()


def test_a_failed_tensorboard_export_removes_its_temporary_file(tmp_path, capsys, monkeypatch):
    # Prepare: the rename fails, as on a full or read-only disk
    import server.export.event_files

    RunStore.create(tmp_path / "runs" / "f", "f", {}, 2).close()

    def refuse(*_: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "logs" / "f"))

    monkeypatch.setattr(server.export.event_files.os, "replace", refuse)

    # Execute
    code, _, err = export_tensorboard(tmp_path / "runs", "f", tmp_path / "logs", capsys)

    # Assert: one line, exit 1, no temporary file left
    assert code == 1
    assert err == f"fedcoord: {tmp_path / 'logs' / 'f'}: Permission denied\n"
    assert list((tmp_path / "logs" / "f").iterdir()) == []


def test_a_metric_name_mlflow_refuses_never_stops_later_rounds(tmp_path, tracking_uri, caplog):
    # Prepare: round 1 carries names MLflow refuses (a node's metric names) and a time
    # that does not fit MLflow's timestamps; rounds 2 and 3 are ordinary
    import sqlite3

    store = make_run(tmp_path, "badnames", rounds=range(1), **TRACKED_RUN)
    refused = ["train-a!b<script>", "train-" + "x" * 300, "train-a//b", "train-a/../b"]
    store.record_round(
        RoundRecord(
            1,
            1001.0,
            1001.5,
            3,
            2,
            1,
            0,
            True,
            {"central-accuracy": 0.5} | dict.fromkeys(refused, 1.0),
            "h",
        )
    )
    with sqlite3.connect(store.run_dir / "run.db") as db:
        db.execute("UPDATE rounds SET ended_at = 1e308 WHERE round = 1")
    for server_round in (2, 3):
        add_round(store, server_round, **TRACKED_ROUND)

    # Execute
    with caplog.at_level(logging.WARNING):
        run_id = track(store, "completed", **{"tracking-uri": tracking_uri})

    # Assert: every round logged, the refused names left out with one line each
    client = mlflow_client(tracking_uri)
    logged = sorted(history(client, run_id, "central-accuracy"))  # round 1 timed now
    assert logged == [(0, 0.1), (1, 0.5), (2, 0.8), (3, 0.9)]
    assert not set(refused) & set(client.get_run(run_id).data.metrics)
    warnings = tracking_warnings(caplog)
    assert len(warnings) == len(refused), warnings
    assert all("is not a name MLflow takes" in w for w in warnings)


@pytest.mark.parametrize("kind", ["deep", "fifo", "folder"])
def test_a_tampered_tracking_json_never_stops_tracking(tmp_path, tracking_uri, kind):
    # Prepare: tracking.json deeply nested, a FIFO (reading it would block), a folder
    import os

    store = make_run(tmp_path, kind, rounds=range(2), **TRACKED_RUN)
    path = store.run_dir / TRACKING_FILE
    if kind == "deep":
        path.write_text("[" * 100_000)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    tracker = tracking.RunTracker(store.run_dir, tracking_uri, "fedcoord", {"seed": "1"})

    # Execute
    tracker.start()
    store.update_run(state="completed")
    tracker.finish(timeout_s=60)

    # Assert: a new MLflow run with every round
    assert not tracker._thread.is_alive() and tracker.run_id is not None
    history_ = history(mlflow_client(tracking_uri), tracker.run_id, "central-accuracy")
    assert history_ == [(0, 0.1), (1, 0.5)]


def test_the_tracking_uri_s_credentials_are_never_logged(tmp_path, caplog, monkeypatch):
    # Prepare: a server store whose client fails at the first batch with the URI in
    # its message (as MLflow's HTTP errors do)
    from types import SimpleNamespace

    import mlflow

    uri = "https://ann:s3cret@mlflow.example:5000"

    class Client:
        def __init__(self, tracking_uri: str) -> None:
            self.uri = tracking_uri

        def get_experiment_by_name(self, name: str) -> object:
            return SimpleNamespace(experiment_id="1")

        def create_run(self, *args: object, **kwargs: object) -> object:
            return SimpleNamespace(info=SimpleNamespace(run_id="r1"))

        def get_run(self, run_id: str) -> object:
            return SimpleNamespace(data=SimpleNamespace(params={}))

        def log_batch(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError(f"API request to {self.uri}/api/2.0/mlflow/runs/log-batch failed")

    monkeypatch.setattr(mlflow, "MlflowClient", Client)
    store = make_run(tmp_path, "secret", rounds=range(1), **TRACKED_RUN)
    tracker = tracking.RunTracker(store.run_dir, uri, "fedcoord", {"seed": "1"})

    # Execute
    with caplog.at_level(logging.INFO):
        tracker.start()
        store.update_run(state="completed")
        tracker.finish(timeout_s=30)

    # Assert: the INFO line and the warning show the URI without ann:s3cret@
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tracking:")]
    assert any(m.endswith("in https://mlflow.example:5000") for m in messages), messages
    assert any("https://mlflow.example:5000/api/2.0" in m for m in messages), messages
    assert not [m for m in messages if "s3cret" in m or "ann:" in m]
