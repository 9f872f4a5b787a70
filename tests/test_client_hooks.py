"""The ClientApp's test hooks, as mods around the honest train and evaluate handlers."""

from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import delay
from client.app import app
from client.byzantine import byzantine_arrays
from client.faults import InjectedFaultError
from client.hostile import evaluate_kind, hostile_evaluate_content, hostile_train_content
from client.hostile import train_kind as hostile_train_kind
from strategies.records import NamedArrays, arrays_to_numpy, pack_arrays
from task import keys
from task.models import build_model
from task.training import model_to_numpy

SEED, ROUND, PARTITION = 42, 3, 1


@pytest.fixture(autouse=True, scope="module")
def node_identity() -> Iterator[None]:
    """Message() reads the process's identity, as Flower sets it in a ClientApp process."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def received() -> NamedArrays:
    return model_to_numpy(build_model("simple-cnn", (1, 8, 8), 10, seed=0))


def message(message_type: str) -> Message:
    content = RecordDict(
        {
            keys.ARRAYS: pack_arrays(received()),
            keys.CONFIG: ConfigRecord({keys.SERVER_ROUND: ROUND}),
        }
    )
    msg = Message(content=content, dst_node_id=7, message_type=message_type)
    msg.metadata.__dict__["_message_id"] = "m1"  # as if the server had sent it
    return msg


def handle(message_type: str = "train", **run_config: object) -> Message:
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": PARTITION, "num-partitions": 30},  # a small shard
        state=RecordDict(),
        run_config={"local-epochs": 1, "seed": SEED, **run_config},  # type: ignore[dict-item]
    )
    return app(message(message_type), context)


def reply_arrays(reply: Message) -> NamedArrays:
    return arrays_to_numpy(reply.content.array_records[keys.ARRAYS])


@pytest.fixture(scope="module")
def honest() -> NamedArrays:
    return reply_arrays(handle())


def test_a_byzantine_partition_attacks_its_honest_update(honest):
    # Execute
    reply = handle(**{"byzantine-partitions": "1", "byzantine-mode": "noise"})

    # Assert: the attack on the honest training, its noise seeded as the training
    rng = np.random.default_rng(SEED + ROUND * 1000 + PARTITION)
    expected = byzantine_arrays(received(), honest, "noise", rng)
    attacked = reply_arrays(reply)
    assert list(attacked) == list(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(attacked[name], value, rtol=1e-6)
    assert reply.content.config_records[keys.INFO][keys.BYZANTINE] == "noise"


def test_a_byzantine_attack_applies_to_the_reply_the_faults_left():
    # Execute: partition 1 replies NaN weights, then attacks them
    reply = handle(**{"byzantine-partitions": "1", "byzantine-mode": "noise", "faults": "1=nan"})

    # Assert: the NaN update's norm makes every float array NaN (attacking first would not)
    attacked = reply_arrays(reply)
    assert all(np.isnan(value).all() for value in attacked.values() if value.dtype.kind == "f")


def test_hooks_on_other_partitions_leave_the_honest_reply(honest):
    # Execute
    reply = handle(**{"byzantine-partitions": "0", "faults": "2=raise", "hostile": "0"})

    # Assert
    assert keys.BYZANTINE not in reply.content.config_records[keys.INFO]
    for name, value in honest.items():
        np.testing.assert_array_equal(reply_arrays(reply)[name], value)


def test_a_raise_fault_raises_before_training():
    with pytest.raises(InjectedFaultError, match="injected fault"):
        handle(faults="1=raise")


def test_a_client_delay_sleeps_before_training(monkeypatch):
    # Prepare
    slept: list[float] = []
    monkeypatch.setattr(delay.time, "sleep", slept.append)

    # Execute
    handle(**{"client-delay": "1=2.5", "round-timeout": 60.0})

    # Assert
    assert slept == [2.5]


def test_a_hostile_partition_replies_malformed_content_without_training():
    # Execute
    train_reply = handle(hostile="1,2")
    evaluate_reply = handle("evaluate", hostile="1,2")

    # Assert
    partitions = frozenset({1, 2})
    train_kind = hostile_train_kind(ROUND, PARTITION, partitions)
    expected = hostile_train_content(train_kind, received(), PARTITION)
    assert dict(train_reply.content.metric_records) == dict(expected.metric_records)
    kind = evaluate_kind(ROUND, PARTITION, partitions)
    expected = hostile_evaluate_content(kind, PARTITION)
    assert dict(evaluate_reply.content.metric_records) == dict(expected.metric_records)
