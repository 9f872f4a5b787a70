"""Operator weight commands: one check at enqueue (CLI, dashboard) and again when applied."""

from __future__ import annotations

import math
import re

import pytest

from server.control import ControlChannel, parse_weight_argument
from server.record import lifecycle
from server.record.operations import request_weight
from server.record.weights import find_weight_problem
from server.ui import cli
from tests.helpers import make_run


@pytest.mark.parametrize(
    ("partition", "weight", "expected"),
    [
        (-1, 1.0, "partition must be in [0, 2^31), got -1"),
        (2**31, 1.0, "partition must be in [0, 2^31), got 2147483648"),
        (10**30, 1.0, "partition must be in [0, 2^31)"),
        (True, 1.0, "partition must be an integer, got bool"),
        (1.0, 1.0, "partition must be an integer, got float"),
        (0, -1.0, "weight must be finite and >= 0 and at most 1e+06, got -1.0"),
        (0, math.nan, "weight must be finite and >= 0 and at most 1e+06, got nan"),
        (0, math.inf, "got inf"),
        (0, 1e6 + 1, "got 1000001.0"),
        (0, 10**400, "weight must be finite and >= 0 and at most 1e+06"),
        (0, True, "weight must be a number, got bool"),
        (0, "2", "weight must be a number, got str"),
    ],
)
def test_out_of_range_weight_commands_are_refused_with_the_reason(partition, weight, expected):
    # Execute
    problem = find_weight_problem(partition, weight)

    # Assert
    assert problem is not None and expected in problem


@pytest.mark.parametrize(("partition", "weight"), [(0, 0.0), (2**31 - 1, 1e6), (3, 2), (7, 0.5)])
def test_weight_commands_in_range_are_accepted(partition, weight):
    assert find_weight_problem(partition, weight) is None


@pytest.mark.parametrize(
    ("argument", "weight"), [("1e999", "inf"), ("nan", "nan"), ("-0.5", "-0.5"), ("2e6", "2e6")]
)
def test_the_cli_refuses_at_enqueue_and_queues_nothing(tmp_path, capsys, argument, weight):
    # Prepare
    store = make_run(tmp_path, "w", rounds=(), nodes=False)

    # Execute
    code = cli.main(["--runs-dir", str(tmp_path), "weight", "w", "0", argument])
    err = capsys.readouterr().err

    # Assert: one line naming the bound, nothing queued
    assert code != 0
    assert err.count("\n") == 1 and "at most 1e+06" in err and "Traceback" not in err
    assert store.pending_commands() == []


def test_the_cli_refuses_a_partition_out_of_range(tmp_path, capsys):
    # Prepare
    store = make_run(tmp_path, "w", rounds=(), nodes=False)

    # Execute
    code = cli.main(["--runs-dir", str(tmp_path), "weight", "w", str(2**31), "1.0"])

    # Assert
    assert code != 0 and "partition must be in [0, 2^31)" in capsys.readouterr().err
    assert store.pending_commands() == []


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("0=nan", "weight must be finite"),
        ("0=1e300", "at most 1e+06"),
        ("-4=1.0", "partition must be in [0, 2^31)"),
        ("99999999999999999999=1", "partition must be in [0, 2^31)"),
        ("abc", "is not PARTITION=WEIGHT"),
        ("0=x", "is not PARTITION=WEIGHT"),
        ("", "is not PARTITION=WEIGHT"),
    ],
)
def test_a_stored_weight_argument_is_checked_again(argument, expected):
    with pytest.raises(lifecycle.InvalidTransitionError, match=re.escape(expected)):
        parse_weight_argument(argument)


def test_a_queued_command_that_fails_when_applied_is_refused_once_and_never_retried(tmp_path):
    # Prepare: commands written straight into run.db, past the enqueue check
    store = make_run(tmp_path, "w", rounds=(), nodes=False)
    applied: list[tuple[int, float]] = []
    store.add_command("weight", "0=nan")
    store.add_command("weight", "3=1e300")
    store.add_command("weight", "junk")
    store.add_command("weight", "2=2.5")
    channel = ControlChannel(store, lambda p, w: applied.append((p, w)))

    # Execute: two rounds' worth of command handling, as after a resume
    channel.between_rounds()
    channel.between_rounds()

    # Assert: the good one applied once; each bad one refused once with its reason
    assert applied == [(2, 2.5)]
    assert store.pending_commands() == []
    refused = [e["message"] for e in store.events(limit=100) if e["kind"] == "refused"]
    assert len(refused) == 3
    assert "command weight '0=nan' refused: weight must be finite" in refused[0]
    assert "at most 1e+06, got 1e+300" in refused[1]
    assert "is not PARTITION=WEIGHT" in refused[2]


def test_a_weight_callback_that_raises_refuses_the_command_and_the_run_goes_on(tmp_path):
    # Prepare
    store = make_run(tmp_path, "w", rounds=(), nodes=False)
    store.add_command("weight", "1=2.0")

    def explode(partition: int, weight: float) -> None:
        raise RuntimeError("strategy refused")

    channel = ControlChannel(store, explode)

    # Execute
    channel.between_rounds()
    channel.between_rounds()

    # Assert
    assert store.pending_commands() == []
    refused = [e["message"] for e in store.events(limit=100) if e["kind"] == "refused"]
    assert refused == ["command weight '1=2.0' refused: strategy refused"]


def test_request_weight_queues_the_checked_values(tmp_path):
    # Prepare
    store = make_run(tmp_path, "w", rounds=(), nodes=False)

    # Execute
    message = request_weight(store.run_dir, 4, 2)

    # Assert
    assert "partition 4 weight 2.0 queued" in message
    assert [(c["command"], c["argument"]) for c in store.pending_commands()] == [
        ("weight", "4=2.0")
    ]
