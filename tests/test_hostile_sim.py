"""Hostile nodes in a real simulation: every malformed reply is rejected, the run goes on."""

import math
import sqlite3

import pytest

from client.hostile import EVALUATE_KINDS, TRAIN_KINDS, evaluate_kind, train_kind

HOSTILE = frozenset({0, 1, 2, 3})
HONEST = (4, 5, 6)
# Enough rounds for the hostile partitions to send every train kind once
ROUNDS = math.ceil(len(TRAIN_KINDS) / len(HOSTILE))

# The reason the server records for each kind (a fragment of it)
TRAIN_REASONS = {
    "num-examples-huge": "num-examples 1e+19 exceeds 9007199254740992",
    "num-examples-int64": "num-examples 9223372036854775809 exceeds 9007199254740992",
    "num-examples-list": "num-examples must be an integer, got list",
    "partition-id-huge": "partition-id 1e+300 exceeds 2147483647",
    "metric-list": "metric 'train-loss' is not a finite number: [0.1, 0.2]",
    "metric-range": "metric 'train-accuracy' 7.5 is outside [0, 1]",
    "metric-nan": "metric 'train-loss' is not a finite number: nan",
    "too-many-metrics": "metrics, more than 64",
    "no-arrays": "reply carries no arrays",
    "nan-values": "holds NaN or infinite values",
    "wrong-shape": "has shape (801,), expected (32, 1, 5, 5)",
    "array-object-dtype": "dtype 'object' is not a plain numeric dtype",
    "array-big-endian": "dtype '>f4' is not little-endian",
    "array-stype": "stype 'torch.Tensor' is not 'numpy.ndarray'",
    "array-not-npy": "data is not .npy",
    "array-empty": "data is empty",
    "array-short": "data holds 3199 byte(s) after its .npy header",
    "array-claims-huge": "shape (1000000000000,) of float32 needs 4000000000000",
    "array-infinite-dim": "dimension inf is not a non-negative integer",
    "packed-infinite-dim": "bad packed layout entry for 'features.0.weight': shape [inf]",
    "packed-unreadable-layout": "unreadable packed layout",
    "packed-short": "packed data ends inside array",
}
EVALUATE_REASONS = {
    "eval-loss-negative": "evaluate reply: metric 'eval-loss' -1.0 is outside [0, inf]",
    "eval-loss-nan": "evaluate reply: metric 'eval-loss' is not a finite number: nan",
    "eval-loss-list": "evaluate reply: metric 'eval-loss' is not a finite number: [1.0]",
    "eval-accuracy-range": "evaluate reply: metric 'eval-accuracy' 1.5 is outside [0, 1]",
    "eval-num-examples-huge": "evaluate reply: num-examples 1e+19 exceeds",
    "eval-num-examples-negative": "evaluate reply: num-examples must be >= 0, got -5",
    "eval-partition-id": "evaluate reply: partition-id must be >= -1, got -7",
    "eval-missing-accuracy": "evaluate reply lacks eval-accuracy",
    "eval-no-metrics": "evaluate reply carries no metrics",
}


def test_every_kind_has_its_expected_reason_and_is_sent_within_the_run():
    # Execute
    sent_train = {train_kind(r, p, HOSTILE) for r in range(1, ROUNDS + 1) for p in HOSTILE}
    sent_evaluate = {evaluate_kind(r, p, HOSTILE) for r in range(1, ROUNDS + 1) for p in HOSTILE}

    # Assert
    assert set(TRAIN_REASONS) == set(TRAIN_KINDS) == sent_train
    assert set(EVALUATE_REASONS) == set(EVALUATE_KINDS) == sent_evaluate


@pytest.mark.slow
def test_hostile_nodes_are_rejected_with_their_reasons_and_do_not_hurt_the_model(simulate):
    # Execute: 7 nodes; partitions 0-3 send a malformed train and evaluate reply each round
    run = simulate(
        len(HOSTILE) + len(HONEST),
        "hostile",
        hostile=",".join(map(str, sorted(HOSTILE))),
        **{"num-server-rounds": ROUNDS, "round-timeout": 120.0, "local-epochs": 3},
    )

    # Assert: the run completes, every round with the three honest updates only
    assert run.returncode == 0, run.output[-3000:]
    assert run.status()["state"] == "completed"
    with sqlite3.connect(run.run_dir / "run.db") as db:
        rounds = db.execute(
            "SELECT accepted, rejected, failed, updated, central_accuracy, federated_accuracy,"
            " federated_loss FROM rounds WHERE round > 0 ORDER BY round"
        ).fetchall()
        partitions = dict(db.execute("SELECT node_id, partition_id FROM nodes").fetchall())
        nodes = {
            row[0]: row[1:]
            for row in db.execute("SELECT partition_id, rejected, rounds_joined FROM nodes")
        }
        rejections = db.execute("SELECT round, node_id, kind, reason FROM rejections").fetchall()
    assert [row[:4] for row in rounds] == [(3, 4, 0, 1)] * ROUNDS

    # Assert: every malformed reply is rejected, with its reason, against its node
    reasons: dict[tuple[int, int], list[str]] = {}
    for server_round, node_id, kind, reason in rejections:
        assert kind == "rejected", reason
        reasons.setdefault((server_round, partitions[node_id]), []).append(reason)
    for server_round in range(1, ROUNDS + 1):
        for partition in HOSTILE:
            got = reasons.pop((server_round, partition))
            expected_train = TRAIN_REASONS[train_kind(server_round, partition, HOSTILE)]
            expected_evaluate = EVALUATE_REASONS[evaluate_kind(server_round, partition, HOSTILE)]
            assert len(got) == 2, got
            assert any(expected_train in reason for reason in got), (expected_train, got)
            assert any(expected_evaluate in reason for reason in got), (expected_evaluate, got)
    assert reasons == {}
    for partition in HOSTILE:
        assert nodes[partition] == (2 * ROUNDS, 0)
    for partition in HONEST:
        assert nodes[partition] == (0, ROUNDS)

    # Assert: the model learns as without them; federated metrics stay finite and in range
    final_accuracy = rounds[-1][4]
    assert final_accuracy > 0.85, [row[4] for row in rounds]
    for *_, federated_accuracy, federated_loss in rounds:
        assert 0.0 <= federated_accuracy <= 1.0 and 0.0 <= federated_loss < 10.0

    # Assert: the CLI's node table shows the hostile nodes' rejections
    table = run.cli("nodes", "hostile").stdout
    assert table.count("evaluate reply: ") >= len(HOSTILE), table
