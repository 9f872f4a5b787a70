"""``fedcoord run``: the launcher's run behind one verb, with the README's exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.launch.simulation import EXIT_CONFIG, EXIT_OK
from server.ui import cli
from tests.helpers import APP_DIR

RUN_TIMEOUT_S = 600


def fedcoord_run(
    tmp_path: Path, *args: str, module: str = "server.ui.cli"
) -> subprocess.CompletedProcess[str]:
    """``fedcoord run ARGS`` (or another module's entry) as a user runs it, on ``tmp_path``."""
    verb = ["run"] if module == "server.ui.cli" else []
    return subprocess.run(
        [sys.executable, "-m", module, *verb, "--flwr-home", str(tmp_path / "flwr_home"), *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=tmp_path,  # not the app's folder: --app defaults to fedcoord's own
        env={**os.environ, "FEDCOORD_HOME": str(tmp_path / "home"), "PYTHONPATH": str(APP_DIR)},
    )


def test_run_takes_the_launchers_options_with_its_defaults():
    # Execute
    args = cli.build_parser().parse_args(["run"])
    given = cli.build_parser().parse_args(
        ["run", "--supernodes", "3", "--num-gpus", "0.5", "--run-config", "seed=1", "--debug"]
    )

    # Assert: the launcher's options, fedcoord's own app by default
    assert (args.supernodes, args.num_cpus, args.num_gpus, args.ray_address) == (
        10,
        1.0,
        "auto",
        "",
    )
    assert Path(args.app) == APP_DIR and args.flwr_home == ".flwr_home" and not args.debug
    assert (given.supernodes, given.num_gpus, given.run_config, given.debug) == (
        3,
        "0.5",
        "seed=1",
        True,
    )
    assert args.func is cli.cmd_run


@pytest.mark.parametrize(
    "module", ["server.ui.cli", "server.launch.simulation", "server.simulation"]
)
def test_a_bad_config_is_exit_2_in_one_line_from_every_entry_point(tmp_path, module):
    # Execute
    result = fedcoord_run(tmp_path, "--run-config", "dataset='nope'", module=module)

    # Assert: exit 2, one line, nothing started
    assert result.returncode == EXIT_CONFIG, result.stderr
    assert result.stderr == (
        "fedcoord: unknown dataset 'nope'; valid: digits, mnist, fashion-mnist, cifar10\n"
    )
    assert not (tmp_path / "flwr_home").exists()


@pytest.mark.slow
def test_run_completes_one_round_and_exits_0(tmp_path):
    # Execute: from a folder that is not the app's, the runs folder given after the verb
    runs_dir = tmp_path / "runs"
    result = fedcoord_run(
        tmp_path,
        "--supernodes",
        "2",
        "--num-gpus",
        "0",
        "--run-config",
        f"num-server-rounds=1 local-epochs=1 run-name='one' runs-dir='{runs_dir}'",
    )

    # Assert
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_OK, output[-3000:]
    assert "final accuracy: " in output
    assert (runs_dir / "one" / "run.db").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--num-cpus", "0.5"],
            "--num-cpus must be a whole number of CPUs per node, at least 1, "
            "got 0.5 (Flower's simulation config holds an integer)",
        ),
        (["--supernodes", "0"], "--supernodes must be at least 1, got 0"),
    ],
)
def test_nodes_flower_cannot_simulate_are_refused_before_anything_starts(
    tmp_path, capsys, args, message
):
    # Execute: flwr run would fail on 0.5 CPUs (an integer field) after the SuperLink started
    code = cli.main(["run", "--flwr-home", str(tmp_path / "flwr_home"), *args])

    # Assert
    assert code == EXIT_CONFIG and capsys.readouterr().err == f"fedcoord: {message}\n"
    assert not (tmp_path / "flwr_home").exists()
