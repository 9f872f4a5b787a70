"""The coordinator's trust boundary: one reply that raises never ends the round or the run."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from server.coordinator import Coordinator
from server.record.store import RunStore
from strategies.records import arrays_to_numpy, pack_arrays
from strategies.registry import build_strategy
from task import keys
from task.config import parse_run_config

NamedArrays = dict[str, np.ndarray]
ReplyFn = Callable[[int, str, NamedArrays], RecordDict]


@pytest.fixture(autouse=True)
def server_identity() -> Iterator[None]:
    """Message() reads the ServerApp's identity, as Flower sets it in a ServerApp process."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class ReplyingGrid(Grid):
    """A Grid whose nodes reply at once with ``reply_fn``; the first pulls may raise."""

    def __init__(
        self,
        node_ids: list[int],
        reply_fn: ReplyFn,
        failing_pulls: int = 0,
        partitions: dict[int, int] | None = None,
    ) -> None:
        self.node_ids = node_ids
        self.reply_fn = reply_fn
        self.failing_pulls = failing_pulls
        self.partitions = partitions or {}  # node id -> partition id (default: the node id)
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # noqa: ANN001
        raise NotImplementedError

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = []
        for message in messages:
            message_id = f"m{len(self.sent)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.sent.append(message)
            node_id = message.metadata.dst_node_id
            if message.metadata.message_type == "query":  # the roll call
                partition = self.partitions.get(node_id, node_id)
                content = RecordDict({keys.METRICS: MetricRecord({keys.PARTITION_ID: partition})})
            else:
                received = arrays_to_numpy(message.content.array_records[keys.ARRAYS])
                content = self.reply_fn(node_id, message.metadata.message_type, received)
            self._replies[message_id] = Message(content=content, reply_to=message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        if self.failing_pulls > 0:
            self.failing_pulls -= 1
            raise TypeError("'int' object is not iterable")  # as Flower inflating a bad Array
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        raise NotImplementedError


def honest(node_id: int, message_type: str, received: NamedArrays) -> RecordDict:
    if message_type == "evaluate":
        metrics = {keys.NUM_EXAMPLES: 10, keys.EVAL_LOSS: 0.5, keys.EVAL_ACCURACY: 0.8}
        return RecordDict({keys.METRICS: MetricRecord(metrics)})
    trained = {name: value + np.float32(0.01 * node_id) for name, value in received.items()}
    metrics = {keys.NUM_EXAMPLES: 20, keys.PARTITION_ID: node_id, keys.TRAIN_LOSS: 0.3}
    return RecordDict({keys.ARRAYS: pack_arrays(trained), keys.METRICS: MetricRecord(metrics)})


def make_coordinator(tmp_path, grid: Grid, **run_config: object) -> Coordinator:  # noqa: ANN001
    config = parse_run_config({"runs-dir": str(tmp_path), "round-timeout": 5.0, **run_config})
    store = RunStore.create(tmp_path / "run", "run", {}, config.num_server_rounds)
    return Coordinator(grid, build_strategy(config), store, config, lambda arrays: (0.1, 0.9))


def model() -> NamedArrays:
    return {"w": np.zeros((2, 3), dtype=np.float32), "b": np.ones(3, dtype=np.float32)}


def rejections(tmp_path) -> list[tuple[int, str, str]]:  # noqa: ANN001
    with sqlite3.connect(tmp_path / "run" / "run.db") as db:
        return db.execute("SELECT round, node_id, reason FROM rejections ORDER BY id").fetchall()


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
