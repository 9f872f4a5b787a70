"""What the ClientApp's handlers and hooks read from a message and its context.

The run config is parsed once per process and run (a ClientApp process serves
many messages of one run), not once per handler and hook.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from client.shard import node_partition_id
from task import keys
from task.config import RunConfig, parse_run_config


def run_config_of(context: Context) -> RunConfig:
    """The run's :class:`RunConfig`, parsed from ``context.run_config``.

    Raises
    ------
    ConfigError
        If a value is invalid (see :func:`task.config.parse_run_config`).
    """
    return _parsed(tuple(context.run_config.items()))


@lru_cache(maxsize=4)
def _parsed(items: tuple[tuple[str, object], ...]) -> RunConfig:
    return parse_run_config(dict(items))


def partition_id_of(context: Context) -> int:
    """This node's partition id, from its node config (no data is loaded)."""
    return node_partition_id(dict(context.node_config))


def sent_arrays(msg: Message) -> ArrayRecord:
    """The global model's arrays the server sent."""
    return msg.content.array_records[keys.ARRAYS]


def _round_value(msg: Message, key: str, default: float) -> float | int | str:
    value = msg.content.config_records.get(keys.CONFIG, ConfigRecord()).get(key, default)
    if not isinstance(value, int | float | str):
        raise TypeError(f"round config {key!r} must be a number, got {value!r}")
    return value


def server_round(msg: Message) -> int:
    """The round the server sent (async: the node's k-th training); 0 where none."""
    return int(_round_value(msg, keys.SERVER_ROUND, 0))


def proximal_mu(msg: Message) -> float:
    """The FedProx proximal term the server sent; 0.0 (none) where none."""
    return float(_round_value(msg, keys.PROXIMAL_MU, 0.0))


def training_seed(config: RunConfig, server_round: int, partition_id: int) -> int:
    """The seed of one partition's training in one round (and of its Byzantine noise)."""
    return config.seed + server_round * 1000 + partition_id
