"""Lifecycle in real simulations, driven through the `fedcoord` CLI as a user would."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.launch.processes import descendants
from server.launch.simulation import CONNECTION_NAME
from tests.helpers import wait_until

pytestmark = pytest.mark.slow

FAST = {"local-epochs": 1, "min-train-nodes": 2}
# Rounds of about a second, so that a loaded machine still pauses the run mid-way.
STEADY = {"local-epochs": 5, "min-train-nodes": 2}


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def round_numbers(run_dir) -> list[int]:
    with sqlite3.connect(run_dir / "run.db") as db:
        return [r[0] for r in db.execute("SELECT round FROM rounds ORDER BY round")]


def test_pause_resume_stop_then_resume_to_the_end(simulate):
    # Prepare: submit a 30-round run and wait for round 2
    run = simulate(4, "lifecycle", wait=False, **STEADY, **{"num-server-rounds": 30})
    assert run.returncode == 0, run.output
    wait_until(lambda: run.status()["current_round"] >= 2, 180, "round 2")

    # Execute: pause
    paused = run.cli("pause", "lifecycle")
    assert "pause queued" in paused.stdout
    wait_until(lambda: run.status()["state"] == "paused", 60, "state paused")
    held_at = run.status()["current_round"]
    time.sleep(15)

    # Assert: no round completed while paused; the server is alive
    status = run.status()
    assert status["state"] == "paused" and status["current_round"] == held_at
    assert status["heartbeat_age_s"] < 5
    refused = run.cli("pause", "lifecycle", check=False)
    assert refused.returncode == 2 and "cannot pause a run that is paused" in refused.stderr

    # Execute: resume, then stop
    run.cli("resume", "lifecycle")
    wait_until(lambda: run.status()["current_round"] > held_at, 60, "a round after resume")
    run.cli("stop", "lifecycle")
    wait_until(lambda: run.status()["state"] == "stopped", 30, "state stopped")

    # Assert: the last completed round's checkpoint verifies; commands on a stopped run fail
    stopped_at = run.status()["current_round"]
    assert 0 < stopped_at < 30
    verify = run.cli("verify", "lifecycle")
    assert "intact" in verify.stdout
    assert (run.run_dir / "checkpoints" / f"round-{stopped_at:05d}.safetensors").is_file()
    refused = run.cli("resume", "lifecycle", check=False)
    assert refused.returncode == 2 and "cannot resume a run that is stopped" in refused.stderr

    # Execute: restart with resume=true
    resumed = simulate(4, "lifecycle", resume=True, **STEADY, **{"num-server-rounds": 30})

    # Assert: all 30 rounds, each once, chain intact
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resuming from the checkpoint of round {stopped_at}" in resumed.output
    assert run.status()["state"] == "completed"
    assert round_numbers(run.run_dir) == list(range(31))
    assert "intact" in run.cli("verify", "lifecycle").stdout


def test_kill_9_then_resume_matches_an_uninterrupted_run(simulate):
    # Prepare: a reference run, and the same run killed after round 3 (of 9: a loaded
    # machine may poll late, and the kill must still find the run going)
    settings = {**FAST, "num-server-rounds": 9, "seed": 7}
    reference = simulate(4, "reference", **settings)
    assert reference.returncode == 0, reference.output[-3000:]
    run = simulate(4, "killed", wait=False, **settings)
    wait_until(lambda: run.status()["current_round"] >= 3, 180, "round 3")

    # Execute: kill -9 the ServerApp process recorded in the run store
    status = run.status()
    assert status["state"] == "running", status
    server_pid = status["server_pid"]
    orphans = descendants(server_pid)  # its Ray processes, stopped by PID below
    os.kill(server_pid, signal.SIGKILL)
    try:
        # Assert: the run reads as interrupted once its heartbeat is stale
        wait_until(lambda: run.status()["state"] == "interrupted", 60, "state interrupted")
    finally:
        kill_pids(orphans)

    # Execute: resume
    resumed = simulate(4, "killed", resume=True, **settings)

    # Assert: every round once, and the same accuracy as the uninterrupted run
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert round_numbers(run.run_dir) == list(range(10))
    final, expected = run.status()["metrics"], reference.status()["metrics"]
    assert abs(final["central_accuracy"] - expected["central_accuracy"]) <= 0.02
    assert "intact" in run.cli("verify", "killed").stdout


def test_altered_checkpoint_is_refused_on_resume_and_named_by_verify(simulate):
    # Prepare: a finished 2-round run whose last checkpoint is altered by one byte
    run = simulate(2, "tampered", **FAST, **{"num-server-rounds": 2})
    assert run.returncode == 0, run.output[-3000:]
    target = run.run_dir / "checkpoints" / "round-00002.safetensors"
    data = bytearray(target.read_bytes())
    data[100] ^= 0x01
    target.write_bytes(bytes(data))

    # Execute
    verify = run.cli("verify", "tampered", check=False)
    resumed = simulate(2, "tampered", resume=True, **FAST, **{"num-server-rounds": 4})

    # Assert
    assert verify.returncode == 1 and str(target) in verify.stdout
    assert "is altered" in resumed.output and str(target) in resumed.output
    assert round_numbers(run.run_dir) == [0, 1, 2]


def test_flwr_stop_leaves_a_consistent_run_directory(simulate, superlink):
    # Prepare
    run = simulate(2, "flwr-stopped", wait=False, **FAST, **{"num-server-rounds": 200})
    wait_until(lambda: run.status()["current_round"] >= 2, 180, "round 2")

    # Execute: Flower's own stop
    flwr = Path(sys.executable).with_name("flwr")
    stop = subprocess.run(
        [str(flwr), "stop", str(run.status()["flwr_run_id"]), CONNECTION_NAME],
        env=superlink.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Assert: stopped (or interrupted once the heartbeat is stale), checkpoints intact
    assert stop.returncode == 0, stop.stdout + stop.stderr
    wait_until(
        lambda: run.status()["state"] in ("stopped", "interrupted"), 60, "stopped or interrupted"
    )
    assert "intact" in run.cli("verify", "flwr-stopped").stdout
