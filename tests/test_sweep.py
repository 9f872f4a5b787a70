"""`fedcoord sweep`: the grid, the checks made before anything starts, and a real 2x2 sweep."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from server.launch.processes import descendants as descendant_pids
from server.launch.processes import process_alive
from server.launch.simulation import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_OK
from server.launch.sweep import plan_sweep
from server.launch.sweep_grid import (
    grid_combinations,
    parse_grid,
    run_config_text,
    toml_value,
)
from server.preflight import parse_app_run_config
from server.record.store import RunStore
from server.ui import cli
from task.config import ConfigError, config_to_dict
from tests.helpers import APP_DIR, fedcoord, wait_until

GRID = "strategy=fedavg,median seed=1,2"
SWEEP_TIMEOUT_S = 600


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = cli.main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ------------------------------------------------------------------- grid
def test_grid_combinations_are_named_sweep_key_value_in_grid_order():
    # Execute
    combinations = grid_combinations(parse_grid(GRID), "s1")

    # Assert
    assert [c.run_name for c in combinations] == [
        "s1-strategy=fedavg-seed=1",
        "s1-strategy=fedavg-seed=2",
        "s1-strategy=median-seed=1",
        "s1-strategy=median-seed=2",
    ]
    assert combinations[2].label == "strategy=median seed=1"


def test_grid_values_become_run_config_text():
    # Prepare
    grid = parse_grid("strategy=median lr=0.05,1e-2 faults='0=raise,1=sleep' resume-x=true")
    (combination,) = grid_combinations([(k, v[:1]) for k, v in grid], "s")

    # Execute
    text = run_config_text("num-server-rounds=2", combination, Path("/runs"), resume=True)

    # Assert: words quoted, numbers, booleans and quoted strings as typed
    assert grid[1] == ("lr", ["0.05", "1e-2"]) and grid[2] == ("faults", ["'0=raise,1=sleep'"])
    assert text == (
        "num-server-rounds=2 strategy=\"median\" lr=0.05 faults='0=raise,1=sleep' "
        "resume-x=true run-name='s-strategy=median-lr=0.05-faults=0=raise,1=sleep-resume-x=true' "
        'runs-dir="/runs" resume=true'
    )
    assert toml_value("auto") == '"auto"' and toml_value("3") == "3"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--grid", "strategy=fedavg,nope seed=1"],
            "strategy=nope seed=1: unknown strategy 'nope'",
        ),
        (["--grid", "strategy=fedavg seed=1,x"], "seed=x: seed must be an integer, got 'x'"),
        (["--grid", "bogus=1,2"], "bogus=1: unknown run-config key 'bogus'; valid keys: "),
        (["--grid", "seed"], "--grid entry 'seed' is not key=value,value,..."),
        (["--grid", "seed=1,1"], "--grid seed: value 1 is listed twice"),
        (["--grid", "seed=1 seed=2"], "--grid names seed twice"),
        (["--grid", "run-name=a,b"], "the sweep sets run-name itself"),
        (["--grid", "seed=1,2", "--run-config", "seed=3"], "seed is in both --grid and"),
        (["--grid", "seed=1,2", "--resume"], "--resume needs --name SWEEP"),
        (["--grid", "seed=1,2", "--parallel", "0"], "--parallel and --supernodes must be"),
        (["--grid", "seed=1,2", "--target", "2"], "target must be an accuracy in [0, 1]"),
        (["--grid", "seed=1,2", "--name", "x" * 99], "choose a shorter --name"),
        # quoting: nothing may inject run-config keys or fold two runs into one folder
        (["--grid", "seed=1", "--name", "a' data-dir='"], "--name \"a' data-dir='\" holds a"),
        (["--grid", 'tracking-experiment="it\'s",it'], "holds a \"'\" (flwr's --run-config"),
        (["--grid", "strategy='fedavg',\"fedavg\""], 'strategy: value "fedavg" is listed twice'),
        (["--grid", "lr=0.1,0.10"], "--grid lr: value 0.10 is listed twice"),
        (["--grid", "a=1-b=2,1 b=3,2-b=3"], "would both be run"),
        (["--grid", '"resume"=true'], "'\"resume\"' is not a run-config key"),
        # input flwr would drop without a word, and bad numbers
        (["--grid", "seed=1", "--run-config", "num-server-rounds= 10"], "num-server-rounds has no"),
        (["--grid", "seed=1", "--run-config", "lr=0.1 oops"], "'oops' is not key=value"),
        (["--grid", "seed=1", "--run-config", "x.toml"], "not a .toml file"),
        (["--grid", "seed=1", "--num-cpus", "-1"], "--num-cpus must be a positive number"),
        (["--grid", "seed=1", "--num-cpus", "nan"], "--num-cpus must be a positive number"),
    ],
)
def test_a_bad_grid_is_refused_before_anything_starts(tmp_path, capsys, args, message):
    # Execute
    code, out, err = run_cli(capsys, "--runs-dir", tmp_path / "runs", "sweep", *args)

    # Assert: exit 2, one line, no run directory made
    assert code == EXIT_CONFIG and out == ""
    assert err.startswith("fedcoord: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def make_sweep_run(runs_dir: Path, name: str, state: str, **overrides: object) -> None:
    """A run store as the sweep's run ``name`` would have written it (config included)."""
    values = name.split("-", 1)[1].replace("-", " ")
    text = f"{values} run-name='{name}' runs-dir='{runs_dir}'"
    stored = {**config_to_dict(parse_app_run_config(APP_DIR, text)), **overrides}
    store = RunStore.create(runs_dir / name, name, stored, num_rounds=5)
    store.update_run(state=state)
    store.close()


def test_resume_runs_only_what_did_not_complete_and_checks_the_config(tmp_path):
    # Prepare: one run completed, one stopped
    runs_dir = tmp_path / "runs"
    make_sweep_run(runs_dir, "s-seed=1", "completed")
    make_sweep_run(runs_dir, "s-seed=2", "stopped")

    # Execute
    steps = plan_sweep(APP_DIR, "seed=1,2,3", "", "s", runs_dir, resume=True)

    # Assert
    assert [(s.combination.run_name, s.action) for s in steps] == [
        ("s-seed=1", "done"),
        ("s-seed=2", "resume"),
        ("s-seed=3", "run"),
    ]
    assert "resume=true" in steps[1].planned.run_config
    assert "resume=true" not in steps[2].planned.run_config
    with pytest.raises(ConfigError, match="already exists .* continue the sweep with --resume"):
        plan_sweep(APP_DIR, "seed=1,2,3", "", "s", runs_dir, resume=False)
    with pytest.raises(ConfigError, match="started with lr=0.05, this sweep asks for 0.1"):
        plan_sweep(APP_DIR, "seed=1,2", "lr=0.1", "s", runs_dir, resume=True)


def test_runs_dir_that_is_a_file_unwritable_or_not_carried_is_refused(
    tmp_path, capsys, monkeypatch
):
    # Prepare
    a_file = tmp_path / "file"
    a_file.write_text("x")
    quoted = tmp_path / 'a"b'

    # Execute
    results = [
        run_cli(capsys, "--runs-dir", a_file, "sweep", "--grid", "seed=1"),
        run_cli(capsys, "--runs-dir", a_file / "runs", "sweep", "--grid", "seed=1"),
        run_cli(capsys, "--runs-dir", quoted, "sweep", "--grid", "seed=1"),
    ]
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    results.append(run_cli(capsys, "--runs-dir", tmp_path / "ro", "sweep", "--grid", "seed=1"))

    # Assert: exit 2, one line each, nothing made
    messages = ["is a file, not a folder", "is a file", "cannot carry", "not writable"]
    for (code, out, err), message in zip(results, messages, strict=True):
        assert code == EXIT_CONFIG and out == "" and len(err.splitlines()) == 1
        assert message in err
    assert not quoted.exists() and not (tmp_path / "ro").exists()


def test_resume_refuses_a_file_a_link_out_and_an_unreadable_stored_config(tmp_path):
    # Prepare: s-seed=1 a plain file, s-seed=2 a link out of the runs folder, s-seed=3
    # completed but its stored config unreadable
    runs_dir, outside = tmp_path / "runs", tmp_path / "outside"
    make_sweep_run(outside, "s-seed=2", "completed")
    make_sweep_run(runs_dir, "s-seed=3", "completed")
    with sqlite3.connect(runs_dir / "s-seed=3" / "run.db") as db:
        db.execute("UPDATE run SET config_json = '[['")
    (runs_dir / "s-seed=1").write_text("not a run")
    (runs_dir / "s-seed=2").symlink_to(outside / "s-seed=2")

    # Execute / Assert
    for grid, message in (
        ("seed=1", "s-seed=1 is a file, not a run folder"),
        ("seed=2", "is a link out of the runs folder"),
        ("seed=3", "stored config has no readable seed"),
    ):
        with pytest.raises(ConfigError, match=message):
            plan_sweep(APP_DIR, grid, "", "s", runs_dir, resume=True)


def test_every_combination_is_carried_to_the_run_as_written(tmp_path):
    # Prepare: a value with a double quote, typed in single quotes
    grid = "tracking-experiment='a\"b',c"
    steps = plan_sweep(APP_DIR, grid, "", "s", tmp_path, resume=False)

    # Execute
    configs = [parse_app_run_config(APP_DIR, step.planned.run_config) for step in steps]

    # Assert: each run writes where the sweep looks
    assert [c.tracking_experiment for c in configs] == ['a"b', "c"]
    assert [step.planned.run_dir for step in steps] == [tmp_path / c.run_name for c in configs]
    assert [c.run_name for c in configs] == ['s-tracking-experiment=a"b', "s-tracking-experiment=c"]


# ------------------------------------------------------------------- real
def sweep_command(runs_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "server.ui.cli",
        "--runs-dir",
        str(runs_dir),
        "sweep",
        "--grid",
        GRID,
        "--run-config",
        "num-server-rounds=2 local-epochs=1",
        "--supernodes",
        "2",
        "--parallel",
        "2",
        "--name",
        "sw",
        "--target",
        "0.5",
        *extra,
    ]


@pytest.mark.slow
def test_sweep_2x2_survives_ctrl_c_and_resumes_the_rest(tmp_path):
    # Prepare
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "FEDCOORD_HOME": str(tmp_path / "home")}
    output = tmp_path / "sweep.out"

    # Execute: Ctrl-C once the second pair of runs is in flight
    with open(output, "w") as out:
        sweep = subprocess.Popen(
            sweep_command(runs_dir), stdout=out, stderr=subprocess.STDOUT, cwd=APP_DIR, env=env
        )
        try:
            wait_until(lambda: "[4/4] started" in output.read_text(), 400, "the second pair")
            tree = descendant_pids(sweep.pid)
            sweep.send_signal(signal.SIGINT)
            sweep.wait(timeout=120)
        finally:
            sweep.kill()

    # Assert: exit 130, the first pair completed and kept, the rest not, nothing left running
    text = output.read_text()
    assert sweep.returncode == EXIT_INTERRUPTED, text[-3000:]
    assert "sweep --name sw --resume" in text.strip().splitlines()[-1]
    states = {
        path.parent.name: json.loads(
            fedcoord(runs_dir, "status", path.parent.name, "--json").stdout
        )
        for path in runs_dir.glob("*/run.db")
    }
    assert states["sw-strategy=fedavg-seed=1"]["state"] == "completed"
    assert states["sw-strategy=fedavg-seed=2"]["state"] == "completed"
    assert tree and not [pid for pid in tree if process_alive(pid)]

    # Execute: --resume runs only the median pair
    resumed = subprocess.run(
        sweep_command(runs_dir, "--resume"),
        capture_output=True,
        text=True,
        cwd=APP_DIR,
        env=env,
        timeout=SWEEP_TIMEOUT_S,
    )

    # Assert: exit 0, the table of four runs and the mean and std over seeds
    assert resumed.returncode == EXIT_OK, (resumed.stdout + resumed.stderr)[-3000:]
    lines = resumed.stdout.splitlines()
    assert "2 already completed" in lines[0]
    assert not [line for line in lines if "strategy=fedavg" in line and "started" in line]
    assert len([line for line in lines if "completed in" in line]) == 2
    table = lines[lines.index(next(li for li in lines if li.startswith("RUN "))) :]
    assert len([line for line in table if line.startswith("sw-") and "completed" in line]) == 4
    seeds = [line for line in table if line.startswith(("OVER SEEDS", "strategy="))]
    assert seeds[1].startswith("strategy=fedavg  2") and seeds[2].startswith("strategy=median  2")
    assert " ± " in seeds[1]

    # Execute / Assert: compare reads the real runs, table and PNG
    png = tmp_path / "compare.png"
    compared = fedcoord(
        runs_dir, "compare", "sw-strategy=fedavg-seed=1", "sw-strategy=median-seed=2", "-o", png
    )
    assert compared.stdout.splitlines()[1].split()[2:4] == ["fedavg", "seed=1"]
    assert compared.stdout.splitlines()[2].split()[2:4] == ["median", "seed=2"]
    assert png.read_bytes().startswith(b"\x89PNG")
