"""The `fedcoord` CLI on run directories the tests write (no server needed)."""

import csv
import io
import json
import time

import pytest

from server.ui import cli, read_verbs
from tests.helpers import make_run


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_status_json_has_the_spec_fields(tmp_path, capsys):
    # Prepare
    make_run(tmp_path, "a")

    # Execute
    code, out, _ = run_cli(capsys, "--runs-dir", tmp_path, "status", "--json")

    # Assert
    status = json.loads(out)
    assert code == 0
    for key in (
        "run_name",
        "state",
        "current_round",
        "num_rounds",
        "progress",
        "metrics",
        "nodes",
        "heartbeat_age_s",
        "server_pid",
        "run_dir",
    ):
        assert key in status
    assert status["state"] == "running" and status["current_round"] == 2
    assert status["progress"] == pytest.approx(0.4) and status["nodes"] == 2
    assert status["metrics"]["central_accuracy"] == pytest.approx(0.6)


def test_stale_heartbeat_reads_as_interrupted_and_refuses_commands(tmp_path, capsys):
    # Prepare
    store = make_run(tmp_path, "old")
    store.update_run(heartbeat_at=time.time() - 60)

    # Execute
    _, out, _ = run_cli(capsys, "--runs-dir", tmp_path, "status", "old", "--json")
    code, _, err = run_cli(capsys, "--runs-dir", tmp_path, "pause", "old")

    # Assert
    assert json.loads(out)["state"] == "interrupted"
    assert code == 2 and "cannot pause a run that is interrupted" in err
    assert store.pending_commands() == []


def test_pause_queues_a_command_and_invalid_ones_change_nothing(tmp_path, capsys):
    # Prepare
    running = make_run(tmp_path, "live")
    done = make_run(tmp_path, "done", state="completed")

    # Execute
    ok, out, _ = run_cli(capsys, "--runs-dir", tmp_path, "pause", "live")
    refused, _, err = run_cli(capsys, "--runs-dir", tmp_path, "resume", "done")
    unknown, _, err_unknown = run_cli(capsys, "--runs-dir", tmp_path, "stop", "nope")

    # Assert
    assert ok == 0 and "pause queued" in out
    assert [c["command"] for c in running.pending_commands()] == ["pause"]
    assert refused == 2 and "cannot resume a run that is completed" in err
    assert done.pending_commands() == []
    assert unknown == 2 and "no run 'nope'" in err_unknown and "live" in err_unknown


def test_weight_is_validated_and_queued(tmp_path, capsys):
    # Prepare
    store = make_run(tmp_path, "w")

    # Execute
    ok, _, _ = run_cli(capsys, "--runs-dir", tmp_path, "weight", "w", 3, 2.5)
    bad, _, err = run_cli(capsys, "--runs-dir", tmp_path, "weight", "w", 3, -1)

    # Assert
    assert ok == 0 and bad == 2 and "weight must be finite and >= 0" in err
    assert [(c["command"], c["argument"]) for c in store.pending_commands()] == [
        ("weight", "3=2.5")
    ]


def test_runs_nodes_export_and_plot(tmp_path, capsys):
    # Prepare
    make_run(tmp_path, "r1", state="completed", model_fn=lambda server_round: {})

    # Execute / Assert: runs
    _, out, _ = run_cli(capsys, "--runs-dir", tmp_path, "runs")
    assert "r1" in out and "completed" in out and "2/5" in out

    # nodes: the rejected update's reason is shown
    _, out, _ = run_cli(capsys, "--runs-dir", tmp_path, "nodes", "r1")
    assert "array 'w' contains NaN" in out and "cpu" in out

    # export csv and jsonl
    _, out, _ = run_cli(capsys, "--runs-dir", tmp_path, "export", "r1", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    _, out, _ = run_cli(capsys, "--runs-dir", tmp_path, "export", "r1", "--format", "jsonl")
    records = [json.loads(line) for line in out.splitlines()]
    assert records[2]["metrics"]["central-accuracy"] == pytest.approx(0.6)

    # plot writes a PNG
    target = tmp_path / "plot.png"
    code, _, _ = run_cli(capsys, "--runs-dir", tmp_path, "plot", "r1", "-o", target)
    assert code == 0 and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # verify: intact
    code, out, _ = run_cli(capsys, "--runs-dir", tmp_path, "verify", "r1")
    assert code == 0 and "intact" in out


def test_progress_line_shows_round_replies_and_eta():
    line = read_verbs.progress_line(
        {
            "progress": 0.5,
            "current_round": 5,
            "num_rounds": 10,
            "replies_received": 3,
            "replies_expected": 8,
            "metrics": {"central_accuracy": 0.9},
            "eta_s": 65.0,
            "state": "running",
        }
    )
    assert "round 5/10" in line and "replies 3/8" in line and "ETA 1m05s" in line
    assert "#" * 15 + "." * 15 in line
