"""The roll call is a node's identity: weights, sample and fold order come from the record.

A node that answered the roll call with -1 (or with nothing valid) has no partition
recorded; it may not claim one later. Two nodes cannot hold one partition.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from server.record.runs import run_status
from server.ui import cli
from strategies.records import pack_arrays
from task import keys
from tests.helpers import ReplyingGrid, make_coordinator, model, rejections

NamedArrays = dict[str, np.ndarray]
pytestmark = pytest.mark.usefixtures("server_identity")


def claiming_reply(claims: dict[int, int | None], step: dict[int, float]):  # noqa: ANN201
    """Node n adds ``step[n]`` to every value and claims partition ``claims[n]``."""

    def reply(node_id: int, message_type: str, received: NamedArrays) -> RecordDict:
        if message_type == "evaluate":
            metrics = {keys.NUM_EXAMPLES: 10, keys.EVAL_LOSS: 0.5, keys.EVAL_ACCURACY: 0.5}
            return RecordDict({keys.METRICS: MetricRecord(metrics)})
        trained = {name: value + np.float32(step[node_id]) for name, value in received.items()}
        metrics: dict[str, int] = {keys.NUM_EXAMPLES: 10}
        if claims.get(node_id) is not None:
            metrics[keys.PARTITION_ID] = claims[node_id]  # type: ignore[assignment]
        return RecordDict({keys.ARRAYS: pack_arrays(trained), keys.METRICS: MetricRecord(metrics)})

    return reply


def test_a_node_without_a_partition_cannot_claim_one_to_take_its_weight(tmp_path):
    # Prepare: partition 0 weighs 1000, partition 1 weighs 0. Node 30 holds partition
    # 1 but answers the roll call with -1, then claims partition 0 in its train replies
    roll_call = {20: 0, 30: -1, 40: 2}
    claims = {20: 0, 30: 0, 40: None}
    steps = {20: 1.0, 30: 100.0, 40: 1.0}
    grid = ReplyingGrid(list(roll_call), claiming_reply(claims, steps), partitions=roll_call)
    coordinator = make_coordinator(
        tmp_path,
        grid,
        strategy="weighted",
        **{"node-weights": "0=1000,1=0", "min-train-nodes": 2, "num-server-rounds": 2},
    )

    # Execute: two rounds
    arrays = coordinator.run_round(1, model())
    arrays = coordinator.run_round(2, arrays)

    # Assert: each round rejects node 30's claim; the mean is of nodes 20 and 40 only
    reasons = [(row[0], row[1], row[2]) for row in rejections(tmp_path)]
    claim = "partition-id 0 claimed, but this node gave no partition at the roll call"
    assert [(r, n) for r, n, reason in reasons if reason.startswith(claim)] == [
        (1, "30"),
        (2, "30"),
    ]
    np.testing.assert_allclose(arrays["w"], np.full((2, 3), 2.0, dtype=np.float32))
    nodes = {int(n["node_id"]): n["partition_id"] for n in coordinator.store.nodes()}
    assert nodes == {20: 0, 30: None, 40: 2}
    assert coordinator.partitions == {20: 0, 30: None, 40: 2}


def test_a_partition_given_by_two_nodes_is_refused_to_the_second(tmp_path, capsys):
    # Prepare: nodes 20 and 30 both answer partition 0 (say, two nodes started with
    # --partition-id 0); partition 0 weighs 1000
    roll_call = {20: 0, 30: 0, 40: 1}
    claims = {20: 0, 30: 0, 40: 1}
    grid = ReplyingGrid(
        list(roll_call), claiming_reply(claims, dict.fromkeys(roll_call, 1.0)), partitions=roll_call
    )
    coordinator = make_coordinator(
        tmp_path, grid, strategy="weighted", **{"node-weights": "0=1000", "min-train-nodes": 2}
    )

    # Execute
    coordinator.run_round(1, model())

    # Assert: node 30 has no partition, is told why (rejections, nodes, an event), and
    # its train reply claiming partition 0 is rejected
    assert coordinator.partitions == {20: 0, 30: None, 40: 1}
    reasons = {(row[1], row[2]) for row in rejections(tmp_path)}
    assert (
        "30",
        "query reply: partition-id 0 is already node 20's; this node takes part "
        "without a partition (check the nodes' --partition-id)",
    ) in reasons
    assert any(
        node == "30" and "claimed, but this node gave no partition" in reason
        for node, reason in reasons
    )
    events = [e["message"] for e in coordinator.store.events() if e["kind"] == "roll-call-refused"]
    assert events == [
        "round 1: node 30: partition-id 0 is already node 20's; this node takes part without "
        "a partition (check the nodes' --partition-id)"
    ]
    last_error = {int(n["node_id"]): n["last_error"] for n in coordinator.store.nodes()}
    assert "partition-id 0 claimed" in str(last_error[30])
    assert run_status(tmp_path / "run")["roll_call_refused"] == events
    assert cli.main(["--runs-dir", str(tmp_path), "status", "run"]) == 0
    assert "roll call  refused round 1: node 30: partition-id 0" in capsys.readouterr().out


def test_a_node_silent_at_a_short_roll_call_is_asked_again_then_known_without_one(tmp_path):
    # Prepare: node 9 never answers; the roll call waits 0.2 s and asks at most twice
    class SilentAtRollCall(ReplyingGrid):
        def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
            replies = super().pull_messages(message_ids)
            return [
                r
                for r in replies
                if not (r.metadata.src_node_id == 9 and r.metadata.message_type == "query")
            ]

    grid = SilentAtRollCall([7, 8, 9], claiming_reply({}, dict.fromkeys([7, 8, 9], 1.0)))
    coordinator = make_coordinator(tmp_path, grid)

    # Execute: two roll calls
    coordinator._roll_call(1, [7, 8, 9], timeout_s=0.2, attempts=2)
    after_first = dict(coordinator.partitions)
    coordinator._roll_call(1, [7, 8, 9], timeout_s=0.2, attempts=2)

    # Assert: not known after the first (asked again), known without a partition after
    # the second; only node 9 was asked the second time
    assert after_first == {7: 7, 8: 8}
    assert coordinator.partitions == {7: 7, 8: 8, 9: None}
    queries = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query"]
    assert queries == [7, 8, 9, 9]


def test_leaving_and_returning_never_changes_a_nodes_identity(tmp_path):
    # Prepare: node 30 (partition 1) leaves; while node 20 (partition 0) is away too,
    # node 30 comes back answering partition 0; then a new node 50 answers partition 0
    grid = ReplyingGrid([20, 30], claiming_reply({}, {20: 1.0, 30: 1.0, 50: 1.0}))
    grid.partitions = {20: 0, 30: 1, 50: 0}
    coordinator = make_coordinator(tmp_path, grid)
    coordinator._roll_call(1, [20, 30])
    grid.partitions[30] = 0  # what node 30 would answer now

    # Execute
    coordinator._roll_call(2, [30])  # node 20 away, node 30 back
    coordinator._roll_call(3, [30, 50])  # a new node takes the absent node's partition
    coordinator._roll_call(4, [20, 30, 50])  # node 20 back

    # Assert: node 30 stays partition 1; partition 0 passed to node 50 with an event,
    # and node 20, back, has none (it is not asked again)
    assert coordinator.partitions == {20: None, 30: 1, 50: 0}
    moved = [
        e["message"] for e in coordinator.store.events() if e["kind"] == "roll-call-transferred"
    ]
    assert moved == ["round 3: partition 0 passes from node 20, which left, to node 50"]
    queries = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query"]
    assert queries == [20, 30, 50]


def test_a_resumed_coordinator_keeps_the_roll_calls_record(tmp_path):
    # Prepare: a round with nodes 20 (partition 0) and 30 (-1: no partition)
    roll_call = {20: 0, 30: -1}
    grid = ReplyingGrid(
        list(roll_call), claiming_reply({20: 0}, {20: 1.0, 30: 1.0}), partitions=roll_call
    )
    first = make_coordinator(tmp_path, grid)
    first.run_round(1, model())

    # Execute: a new coordinator on the same run store (the ServerApp after a resume)
    from server.coordinator import Coordinator

    second = Coordinator(grid, first.strategy, first.store, first.config, first.evaluate_fn)

    # Assert: node 30 cannot take a partition by being asked again
    assert second.partitions == {20: 0, 30: None}
