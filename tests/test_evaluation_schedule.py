"""Federated evaluation: a share of the nodes, every k rounds and the last, or none."""

from __future__ import annotations

import pytest

from tests.helpers import ReplyingGrid, honest, make_coordinator, model

pytestmark = pytest.mark.usefixtures("server_identity")


def evaluate_messages_per_round(tmp_path, nodes: int, rounds: int, **run_config) -> list[int]:  # noqa: ANN001
    grid = ReplyingGrid(list(range(2, 2 + nodes)), honest)
    coordinator = make_coordinator(tmp_path, grid, **{"num-server-rounds": rounds, **run_config})
    counts, arrays = [], model()
    for server_round in range(1, rounds + 1):
        before = len(grid.sent)
        arrays = coordinator.run_round(server_round, arrays)
        sent = grid.sent[before:]
        counts.append(sum(m.metadata.message_type == "evaluate" for m in sent))
    coordinator.store.close()
    return counts


def test_a_share_of_the_nodes_every_k_rounds_and_at_the_last(tmp_path):
    # Execute: 20 nodes, a quarter of them, every 2 rounds, 3 rounds
    counts = evaluate_messages_per_round(
        tmp_path, 20, 3, **{"fraction-evaluate": 0.25, "evaluate-every": 2}
    )

    # Assert: none in round 1; 5 nodes in round 2 and in round 3 (the last)
    assert counts == [0, 5, 5]


def test_the_default_evaluates_every_node_every_round(tmp_path):
    assert evaluate_messages_per_round(tmp_path, 4, 2) == [4, 4]


def test_min_evaluate_nodes_raises_a_small_sample_and_skips_when_too_few(tmp_path):
    # Execute: 10% of 10 nodes is 1, min-evaluate-nodes makes it 3
    raised = evaluate_messages_per_round(
        tmp_path / "a", 10, 1, **{"fraction-evaluate": 0.1, "min-evaluate-nodes": 3}
    )
    skipped = evaluate_messages_per_round(tmp_path / "b", 2, 1, **{"min-evaluate-nodes": 3})

    # Assert
    assert raised == [3]
    assert skipped == [0]


def test_no_federated_evaluation_when_every_example_trains_or_the_share_is_zero(tmp_path):
    all_train = evaluate_messages_per_round(tmp_path / "a", 4, 2, **{"local-test-fraction": 0})
    none_asked = evaluate_messages_per_round(tmp_path / "b", 4, 2, **{"fraction-evaluate": 0.0})
    assert all_train == [0, 0] and none_asked == [0, 0]
