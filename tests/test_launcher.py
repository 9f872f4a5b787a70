"""The simulation launcher (``make demo``): config checked first, exit code = the run's end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from server.launch.processes import descendants as descendant_pids
from server.launch.processes import process_alive
from server.launch.simulation import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_STOPPED,
    plan_run,
)
from server.record.store import RunStore
from task.config import ConfigError
from tests.helpers import APP_DIR, fedcoord, run_config_text, wait_until

LAUNCH_TIMEOUT_S = 600


def launcher_command(flwr_home: Path, supernodes: int, settings: dict[str, object]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "server.launch.simulation",
        "--supernodes",
        str(supernodes),
        "--flwr-home",
        str(flwr_home),
        "--run-config",
        run_config_text(settings),
    ]


def launcher_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "FEDCOORD_HOME": str(tmp_path / "home")}


def launch(tmp_path: Path, supernodes: int, **settings: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        launcher_command(tmp_path / "flwr_home", supernodes, settings),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
        cwd=APP_DIR,
        env=launcher_env(tmp_path),
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"dataset": "nope"}, "unknown dataset 'nope'; valid: digits, mnist, fashion-mnist"),
        ({"bogus-key": 1}, "unknown run-config key 'bogus-key'; valid keys: batch-size,"),
        ({"strategy": "fedprox"}, "strategy 'fedprox' needs proximal-mu > 0"),
        ({"num-server-rounds": 1.5}, "num-server-rounds must be an integer, got 1.5"),
        ({"resume": True, "run-name": "absent"}, "resume=true: no run 'absent' in"),
        ({"faults": "\u00b2=raise"}, "faults entry '\u00b2=raise' is malformed"),
        ({"byzantine-partitions": "\u00b9"}, "byzantine-partitions must list partition ids"),
        ({"runs-dir": "~no-such-user-x/runs"}, "runs-dir '~no-such-user-x/runs': Could not"),
        ({"num-server-rounds": 1e300}, "num-server-rounds must be an integer below 2^63"),
        ({"seed": -1}, "seed must be in [0, 2^32), got -1"),
        (
            {
                "strategy": "dp-adaptive-clipping",
                "noise-multiplier": 1e308,
                "dp-clipped-count-stddev": 1e308,
            },
            "strategy 'dp-adaptive-clipping' refused its parameters: ZeroDivisionError",
        ),
    ],
)
def test_a_bad_config_is_one_line_and_exit_2_with_nothing_started(tmp_path, settings, message):
    # Execute
    result = launch(tmp_path, 2, **settings)

    # Assert: one line on stderr, exit 2, no SuperLink was started (no FLWR_HOME made)
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "flwr_home").exists()


def test_a_malformed_run_config_string_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="invalid format"):
        plan_run(APP_DIR, "seed='x")


def test_a_fresh_run_gets_a_name_and_an_existing_one_is_refused(tmp_path):
    # Prepare
    runs_dir = tmp_path / "runs"

    # Execute: no run-name -> the launcher names the run and passes the name on
    planned = plan_run(APP_DIR, f"runs-dir='{runs_dir}'")

    # Assert
    assert planned.run_dir.parent == runs_dir and planned.run_dir.name.startswith("run-")
    assert f"run-name='{planned.run_dir.name}'" in planned.run_config
    assert planned.previous_flwr_run_id is None

    # Prepare: a run of that name exists
    RunStore.create(runs_dir / "taken", "taken", {}, 3).close()

    # Execute / Assert: refused with the command that resumes it
    with pytest.raises(ConfigError, match="resume=true"):
        plan_run(APP_DIR, f"runs-dir='{runs_dir}' run-name='taken'")


@pytest.mark.slow
def test_a_run_whose_nodes_all_fail_exits_1_with_the_reason_last(tmp_path):
    # Execute: both nodes raise in every round
    result = launch(
        tmp_path,
        2,
        **{
            "runs-dir": str(tmp_path / "runs"),
            "run-name": "all-fail",
            "faults": "0=raise,1=raise",
            "num-server-rounds": 2,
            "local-epochs": 1,
        },
    )

    # Assert: exit 1, the run's error is the last line, and no traceback of the ServerApp
    # (Flower's simulation engine logs each ClientApp exception with its traceback)
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_FAILED, output[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("fedcoord: run all-fail failed: NoRoundUpdatedError: "), output
    assert "no round updated the model" in last_line
    assert "fedcoord nodes all-fail" in last_line
    assert "raised an exception" not in output and "server/app.py" not in output
    assert "ERROR" in output and "fedcoord: no round updated the model" in output
    status = fedcoord(tmp_path / "runs", "status", "all-fail", "--json").stdout
    assert '"state": "failed"' in status


@pytest.mark.slow
def test_a_stopped_run_exits_3_and_ctrl_c_exits_130_with_everything_stopped(tmp_path):
    # Prepare: two long runs, each on the launcher's own SuperLink
    runs_dir = tmp_path / "runs"
    settings = {"runs-dir": str(runs_dir), "num-server-rounds": 400, "local-epochs": 1}

    def start(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            launcher_command(tmp_path / f"flwr_home_{name}", 2, {**settings, "run-name": name}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=APP_DIR,
            env=launcher_env(tmp_path),
        )

    def wait_for_round_one(name: str) -> None:
        wait_until(
            lambda: '"current_round": 0' not in fedcoord(runs_dir, "status", name, "--json").stdout,
            300,
            f"round 1 of {name}",
        )

    stopped = start("stopped")
    try:
        # Execute: `fedcoord stop` while it runs
        wait_for_round_one("stopped")
        fedcoord(runs_dir, "stop", "stopped")
        _, stderr = stopped.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        stopped.kill()

    # Assert: exit 3, the stop is the last line
    assert stopped.returncode == EXIT_STOPPED, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("fedcoord: run stopped stopped after round")

    interrupted = start("interrupted")
    try:
        # Execute: Ctrl-C (SIGINT to the launcher alone, as a terminal's foreground job)
        wait_for_round_one("interrupted")
        tree = descendant_pids(interrupted.pid)
        interrupted.send_signal(signal.SIGINT)
        _, stderr = interrupted.communicate(timeout=120)
    finally:
        interrupted.kill()

    # Assert: exit 130, how to resume, and the SuperLink and its simulation are gone
    assert interrupted.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    assert "resume=true" in stderr.strip().splitlines()[-1]
    assert tree and not [pid for pid in tree if process_alive(pid)]
