"""A node's shard: the dataset and its partition index are computed once per process."""

import torch

from client import shard
from task.config import parse_run_config


def test_many_partitions_share_one_partition_index_and_stay_disjoint():
    # Prepare
    config = parse_run_config({"dataset": "digits", "seed": 3})
    shard._partition_index.cache_clear()
    num_partitions = 50

    # Execute: a simulation worker serves every partition, some twice
    nodes = [
        shard.load_node_data(config, {"partition-id": pid, "num-partitions": num_partitions})
        for pid in [*range(num_partitions), 0, 7]
    ]

    # Assert: partitioned once; the same partition gives the same shard again
    info = shard._partition_index.cache_info()
    assert (info.misses, info.hits) == (1, num_partitions + 1)
    assert torch.equal(nodes[0].train.y, nodes[num_partitions].train.y)
    assert torch.equal(nodes[7].test.x, nodes[num_partitions + 1].test.x)

    # Assert: shards are disjoint and together hold the whole training set
    index = shard._partition_index.__wrapped__(
        "digits", str(config.resolved_data_dir), 3, "iid", num_partitions, 0.5, 2
    )
    assert sum(len(part) for part in index) == sum(
        len(node.train) + len(node.test) for node in nodes[:num_partitions]
    )
    assert len(set().union(*(set(part.tolist()) for part in index))) == sum(map(len, index))


def test_another_run_of_the_same_federation_reuses_the_index():
    # Prepare: two runs that differ only in training keys and run name
    first = parse_run_config({"dataset": "digits", "run-name": "a", "lr": 0.1})
    second = parse_run_config({"dataset": "digits", "run-name": "b", "lr": 0.2})
    shard._partition_index.cache_clear()

    # Execute
    shard.load_node_data(first, {"partition-id": 0, "num-partitions": 4})
    shard.load_node_data(second, {"partition-id": 1, "num-partitions": 4})

    # Assert
    assert shard._partition_index.cache_info().misses == 1
