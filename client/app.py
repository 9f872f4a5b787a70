"""ClientApp entry: train and evaluate on this node's shard, on its local device.

``train_fn`` and ``evaluate_fn`` are the honest path. The test and bench hooks
(hostile replies, Byzantine updates, injected faults, simulated slowness) wrap
them as Flower mods (``client/hooks.py``), each off unless its key is set.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.hooks import (
    byzantine_mod,
    client_delay_mod,
    faults_mod,
    hostile_evaluate_mod,
    hostile_train_mod,
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
from task.training import (
    describe_device,
    load_numpy_into,
    model_to_numpy,
    resolve_device,
    test,
    train,
)

# Test and bench hooks, outermost first: a hostile partition never trains; the
# Byzantine attack applies to the reply the faults left.
TRAIN_HOOKS: list[Mod] = [hostile_train_mod, byzantine_mod, faults_mod, client_delay_mod]
EVALUATE_HOOKS: list[Mod] = [hostile_evaluate_mod]

app = ClientApp()


def _node_data(context: Context) -> tuple[RunConfig, NodeData]:
    config = run_config_of(context)
    return config, load_node_data(config, dict(context.node_config))


@app.train(mods=TRAIN_HOOKS)
def train_fn(msg: Message, context: Context) -> Message:
    """Train the received global model on the local shard; reply arrays and metrics."""
    config, data = _node_data(context)
    device = resolve_device(config.device)
    model = model_for(config, data, device)
    sent = sent_arrays(msg)
    load_numpy_into(model, arrays_to_numpy(sent))
    result = train(
        model,
        data.train,
        epochs=config.local_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        momentum=config.momentum,
        device=device,
        seed=training_seed(config, server_round(msg), data.partition_id),
        proximal_mu=proximal_mu(msg),
        precision=config.precision,
        cuda_graphs=config.cuda_graphs,
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
    content = RecordDict(
        {
            keys.ARRAYS: record_like(model_to_numpy(model), sent),
            keys.METRICS: metrics,
            keys.INFO: ConfigRecord({keys.DEVICE: describe_device(device, config)}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate(mods=EVALUATE_HOOKS)
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on the local test split."""
    config, data = _node_data(context)
    device = resolve_device(config.device)
    model = model_for(config, data, device)
    load_numpy_into(model, arrays_to_numpy(sent_arrays(msg)))
    result = test(
        model,
        data.test,
        batch_size=max(256, config.batch_size),
        device=device,
        precision=config.precision,
    )
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
