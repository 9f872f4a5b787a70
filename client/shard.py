"""This node's data shard and model, loaded once per process and cached.

Flower keeps a ClientApp process (a Ray actor in simulation) alive across
rounds, so the dataset is read and partitioned once, not every round.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from client.local_data import load_local_splits, local_partition_id
from task import keys
from task.config import ConfigError, RunConfig
from task.datasets import DatasetSplits, TensorSplit, load_dataset
from task.models import build_model
from task.partitioning import partition_indices, split_local


@dataclass(frozen=True)
class NodeData:
    """The local train and test splits of one partition."""

    partition_id: int
    num_partitions: int  # 0 for a node with its own data (data-path)
    train: TensorSplit
    test: TensorSplit
    input_shape: tuple[int, int, int]
    num_classes: int


def node_partition(node_config: dict[str, object]) -> tuple[int, int]:
    """Read ``partition-id`` / ``num-partitions`` from the node config.

    Raises
    ------
    ConfigError
        If either is missing or out of range; the message shows the fix.
    """
    try:
        partition_id = int(node_config[keys.NODE_PARTITION_ID])  # type: ignore[call-overload]
        num_partitions = int(node_config[keys.NODE_NUM_PARTITIONS])  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(
            "this node needs integer partition-id and num-partitions in its node config, "
            'e.g. flower-supernode --node-config "partition-id=0 num-partitions=3"'
        ) from error
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"partition-id {partition_id} must be in [0, num-partitions={num_partitions})"
        )
    return partition_id, num_partitions


@lru_cache(maxsize=2)
def _dataset(name: str, data_dir: str, seed: int) -> DatasetSplits:
    return load_dataset(name, data_dir, seed)


@lru_cache(maxsize=2)
def _partition_index(  # noqa: PLR0913
    dataset: str,
    data_dir: str,
    seed: int,
    partitioner: str,
    num_partitions: int,
    alpha: float,
    classes_per_partition: int,
) -> tuple[np.ndarray, ...]:
    """Every partition's example indices, computed once per process and federation.

    A simulation worker serves many partitions: partitioning the training set
    again per message cost about 0.5 s at 100 partitions.
    """
    data = _dataset(dataset, data_dir, seed)
    return tuple(
        partition_indices(
            data.train.y.numpy(),
            num_partitions,
            partitioner,
            seed,
            alpha=alpha,
            classes_per_partition=classes_per_partition,
            num_classes=data.num_classes,
        )
    )


def _shard(config: RunConfig, partition_id: int, num_partitions: int) -> NodeData:
    """One partition's local splits, gathered from the cached dataset and index.

    Nothing per partition is kept: memory stays the dataset plus the index
    however many partitions a worker serves, and the gather takes milliseconds.
    """
    data_dir = str(config.resolved_data_dir)
    data = _dataset(config.dataset, data_dir, config.seed)
    index = _partition_index(
        config.dataset,
        data_dir,
        config.seed,
        config.partitioner,
        num_partitions,
        config.dirichlet_alpha,
        config.classes_per_partition,
    )
    local_train, local_test = split_local(
        index[partition_id], config.local_test_fraction, config.seed + partition_id
    )
    train = TensorSplit(data.train.x[local_train], data.train.y[local_train])
    test = TensorSplit(data.train.x[local_test], data.train.y[local_test])
    return NodeData(partition_id, num_partitions, train, test, data.input_shape, data.num_classes)


def load_node_data(config: RunConfig, node_config: dict[str, object]) -> NodeData:
    """Return this node's data: its own ``data-path`` files, else its shard of ``dataset``.

    The dataset and its partition index are cached per process, so only the
    first message reads and partitions them.
    """
    data_path = node_config.get(keys.NODE_DATA_PATH)
    if data_path:
        partition_id = local_partition_id(node_config)
        train, test, data_format = load_local_splits(config, str(data_path), partition_id)
        return NodeData(
            partition_id, 0, train, test, data_format.input_shape, data_format.num_classes
        )
    partition_id, num_partitions = node_partition(node_config)
    return _shard(config, partition_id, num_partitions)


def node_partition_id(node_config: dict[str, object]) -> int:
    """This node's partition id, read from its node config only (no data is loaded).

    Raises
    ------
    ConfigError
        As :func:`node_partition` or ``local_partition_id`` do.
    """
    if node_config.get(keys.NODE_DATA_PATH):
        return local_partition_id(node_config)
    return node_partition(node_config)[0]


@lru_cache(maxsize=2)
def _model(name: str, shape: tuple[int, int, int], classes: int, device: str) -> torch.nn.Module:
    return build_model(name, shape, classes, seed=0).to(device)


def model_for(config: RunConfig, data: NodeData, device: torch.device) -> torch.nn.Module:
    """A model of the configured architecture on ``device``, reused across rounds.

    Its weights are overwritten by the received global arrays before each use.
    """
    return _model(config.model, data.input_shape, data.num_classes, str(device))
