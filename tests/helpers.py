"""Plain helpers shared by test modules: fake Grids, made-up runs, clients.

Fixtures live in conftest.py; test modules import helpers from here and never
from one another.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.coordinator import Coordinator
from server.record.store import RunStore
from strategies.records import arrays_to_numpy, pack_arrays
from strategies.registry import build_strategy
from task import keys
from task.config import parse_run_config

NamedArrays = dict[str, np.ndarray]
ReplyFn = Callable[[int, str, NamedArrays], RecordDict]


# ---------------------------------------------------------------------------
# The coordinator and strategies without Flower: a Grid whose nodes reply at once
# ---------------------------------------------------------------------------


class ReplyingGrid(Grid):
    """A Grid whose nodes reply at once with ``reply_fn``; the first pulls may raise.

    Answers the coordinator (``push_messages`` / ``pull_messages``, with the roll
    call) and Flower's own ``Strategy.start()`` (``send_and_receive``) alike.
    """

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
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

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
        return self.pull_messages(self.push_messages(messages))


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
