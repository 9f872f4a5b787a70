"""Input refused at the door: a privacy budget no round fits in, a runs folder that is not there."""

from __future__ import annotations

import pytest

from server.launch.run_config_text import with_runs_dir
from server.launch.simulation import EXIT_CONFIG, plan_run
from server.record.store import RunStore
from server.ui import cli
from strategies.accountant import PrivacyAccountant, PrivacyEvent
from task.config import ConfigError
from tests.helpers import APP_DIR

NOISY = "strategy='clipped' noise-multiplier=1.0"


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = cli.main([*map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_budget_below_one_round_is_refused_naming_what_a_round_costs(tmp_path):
    # Prepare: the accountant's epsilon of one round at noise 1, no amplification
    one_round = PrivacyAccountant(1e-5, "add-or-remove-one").epsilon_after(
        PrivacyEvent("fraction", 1.0)
    )
    text = f"{NOISY} target-epsilon=0.5 runs-dir='{tmp_path}'"

    # Execute
    with pytest.raises(ConfigError) as refused:
        plan_run(APP_DIR, text, supernodes=10)

    # Assert
    message = str(refused.value)
    assert message.startswith(
        f"target-epsilon=0.5 is below the epsilon one round costs: {one_round:.4g} "
        "(strategy 'clipped', noise-multiplier 1, sampling 'fraction', target-delta 1e-05)"
    )
    assert "\n" not in message and 1 < one_round < 10


def test_a_budget_that_fits_a_round_and_no_budget_are_accepted(tmp_path):
    for budget in (50.0, 0.0):
        planned = plan_run(APP_DIR, f"{NOISY} target-epsilon={budget} runs-dir='{tmp_path}'")
        assert planned.run_dir.parent == tmp_path


def test_fixed_sampling_is_checked_when_the_nodes_are_known(tmp_path):
    # Prepare: a round of k = 5 of 10 nodes, replace-one adjacency
    text = f"{NOISY} sampling='fixed' fraction-train=0.5 target-epsilon=0.5 runs-dir='{tmp_path}'"

    # Execute / Assert: unknown population (the sweep's plan) leaves it to the ServerApp
    plan_run(APP_DIR, text)
    with pytest.raises(ConfigError, match=r"sampling 'fixed', 10 nodes, target-delta"):
        plan_run(APP_DIR, text, supernodes=10)


def test_fedcoord_run_refuses_the_budget_with_exit_2_and_nothing_started(tmp_path, capsys):
    # Execute
    code, out, err = run_cli(
        capsys,
        "run",
        "--flwr-home",
        tmp_path / "flwr_home",
        "--runs-dir",
        tmp_path / "runs",
        "--run-config",
        f"{NOISY} target-epsilon=0.1",
    )

    # Assert
    assert code == EXIT_CONFIG and out == "" and err.count("\n") == 1
    assert err.startswith("fedcoord: target-epsilon=0.1 is below the epsilon one round costs: ")
    assert not (tmp_path / "flwr_home").exists() and not (tmp_path / "runs").exists()


READING_VERBS = [
    ["runs"],
    ["status"],
    ["watch"],
    ["nodes"],
    ["export"],
    ["verify"],
    ["plot", "-o", "x.png"],
    ["compare", "a", "b"],
    ["pause", "a"],
    ["weight", "a", "0", "1"],
]


@pytest.mark.parametrize("verb", READING_VERBS, ids=lambda verb: verb[0])
@pytest.mark.parametrize("where", ["before", "after"])
def test_a_missing_runs_folder_is_named_before_or_after_the_verb(tmp_path, capsys, verb, where):
    # Prepare
    missing = tmp_path / "nonexistent"
    option = ["--runs-dir", missing]
    args = [*option, *verb] if where == "before" else [*verb, *option]

    # Execute
    code, out, err = run_cli(capsys, *args)

    # Assert: one line, exit 2, not "no runs"
    assert code == 2 and out == ""
    assert err == (
        f"fedcoord: --runs-dir {missing}: no such folder; name the runs-dir the runs were "
        "started with (--runs-dir goes before or after the verb)\n"
    )


def test_the_default_runs_folder_missing_and_a_file_are_named(tmp_path, capsys, monkeypatch):
    # Prepare
    monkeypatch.setenv("FEDCOORD_HOME", str(tmp_path / "home"))
    (tmp_path / "file").write_text("x")

    # Execute
    first_look = run_cli(capsys, "runs")
    default = run_cli(capsys, "status")
    a_file = run_cli(capsys, "status", "--runs-dir", tmp_path / "file")

    # Assert: a first look at the default folder is no error; reading a run there is
    assert first_look[0] == 0 and first_look[1].startswith("no runs yet in ")
    assert default[0] == 2 and "no runs folder at " in default[2]
    assert "(the default, $FEDCOORD_HOME/runs): no run has been started there" in default[2]
    assert a_file[0] == 2 and a_file[2].endswith(
        ": not a folder; name the folder of the run directories\n"
    )


def test_runs_dir_after_the_verb_reads_that_folder(tmp_path, capsys):
    # Prepare
    runs_dir = tmp_path / "runs"
    RunStore.create(runs_dir / "exp", "exp", {}, 3).close()

    # Execute
    code, out, _ = run_cli(capsys, "runs", "--runs-dir", runs_dir)

    # Assert
    assert code == 0 and "exp" in out


def test_every_verb_takes_runs_dir_before_and_after_it():
    parser = cli.build_parser()
    for verb in [*READING_VERBS, ["run"], ["sweep", "--grid", "seed=1"], ["dashboard"]]:
        assert parser.parse_args(["--runs-dir", "/a", *verb]).runs_dir == "/a"
        assert parser.parse_args([*verb, "--runs-dir", "/b"]).runs_dir == "/b"
        assert parser.parse_args(["--runs-dir", "/a", *verb, "--runs-dir", "/b"]).runs_dir == "/b"


def test_runs_dir_of_fedcoord_run_becomes_the_runs_runs_dir(tmp_path):
    # Execute / Assert: added when the run-config has none, kept when it agrees
    assert with_runs_dir("seed=1", tmp_path) == f"seed=1 runs-dir='{tmp_path}'"
    same = f"runs-dir='{tmp_path}'"
    assert with_runs_dir(same, tmp_path) == same

    # Execute / Assert: refused when the two differ, or a "'" cannot be carried
    with pytest.raises(ConfigError, match=r"--runs-dir .* and --run-config runs-dir='/x' differ"):
        with_runs_dir("runs-dir='/x'", tmp_path)
    with pytest.raises(ConfigError, match="cannot carry"):
        with_runs_dir("", tmp_path / "it's")
