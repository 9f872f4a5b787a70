"""ClientApp entry: train and evaluate on this node's shard, on its local device."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

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
    proximal_mu,
    run_config_of,
    sent_arrays,
    server_round,
    training_seed,
)
from client.shard import NodeData, load_node_data, model_for, node_partition_id
from strategies.records import arrays_to_numpy, record_like
from task import keys
from task.config import RunConfig
from task.training import load_numpy_into, model_to_numpy, resolve_device, test, train

app = ClientApp()


def _node_data(context: Context) -> tuple[RunConfig, NodeData]:
    config = run_config_of(context)
    return config, load_node_data(config, dict(context.node_config))


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    """Train the received global model on the local shard; reply arrays and metrics."""
    config, data = _node_data(context)
    device = resolve_device(config.device)
    model = model_for(config, data, device)
    sent = sent_arrays(msg)
    received = arrays_to_numpy(sent)
    if data.partition_id in config.hostile:
        kind = train_kind(server_round(msg), data.partition_id, config.hostile)
        content = hostile_train_content(kind, received, data.partition_id)
        return Message(content=content, reply_to=msg)
    load_numpy_into(model, received)
    fault = config.faults.get(data.partition_id)
    before_training(fault, config.round_timeout)
    sleep_before_training(
        config.client_delay, config.seed, data.partition_id, server_round(msg), config.round_timeout
    )
    seed = training_seed(config, server_round(msg), data.partition_id)
    result = train(
        model,
        data.train,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        device=device,
        seed=seed,
        proximal_mu=proximal_mu(msg),
    )
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: result.num_examples,
            keys.PARTITION_ID: data.partition_id,
            keys.TRAIN_LOSS: result.loss,
            keys.TRAIN_ACCURACY: result.accuracy,
            keys.TRAIN_SECONDS: result.seconds,
        }
    )
    arrays = after_training(fault, model_to_numpy(model))
    info = ConfigRecord({keys.DEVICE: str(device)})
    if data.partition_id in config.byzantine_partitions:
        rng = np.random.default_rng(seed)
        arrays = byzantine_arrays(received, arrays, config.byzantine_mode, rng)
        info[keys.BYZANTINE] = config.byzantine_mode
    content = RecordDict(
        {keys.ARRAYS: record_like(arrays, sent), keys.METRICS: metrics, keys.INFO: info}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local test split."""
    config, data = _node_data(context)
    if data.partition_id in config.hostile:
        kind = evaluate_kind(server_round(msg), data.partition_id, config.hostile)
        return Message(content=hostile_evaluate_content(kind, data.partition_id), reply_to=msg)
    device = resolve_device(config.device)
    model = model_for(config, data, device)
    load_numpy_into(model, arrays_to_numpy(sent_arrays(msg)))
    result = test(model, data.test, batch_size=max(256, config.batch_size), device=device)
    metrics = MetricRecord(
        {
            keys.NUM_EXAMPLES: result.num_examples,
            keys.PARTITION_ID: data.partition_id,
            keys.EVAL_LOSS: result.loss,
            keys.EVAL_ACCURACY: result.accuracy,
        }
    )
    return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=msg)


@app.query()
def query_fn(msg: Message, context: Context) -> Message:
    """Answer the coordinator's roll call with this node's partition id.

    The coordinator samples nodes and folds their updates in partition order,
    the same in every run of a configuration (node ids are not).
    """
    partition_id = node_partition_id(dict(context.node_config))
    metrics = MetricRecord({keys.PARTITION_ID: partition_id})
    return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=msg)
