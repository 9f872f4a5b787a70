"""The coordinator's trust boundary: one reply that raises never ends the round or the run."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from strategies.records import arrays_to_numpy, pack_arrays
from task import keys
from tests.helpers import NamedArrays, ReplyingGrid, honest, make_coordinator, model, rejections

pytestmark = pytest.mark.usefixtures("server_identity")


def test_a_reply_that_raises_anywhere_is_rejected_and_the_round_goes_on(tmp_path):
    # Prepare: node 4's train reply makes the strategy raise; nodes 3 and 4 send bad
    # evaluate replies; the first pull raises
    def reply_fn(node_id: int, message_type: str, received: NamedArrays) -> RecordDict:
        if message_type == "evaluate" and node_id == 3:
            metrics = {keys.NUM_EXAMPLES: 10, keys.EVAL_LOSS: 0.5, keys.EVAL_ACCURACY: 5.0}
            return RecordDict({keys.METRICS: MetricRecord(metrics)})
        if message_type == "evaluate" and node_id == 4:
            return RecordDict()
        return honest(node_id, message_type, received)

    grid = ReplyingGrid([2, 3, 4], reply_fn, failing_pulls=1)
    coordinator = make_coordinator(tmp_path, grid)
    coordinator.partitions.update({2: 2, 3: 3, 4: 4})  # roll call done: the first pull is train's
    add_reply = coordinator.strategy.add_reply

    def add_reply_raising_for_node_4(reply: Message):  # noqa: ANN202
        if reply.metadata.src_node_id == 4:
            raise MemoryError("cannot allocate")
        return add_reply(reply)

    coordinator.strategy.add_reply = add_reply_raising_for_node_4  # type: ignore[method-assign]

    # Execute
    new_model = coordinator.run_round(1, model())

    # Assert: the round closed with nodes 2 and 3; every bad reply is on record
    rows = coordinator.store.rounds()
    assert [(r["accepted"], r["updated"]) for r in rows] == [(2, 1)]
    assert not np.array_equal(new_model["w"], model()["w"])
    assert rejections(tmp_path) == [
        (1, "4", "train reply could not be read: MemoryError: cannot allocate"),
        (1, "3", "evaluate reply: metric 'eval-accuracy' 5.0 is outside [0, 1]"),
        (1, "4", "evaluate reply carries no metrics"),
    ]
    assert rows[0]["federated_accuracy"] == pytest.approx(0.8)
    events = [e["message"] for e in coordinator.store.events() if e["kind"] == "reply-unreadable"]
    assert events == [
        "round 1: train reply could not be read: TypeError: 'int' object is not iterable"
    ]


def test_a_non_finite_new_model_is_never_checkpointed_or_sent(tmp_path):
    # Prepare: finite replies whose float32 sum overflows
    largest = np.finfo(np.float32).max

    def reply_fn(node_id: int, message_type: str, received: NamedArrays) -> RecordDict:
        if message_type == "evaluate":
            return honest(node_id, message_type, received)
        huge = {name: np.full_like(value, largest) for name, value in received.items()}
        metrics = {keys.NUM_EXAMPLES: 20, keys.PARTITION_ID: node_id}
        return RecordDict({keys.ARRAYS: pack_arrays(huge), keys.METRICS: MetricRecord(metrics)})

    grid = ReplyingGrid([2, 3, 4], reply_fn)
    coordinator = make_coordinator(tmp_path, grid)
    start = model()

    # Execute
    kept = coordinator.run_round(1, start)

    # Assert: the previous model is kept, recorded, checkpointed and sent for evaluation
    assert kept is start
    row = coordinator.store.rounds()[0]
    assert row["updated"] == 0 and "new global model is not finite" in row["note"]
    with_model = [m for m in grid.sent if m.metadata.message_type != "query"]
    for message in with_model:
        assert all(
            np.isfinite(a).all() for a in arrays_to_numpy(message.content["arrays"]).values()
        )
    assert len(with_model) == 6  # 3 train, 3 evaluate, all of the kept model
