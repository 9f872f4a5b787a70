"""One reader of ``--run-config`` text for every launcher: nothing flwr would drop gets through."""

from __future__ import annotations

import pytest
from flwr.common.config import parse_config_args

from server.launch.run_config_text import check_known_keys, parse_run_config_text
from server.launch.simulation import EXIT_CONFIG, plan_run
from server.ui import cli
from task.config import ConfigError
from tests.helpers import APP_DIR

# (text, what flwr alone does with it, the one line that refuses it)
REFUSED = [
    (
        "num-server-rounds= 3",
        "drops the key",
        "num-server-rounds has no value, and flwr would drop",
    ),
    ("lr=0.1 oops", "drops the word", "'oops' is not key=value, and flwr would drop it"),
    (
        "dataset=mnist",
        "invalid format",
        "invalid format for key 'dataset': mnist is not a number, true / false or a quoted "
        "string; put string values in quotes, e.g. dataset='mnist'",
    ),
    ("lr=abc", "invalid format", "invalid format for key 'lr': abc is not a number"),
    ("seed='x", "invalid format", "invalid format for key 'seed': 'x opens a quote"),
    ("dataset='a b", "drops b", "invalid format for key 'dataset': 'a opens a quote"),
    ("seed=1 seed=2", "invalid format", "seed is given twice; give it once"),
    ("a/b=1", "invalid format", "'a/b' is not a run-config key"),
    ("x.toml", "reads the file", "give key=value pairs, not a .toml file"),
]


@pytest.mark.parametrize(("text", "flower", "message"), REFUSED)
def test_text_flwr_would_drop_or_misread_is_refused_naming_the_key(text, flower, message):
    with pytest.raises(ConfigError) as refused:
        parse_run_config_text(text)

    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_what_flwr_reads_is_read_the_same():
    text = "num-server-rounds=3 dataset='mnist' lr=0.05 resume=false faults=\"0=raise\" x.y=1"

    assert parse_run_config_text(text) == parse_config_args([text])
    assert parse_run_config_text("  ") == {}


def test_a_misspelt_key_names_the_nearest_valid_one():
    valid = ["num-server-rounds", "strategy", "seed"]

    with pytest.raises(ConfigError, match=r"^unknown run-config key 'num-server-round'; did you "):
        check_known_keys({"num-server-round": 3}, valid)
    with pytest.raises(ConfigError, match=r"did you mean 'strategy'\?$"):
        check_known_keys({"strategies": "x"}, valid)
    with pytest.raises(ConfigError, match="'bogus'; valid keys: num-server-rounds, seed, strategy"):
        check_known_keys({"bogus": 1}, valid)
    check_known_keys({"seed": 1}, valid)


def test_the_launcher_and_the_sweep_refuse_the_same_text_alike(tmp_path, capsys):
    # Execute: the launcher's check (fedcoord run, make demo) and the sweep's
    with pytest.raises(ConfigError) as launcher:
        plan_run(APP_DIR, "num-server-rounds= 3")
    code = cli.main(
        [
            "--runs-dir",
            str(tmp_path),
            "sweep",
            "--grid",
            "seed=1,2",
            "--run-config",
            "num-server-rounds= 3",
        ]
    )
    sweep = capsys.readouterr().err

    # Assert: one message, one line each
    assert code == EXIT_CONFIG and sweep == f"fedcoord: {launcher.value}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("num-server-rounds= 3", "num-server-rounds has no value, and flwr would drop it"),
        (
            "num-server-round=3",
            "unknown run-config key 'num-server-round'; did you mean 'num-server-rounds'?",
        ),
        ("dataset=mnist", "put string values in quotes, e.g. dataset='mnist'"),
    ],
)
def test_fedcoord_run_refuses_in_one_line_with_exit_2(tmp_path, capsys, text, message):
    # Execute
    code = cli.main(["run", "--flwr-home", str(tmp_path / "flwr_home"), "--run-config", text])

    # Assert: nothing started
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG and err.startswith("fedcoord: ") and message in err
    assert err.count("\n") == 1 and not (tmp_path / "flwr_home").exists()
