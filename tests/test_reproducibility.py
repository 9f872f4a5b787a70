"""Same configuration and seed, same global models: sampling and folding by partition order."""

from __future__ import annotations

import json
import random
import sqlite3

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict

from server import phases as phases_module
from server.coordinator import Coordinator
from server.export.tracking import TRACKING_FILE
from server.record.checkpoints import model_hash
from server.reply_order import ReplyOrder
from strategies.accounted import accounted
from strategies.records import pack_arrays
from strategies.registry import build_strategy
from strategies.sampling import NodeSampler
from task import keys
from tests.helpers import (
    NamedArrays,
    ReplyingGrid,
    history,
    make_coordinator,
    mlflow_client,
    model,
    rejections,
)

pytestmark = pytest.mark.usefixtures("server_identity")


# -- ReplyOrder ----------------------------------------------------------------


def test_replies_are_released_in_the_given_order_whatever_order_they_arrive_in():
    order: ReplyOrder[str] = ReplyOrder([5, 2, 9, 7])
    assert order.arrive(9, "r9") == []
    assert order.arrive(2, "r2") == []  # 5 is still missing
    assert order.held == 2
    assert order.arrive(5, "r5") == [(5, "r5"), (2, "r2"), (9, "r9")]
    assert order.arrive(7, "r7") == [(7, "r7")]
    assert order.held == 0 and order.most_held == 2


def test_drain_hands_over_the_held_replies_in_order_past_the_missing_ones():
    order: ReplyOrder[str] = ReplyOrder([1, 2, 3, 4])
    order.arrive(4, "r4")
    order.arrive(2, "r2")
    assert order.most_held == 2  # both wait for node 1, which never replies
    assert order.drain() == [(2, "r2"), (4, "r4")]
    assert order.held == 0
    assert order.arrive(1, "late") == [(1, "late")]  # after the drain: handed over at once


def test_an_unknown_or_repeated_node_is_handed_over_at_once():
    order: ReplyOrder[str] = ReplyOrder([1, 2])
    assert order.arrive(8, "stranger") == [(8, "stranger")]
    assert order.arrive(2, "first") == []
    assert order.arrive(2, "again") == [(2, "again")]


# -- sampling by key -----------------------------------------------------------


def test_the_sample_follows_the_keys_not_the_node_ids():
    # Two runs: the same 20 partitions behind different random node ids
    rng = random.Random(7)
    partitions = list(range(20))
    samples = []
    for _ in range(2):
        node_of = {p: rng.randrange(1, 2**63) for p in partitions}
        partition_of = {n: p for p, n in node_of.items()}
        shuffled = list(node_of.values())
        rng.shuffle(shuffled)
        sampler = NodeSampler(seed=3)
        chosen = sampler.sample(shuffled, 0.3, 2, key=partition_of.__getitem__)
        samples.append([partition_of[n] for n in chosen])
    assert samples[0] == samples[1]
    assert samples[0] == sorted(samples[0]) and len(samples[0]) == 6


# -- the coordinator -------------------------------------------------------------


class ShuffledGrid(ReplyingGrid):
    """Replies come back a few at a time, in a random order of its own seed."""

    def __init__(self, partitions: dict[int, int], seed: int) -> None:
        super().__init__(list(partitions), make_reply_fn(partitions), partitions=partitions)
        self.rng = random.Random(seed)
        self.arrival: list[int] = []

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        ready = [mid for mid in message_ids if mid in self._replies]
        self.rng.shuffle(ready)
        replies = [self._replies.pop(mid) for mid in ready[: self.rng.randint(1, 3)]]
        self.arrival += [r.metadata.src_node_id for r in replies]
        return replies


def make_reply_fn(partitions: dict[int, int]):  # noqa: ANN201
    def reply(node_id: int, message_type: str, received: NamedArrays) -> RecordDict:
        partition = partitions[node_id]
        if message_type == "evaluate":
            metrics = {keys.NUM_EXAMPLES: 10 + partition, keys.EVAL_ACCURACY: 0.5}
            return RecordDict({keys.METRICS: MetricRecord(metrics)})
        rng = np.random.default_rng(partition)
        trained = {
            name: value + rng.standard_normal(value.shape).astype(np.float32) * np.float32(0.1)
            for name, value in received.items()
        }
        metrics = {keys.NUM_EXAMPLES: 7 + 13 * partition, keys.PARTITION_ID: partition}
        return RecordDict({keys.ARRAYS: pack_arrays(trained), keys.METRICS: MetricRecord(metrics)})

    return reply


def run_three_rounds(tmp_path, seed: int) -> tuple[list[str], list[int], list[int]]:  # noqa: ANN001
    """Three rounds of 12 partitions behind random node ids: hashes, sampled, arrival order."""
    rng = random.Random(seed)
    partition_of = {rng.randrange(1, 2**63): p for p in range(12)}
    grid = ShuffledGrid(partition_of, seed)
    coordinator = make_coordinator(tmp_path, grid, **{"fraction-train": 0.5, "seed": 11})
    arrays = model()
    hashes = []
    for server_round in (1, 2, 3):
        arrays = coordinator.run_round(server_round, arrays)
        hashes.append(model_hash(arrays))
    sampled = [
        partition_of[m.metadata.dst_node_id]
        for m in grid.sent
        if m.metadata.message_type == "train"
    ]
    arrival = [partition_of[n] for n in grid.arrival]
    return hashes, sampled, arrival


def test_two_runs_with_other_node_ids_and_arrival_orders_make_identical_models(
    tmp_path, monkeypatch
):
    # Replies trickle in; pull again at once instead of waiting (57 waits took 3 s)
    monkeypatch.setattr(phases_module, "POLL_INTERVAL_S", 0.0)
    first = run_three_rounds(tmp_path / "a", seed=1)
    second = run_three_rounds(tmp_path / "b", seed=2)
    assert first[2] != second[2]  # replies did arrive in other orders
    assert first[1] == second[1]  # the same partitions trained
    assert first[0] == second[0]  # and the global models are bit-identical
    assert len(set(first[0])) == 3


def test_folding_in_arrival_order_would_differ():
    """The control: updates of these magnitudes do not sum to the same bits in any order."""
    rng = np.random.default_rng(0)
    values = [rng.standard_normal(5).astype(np.float32) * np.float32(0.1) for _ in range(6)]
    forward = sum(values, np.zeros(5, np.float32))
    backward = sum(reversed(values), np.zeros(5, np.float32))
    assert not np.array_equal(forward, backward)


@pytest.mark.parametrize("bad", [-5, 2**40, 1.5])
def test_a_bad_roll_call_answer_orders_the_node_last(tmp_path, bad):  # noqa: ANN001
    grid = ReplyingGrid([3, 4], make_reply_fn({3: 0, 4: 1}), partitions={3: bad, 4: 1})  # type: ignore[dict-item]
    coordinator = make_coordinator(tmp_path, grid)
    coordinator.run_round(1, model())
    assert coordinator.partitions == {3: None, 4: 1}
    assert sorted([3, 4], key=coordinator._node_key) == [4, 3]


@pytest.mark.slow
def test_two_simulations_of_one_configuration_give_identical_models(simulate, tmp_path):
    """One pair of real runs checks reproducibility and MLflow tracking at once.

    The same configuration twice; partition 0 is a straggler (3 s late), so its
    reply comes after the others and is folded first all the same. The first run
    is tracked in a SQLite MLflow store, the second in a store that cannot open:
    tracking changes nothing in the model, and a failing store fails nothing.
    """
    # Execute
    settings = {
        "num-server-rounds": 2,
        "fraction-train": 0.75,
        "local-epochs": 1,
        "seed": 5,
        "faults": "0=delay",
        "round-timeout": 60.0,
        "tracking-experiment": "twins",
    }
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlruns.db'}"
    (tmp_path / "a-file").write_text("")
    broken = f"sqlite:///{tmp_path / 'a-file' / 'mlruns.db'}"
    runs = [
        simulate(4, f"twin-{k}", **settings, **{"tracking-uri": store})
        for k, store in ((1, uri), (2, broken))
    ]

    # Assert: every round's global model and metrics are bit-identical
    rows = []
    for run in runs:
        assert run.returncode == 0, run.output[-3000:]
        with sqlite3.connect(run.run_dir / "run.db") as db:
            rows.append(
                db.execute(
                    "SELECT round, model_hash, central_accuracy, metrics_json FROM rounds "
                    "ORDER BY round"
                ).fetchall()
            )
            joined = dict(db.execute("SELECT partition_id, rounds_joined FROM nodes"))
        assert joined[0] >= 1, joined  # the straggler was sampled and folded in
    hashes = [[(r[0], r[1], r[2]) for r in run_rows] for run_rows in rows]
    assert hashes[0] == hashes[1] and len({h[1] for h in hashes[0]}) == 3
    train_loss = [[json.loads(r[3]).get("train-loss") for r in run_rows] for run_rows in rows]
    assert train_loss[0] == train_loss[1] and None not in train_loss[0][1:]

    # Assert: the first run, read back from MLflow
    client = mlflow_client(uri)
    run_id = json.loads((runs[0].run_dir / TRACKING_FILE).read_text())["run-id"]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "twins"
    accuracy = history(client, run_id, "central-accuracy")
    assert accuracy == [(r[0], pytest.approx(r[2], abs=1e-6)) for r in rows[0]]
    assert [step for step, _ in history(client, run_id, "federated-accuracy")] == [1, 2]
    assert [value for _, value in history(client, run_id, "accepted")] == [0.0, 3.0, 3.0]
    assert mlflow_run.data.tags["fedcoord.model-hash"] == rows[0][-1][1]
    assert mlflow_run.data.params["local-epochs"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert artifacts == {"checkpoints/round-00002.safetensors"}

    # Assert: the failing store cost one WARNING line, not the run
    assert runs[1].status()["state"] == "completed"
    assert runs[1].output.count("tracking: ") == 1, runs[1].output[-3000:]


# -- the roll call as a trust boundary ---------------------------------------------


def weighted_reply(claims: dict[int, int | None]):  # noqa: ANN201
    """Every node adds 1.0; node n claims partition ``claims[n]`` in its train reply."""

    def reply(node_id: int, message_type: str, received: NamedArrays) -> RecordDict:
        if message_type == "evaluate":
            metrics = {keys.NUM_EXAMPLES: 10, keys.EVAL_ACCURACY: 0.5}
            return RecordDict({keys.METRICS: MetricRecord(metrics)})
        trained = {name: value + np.float32(1.0) for name, value in received.items()}
        metrics: dict[str, int] = {keys.NUM_EXAMPLES: 10}
        if claims.get(node_id) is not None:
            metrics[keys.PARTITION_ID] = claims[node_id]  # type: ignore[assignment]
        return RecordDict({keys.ARRAYS: pack_arrays(trained), keys.METRICS: MetricRecord(metrics)})

    return reply


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_train_reply_must_claim_the_partition_given_at_the_roll_call(tmp_path, wrapped):
    # Prepare: partition 3's operator weight is 0; its node (id 30) claims partition 2
    # in its train reply to escape it; node 20 (partition 2) names no partition.
    # wrapped: the strategy comes already accounted, as the ServerApp passes it
    partitions = {20: 2, 30: 3, 40: 4}
    claims = {20: None, 30: 2, 40: 4}
    grid = ReplyingGrid(list(partitions), weighted_reply(claims), partitions=partitions)
    coordinator = make_coordinator(
        tmp_path, grid, strategy="weighted", **{"node-weights": "3=0.0", "min-train-nodes": 2}
    )
    if wrapped:
        strategy = accounted(build_strategy(coordinator.config), coordinator.config)
        coordinator = Coordinator(
            grid, strategy, coordinator.store, coordinator.config, coordinator.evaluate_fn
        )

    # Execute
    coordinator.run_round(1, model())

    # Assert: node 30's reply is rejected with the reason; node 20 counts as partition 2
    reasons = {(row[1], row[2]) for row in rejections(tmp_path)}
    assert (
        "30",
        "partition-id 2 differs from partition 3 this node gave at the roll call",
    ) in reasons
    row = coordinator.store.rounds()[0]
    assert (row["accepted"], row["rejected"]) == (2, 1)
    nodes = {int(n["node_id"]): n["partition_id"] for n in coordinator.store.nodes()}
    assert nodes[20] == 2 and nodes[30] == 3


def test_an_invalid_partition_claim_keeps_its_precise_reason(tmp_path):
    partitions = {20: 2, 30: 3}
    grid = ReplyingGrid(list(partitions), weighted_reply({30: 2**40}), partitions=partitions)
    coordinator = make_coordinator(tmp_path, grid)
    coordinator.run_round(1, model())
    reasons = {row[2] for row in rejections(tmp_path) if row[1] == "30"}
    assert "partition-id 1099511627776 exceeds 2147483647" in reasons
    assert not any("roll call" in reason for reason in reasons)


def test_a_node_silent_at_the_roll_call_is_ordered_last(tmp_path):
    # Prepare: node 9 never answers the roll call; round-timeout is 0.5 s
    class SilentAtRollCall(ReplyingGrid):
        def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
            replies = super().pull_messages(message_ids)
            return [
                r
                for r in replies
                if not (r.metadata.src_node_id == 9 and r.metadata.message_type == "query")
            ]

    grid = SilentAtRollCall([7, 8, 9], make_reply_fn({7: 0, 8: 1, 9: 2}))
    coordinator = make_coordinator(tmp_path, grid, **{"round-timeout": 0.5})

    # Execute
    coordinator._roll_call(1, [7, 8, 9])

    # Assert: the roll call ended at the deadline; node 9 is ordered last
    assert coordinator.partitions == {7: 7, 8: 8, 9: None}
    assert sorted([9, 8, 7], key=coordinator._node_key) == [7, 8, 9]
    assert "2/3 new node(s)" in str(coordinator.store.events()[-1]["message"])


def test_nodes_that_left_keep_their_record_and_are_not_asked_again(tmp_path):
    grid = ReplyingGrid([5, 6], make_reply_fn({5: 0, 6: 1}))
    coordinator = make_coordinator(tmp_path, grid)
    coordinator._roll_call(1, [5, 6])
    coordinator._roll_call(2, [6])
    coordinator._roll_call(3, [5, 6])
    assert coordinator.partitions == {5: 5, 6: 6}
    queries = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "query"]
    assert queries == [5, 6]
