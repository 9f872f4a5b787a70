"""Test and bench hooks as Flower mods around the honest train and evaluate handlers.

Each hook is off unless its run-config key names this node's partition, and then
changes what the honest handler does from outside it, as a Flower mod
(``(msg, context, call_next) -> Message``, like ``flwr.clientapp.mod``'s):

- :func:`hostile_train_mod`, :func:`hostile_evaluate_mod` (``hostile``): a
  malformed reply instead of the handler's (``client/hostile.py``);
- :func:`byzantine_mod` (``byzantine-partitions``): the trained arrays replaced
  by an attack on them (``client/byzantine.py``);
- :func:`faults_mod` (``faults``): raise, sleep or wait before training, or NaN
  weights after it (``client/faults.py``);
- :func:`client_delay_mod` (``client-delay``): sleep before training
  (``client/delay.py``).

The order of ``@app.train(mods=[...])`` is theirs from the outside in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client.byzantine import byzantine_arrays
from client.delay import sleep_before_training
from client.faults import after_training, before_training
from client.hostile import (
    evaluate_kind,
    hostile_evaluate_content,
    hostile_train_content,
    train_kind,
)
from client.messages import (
    partition_id_of,
    run_config_of,
    sent_arrays,
    server_round,
    training_seed,
)
from strategies.records import NamedArrays, arrays_to_numpy, record_like
from task import keys


def hostile_train_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """On a ``hostile`` partition, answer a train message with this round's malformed reply."""
    hostile = run_config_of(context).hostile
    partition_id = partition_id_of(context)
    if partition_id not in hostile:
        return call_next(msg, context)
    kind = train_kind(server_round(msg), partition_id, hostile)
    received = arrays_to_numpy(sent_arrays(msg))
    return Message(content=hostile_train_content(kind, received, partition_id), reply_to=msg)


def hostile_evaluate_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """On a ``hostile`` partition, answer an evaluate message with a malformed reply."""
    hostile = run_config_of(context).hostile
    partition_id = partition_id_of(context)
    if partition_id not in hostile:
        return call_next(msg, context)
    kind = evaluate_kind(server_round(msg), partition_id, hostile)
    return Message(content=hostile_evaluate_content(kind, partition_id), reply_to=msg)


def byzantine_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """On a ``byzantine-partitions`` partition, attack the honestly trained reply."""
    config = run_config_of(context)
    partition_id = partition_id_of(context)
    if partition_id not in config.byzantine_partitions:
        return call_next(msg, context)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    received = arrays_to_numpy(sent_arrays(msg))
    rng = np.random.default_rng(training_seed(config, server_round(msg), partition_id))
    _edit_reply_arrays(
        reply, msg, lambda trained: byzantine_arrays(received, trained, config.byzantine_mode, rng)
    )
    reply.content.config_records[keys.INFO][keys.BYZANTINE] = config.byzantine_mode
    return reply


def faults_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Act out this partition's injected fault (``faults``) before and after training."""
    config = run_config_of(context)
    fault = config.faults.get(partition_id_of(context))
    if fault is None:
        return call_next(msg, context)
    before_training(fault, config.round_timeout)
    reply = call_next(msg, context)
    if fault == "nan" and not reply.has_error():
        _edit_reply_arrays(reply, msg, lambda trained: after_training(fault, trained))
    return reply


def client_delay_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Sleep this partition's simulated slowness (``client-delay``) before training."""
    config = run_config_of(context)
    partition_id = partition_id_of(context)
    version = server_round(msg)
    sleep_before_training(
        config.client_delay, config.seed, partition_id, version, config.round_timeout
    )
    return call_next(msg, context)


def _edit_reply_arrays(
    reply: Message, msg: Message, edit: Callable[[NamedArrays], NamedArrays]
) -> None:
    """Replace the reply's arrays by ``edit(arrays)``, in the form the server sent."""
    trained = arrays_to_numpy(reply.content.array_records[keys.ARRAYS])
    reply.content[keys.ARRAYS] = record_like(edit(trained), sent_arrays(msg))
