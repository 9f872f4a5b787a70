"""``fedcoord connection``: plain ``flwr run . NAME`` on a SuperLink with no runtime installs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server.launch.connection import (
    SimulationSettings,
    running_superlink,
    simulation_config_command,
    superlink_dir,
    write_simulation_connection,
)
from server.launch.processes import descendants, process_alive, stop_pid_tree
from server.ui import cli
from tests.helpers import APP_DIR, fedcoord

NAME = "fc-test"
FLWR_TIMEOUT_S = 600


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = cli.main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "local"], "--name 'local': a connection name is letters, digits"),
        (["--name", "a.b"], "--name 'a.b': a connection name"),
        (["--supernodes", "0"], "--supernodes must be at least 1, got 0"),
        (["--num-cpus", "0.5"], "--num-cpus must be a whole number of CPUs per node"),
        (["--num-gpus", "-1"], "--num-gpus must be a GPU share >= 0 per node"),
    ],
)
def test_bad_settings_are_one_line_and_exit_2_with_nothing_started(tmp_path, capsys, args, message):
    # Execute
    code, out, err = run_cli(capsys, "connection", "--flwr-home", tmp_path, *args)

    # Assert
    assert code == 2 and out == "" and err.startswith(f"fedcoord: {message}")
    assert err.count("\n") == 1 and list(tmp_path.iterdir()) == []


def test_the_connection_is_added_beside_flowers_defaults_and_others(tmp_path):
    # Execute: a fresh FLWR_HOME, then a second connection, then the first one moved
    write_simulation_connection(tmp_path, NAME, "127.0.0.1:1234")
    write_simulation_connection(tmp_path, "other", "127.0.0.1:5678")
    path = write_simulation_connection(tmp_path, NAME, "127.0.0.1:4321")

    # Assert: Flower's default stays Flower's; the connection is insecure, local
    superlink = tomllib.loads(path.read_text())["superlink"]
    assert superlink["default"] == "local" and superlink["local"] == {"address": ":local:"}
    assert superlink[NAME] == {"address": "127.0.0.1:4321", "insecure": True}
    assert superlink["other"]["address"] == "127.0.0.1:5678"


def test_the_nodes_are_set_with_flowers_own_command():
    command = simulation_config_command(SimulationSettings(NAME, 4, 2, 0.25))

    assert command[1:5] == ["federation", "simulation-config", "@none/default", NAME]
    assert command[5:11] == [
        "--num-supernodes",
        "4",
        "--client-resources-num-cpus",
        "2",
        "--client-resources-num-gpus",
        "0.25",
    ]


def test_a_pid_file_naming_another_process_is_not_trusted(tmp_path, capsys):
    # Prepare: the PID of this test process, which is no SuperLink
    folder = superlink_dir(tmp_path, NAME)
    folder.mkdir()
    (folder / "superlink.pid").write_text(f"{os.getpid()} 39091\n")

    # Execute / Assert: not running, and --stop stops nothing
    assert running_superlink(tmp_path, NAME) is None
    code, out, _ = run_cli(capsys, "connection", "--stop", "--name", NAME, "--flwr-home", tmp_path)
    assert code == 0 and out == f"no SuperLink of connection {NAME!r} is running under {tmp_path}\n"
    assert process_alive(os.getpid()) and not (folder / "superlink.pid").exists()


@pytest.mark.slow
def test_flwr_run_on_the_connection_from_a_fresh_flwr_home(tmp_path):
    # Prepare: a fresh FLWR_HOME; nothing in the environment disables runtime installs
    flwr_home, runs_dir = tmp_path / "flwr_home", tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env |= {"FEDCOORD_HOME": str(tmp_path / "home"), "PYTHONPATH": str(APP_DIR)}
    flwr = str(Path(sys.executable).with_name("flwr"))
    flwr_env = {**env, "FLWR_HOME": str(flwr_home)}

    def flwr_command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [flwr, *args],
            capture_output=True,
            text=True,
            timeout=FLWR_TIMEOUT_S,
            cwd=APP_DIR,
            env=flwr_env,
        )

    # Execute: the documented path, the verb then plain flwr run
    setup = subprocess.run(
        [sys.executable, "-m", "server.ui.cli", "connection", "--supernodes", "2"]
        + ["--flwr-home", str(flwr_home), "--name", NAME],
        capture_output=True,
        text=True,
        timeout=FLWR_TIMEOUT_S,
        cwd=tmp_path,
        env=env,
    )
    pid_file = superlink_dir(flwr_home, NAME) / "superlink.pid"
    pid = int(pid_file.read_text().split()[0]) if pid_file.is_file() else None
    try:
        assert setup.returncode == 0, setup.stdout + setup.stderr
        assert pid is not None and f"flwr run . {NAME} --stream" in setup.stdout
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--disable-runtime-dependency-installation" in arguments

        run = flwr_command(
            "run",
            ".",
            NAME,
            "--stream",
            "--run-config",
            f"num-server-rounds=1 local-epochs=1 run-name='flwr-way' runs-dir='{runs_dir}'",
        )
        listed = flwr_command("ls", NAME, "--format", "json")

        # Assert: completed on 2 nodes, no deprecation warning, listed by flwr ls
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-3000:]
        assert "final accuracy: " in output and "(2 simulated SuperNodes)" in output
        assert "deprecated" not in output
        status = json.loads(fedcoord(runs_dir, "status", "flwr-way", "--json").stdout)
        assert status["state"] == "completed"
        assert listed.returncode == 0 and status["flwr_run_id"] in listed.stdout

        # Execute / Assert: --stop stops the SuperLink and its tree, by PID
        tree = [pid, *descendants(pid)]
        stop = subprocess.run(
            [sys.executable, "-m", "server.ui.cli", "connection", "--stop"]
            + ["--flwr-home", str(flwr_home), "--name", NAME],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env=env,
        )
        assert stop.returncode == 0 and f"(pid {pid}," in stop.stdout
        assert not [alive for alive in tree if process_alive(alive)]
    finally:
        if pid is not None:
            stop_pid_tree(pid)
