"""Faulty clients in a real simulation: every round still closes with the others."""

import sqlite3

import numpy as np
import pytest

from client.faults import InjectedFaultError, after_training, before_training
from server.phases import summarize_error
from task.config import ConfigError
from task.config_values import parse_faults

ROUNDS = 2


def test_parse_faults_and_refuse_unknown_kinds():
    assert parse_faults("0=raise, 2=nan") == {0: "raise", 2: "nan"}
    assert parse_faults("") == {}
    with pytest.raises(ConfigError, match="raise, sleep, nan"):
        parse_faults("1=explode")


def test_fault_actions():
    with pytest.raises(InjectedFaultError):
        before_training("raise", 1.0)
    arrays = {"w": np.ones(3, dtype=np.float32), "n": np.array(1, dtype=np.int64)}
    poisoned = after_training("nan", arrays)
    assert np.isnan(poisoned["w"]).all() and not np.isnan(arrays["w"]).any()
    assert after_training(None, arrays) is arrays


@pytest.mark.slow
def test_raising_sleeping_and_nan_clients_are_counted_against_their_nodes(simulate):
    # Execute: 5 nodes; partition 0 raises, 1 sleeps past the deadline, 2 replies NaN
    run = simulate(
        5,
        "faults",
        faults="0=raise,1=sleep,2=nan",
        **{"num-server-rounds": ROUNDS, "round-timeout": 40.0, "local-epochs": 1},
    )

    # Assert: every round closed with the two healthy nodes and changed the model
    assert run.returncode == 0, run.output[-3000:]
    with sqlite3.connect(run.run_dir / "run.db") as db:
        rounds = db.execute(
            "SELECT accepted, rejected, failed, updated FROM rounds WHERE round > 0"
        ).fetchall()
        nodes = {
            row[0]: row[1:]
            for row in db.execute(
                "SELECT partition_id, failures, rejected, rounds_joined, last_error FROM nodes"
            )
        }
    assert rounds == [(2, 1, 2, 1)] * ROUNDS

    # Assert: each fault is counted against the right node, with its reason
    assert nodes[0][:3] == (ROUNDS, 0, 0) and "injected fault" in nodes[0][3]
    assert nodes[1][0] >= ROUNDS and nodes[1][1:3] == (0, 0)
    assert "round-timeout" in nodes[1][3]
    assert nodes[2][:3] == (0, ROUNDS, 0) and "NaN" in nodes[2][3]
    for healthy in (3, 4):
        assert nodes[healthy][:3] == (0, 0, ROUNDS)

    # Assert: the CLI node table shows the same
    table = run.cli("nodes", "faults").stdout
    assert "injected fault" in table and "round-timeout" in table


def test_error_replies_are_summarised_to_the_clientapp_message():
    # Prepare: the shape of a Ray-wrapped ClientApp exception
    reason = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() "
        "(pid=1, actor_id=ab)\nflwr.clientapp.client_app.ClientAppException: \nException "
        "ClientAppException occurred. Message: injected fault: boom\n'>"
    )

    # Execute
    summary = summarize_error(2, reason)

    # Assert
    assert summary == "error reply (code 2): injected fault: boom"
