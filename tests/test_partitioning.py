"""Tests of task.partitioning: flwr-datasets partitioners on in-memory labels."""

import numpy as np
import pytest

from task.partitioning import PARTITIONER_NAMES, partition_indices, split_local

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """1,500 labels, 150 per class, in random order (digits-sized)."""
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(NUM_CLASSES), 150))


def label_entropy(labels: np.ndarray, indices: np.ndarray) -> float:
    counts = np.bincount(labels[indices], minlength=NUM_CLASSES)
    shares = counts[counts > 0] / counts.sum()
    return float(-(shares * np.log(shares)).sum())


@pytest.mark.parametrize("partitioner", PARTITIONER_NAMES)
def test_partitions_are_disjoint_sorted_and_cover_the_data(
    labels: np.ndarray, partitioner: str
) -> None:
    # Prepare
    num_partitions = 10

    # Execute
    parts = partition_indices(labels, num_partitions, partitioner, seed=1)

    # Assert
    assert len(parts) == num_partitions
    assert all(len(part) > 0 for part in parts)
    assert all(np.all(np.diff(part) > 0) for part in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert joined.min() >= 0 and joined.max() < len(labels)
    if partitioner == "shard":
        # 20 equal shards of 75; nothing left over for 1,500 examples
        assert len(joined) <= len(labels)
        assert len(labels) - len(joined) < num_partitions * 2
    else:
        assert len(joined) == len(labels)


def test_iid_partitions_are_label_balanced(labels: np.ndarray) -> None:
    # Execute
    parts = partition_indices(labels, 3, "iid", seed=3)

    # Assert
    assert [len(part) for part in parts] == [500, 500, 500]
    for part in parts:
        shares = np.bincount(labels[part], minlength=NUM_CLASSES) / len(part)
        assert np.abs(shares - 0.1).max() < 0.06


def test_dirichlet_skew_grows_as_alpha_falls(labels: np.ndarray) -> None:
    # Execute
    near_iid = partition_indices(labels, 10, "dirichlet", seed=5, alpha=100.0)
    skewed = partition_indices(labels, 10, "dirichlet", seed=5, alpha=0.1)

    # Assert
    entropy_near_iid = np.mean([label_entropy(labels, part) for part in near_iid])
    entropy_skewed = np.mean([label_entropy(labels, part) for part in skewed])
    assert entropy_near_iid > 0.95 * np.log(NUM_CLASSES)
    assert entropy_skewed < entropy_near_iid - 0.5


def test_dirichlet_many_partitions_small_alpha_still_succeeds(labels: np.ndarray) -> None:
    # Prepare: 20 nodes on 1,500 examples with very small alpha needs the fallback
    # to a smaller minimum partition size.

    # Execute
    parts = partition_indices(labels, 20, "dirichlet", seed=0, alpha=0.05)

    # Assert
    assert len(parts) == 20
    assert all(len(part) >= 1 for part in parts)
    assert sum(len(part) for part in parts) == len(labels)


@pytest.mark.parametrize("classes_per_partition", [1, 2, 3])
def test_pathological_gives_exactly_k_classes(
    labels: np.ndarray, classes_per_partition: int
) -> None:
    # Execute
    parts = partition_indices(
        labels, 10, "pathological", seed=2, classes_per_partition=classes_per_partition
    )

    # Assert
    assert [len(np.unique(labels[part])) for part in parts] == [classes_per_partition] * 10
    # first-deterministic assignment: partition i always holds class i
    assert all(i in set(labels[part]) for i, part in enumerate(parts))


def test_pathological_refuses_more_classes_than_exist(labels: np.ndarray) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="classes"):
        partition_indices(labels, 4, "pathological", seed=0, classes_per_partition=11)


def test_shard_gives_equal_shards_of_few_classes(labels: np.ndarray) -> None:
    # Execute
    parts = partition_indices(labels, 10, "shard", seed=4, classes_per_partition=2)

    # Assert: 20 shards of 75 from label-sorted data, two per partition
    assert [len(part) for part in parts] == [150] * 10
    assert all(len(np.unique(labels[part])) <= 2 for part in parts)


@pytest.mark.parametrize("partitioner", PARTITIONER_NAMES)
def test_same_seed_same_partitions_other_seed_other_partitions(
    labels: np.ndarray, partitioner: str
) -> None:
    # Execute
    first = partition_indices(labels, 5, partitioner, seed=11)
    again = partition_indices(labels, 5, partitioner, seed=11)
    other = partition_indices(labels, 5, partitioner, seed=12)

    # Assert
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(
        len(a) == len(b) and np.array_equal(a, b) for a, b in zip(first, other, strict=True)
    )


def test_unknown_partitioner_lists_valid_names(labels: np.ndarray) -> None:
    # Execute / Assert
    with pytest.raises(ValueError) as error:
        partition_indices(labels, 2, "round-robin", seed=0)
    assert all(name in str(error.value) for name in PARTITIONER_NAMES)


@pytest.mark.parametrize("num_partitions", [0, 1501])
def test_bad_partition_count_is_refused(labels: np.ndarray, num_partitions: int) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="num_partitions"):
        partition_indices(labels, num_partitions, "iid", seed=0)


def test_split_local_is_disjoint_complete_and_deterministic() -> None:
    # Prepare
    indices = np.arange(100, 200)

    # Execute
    train, test = split_local(indices, 0.2, seed=7)
    train_again, test_again = split_local(indices, 0.2, seed=7)
    _, test_other = split_local(indices, 0.2, seed=8)

    # Assert
    assert len(train) == 80 and len(test) == 20
    assert np.array_equal(np.sort(np.concatenate([train, test])), indices)
    assert np.array_equal(train, train_again) and np.array_equal(test, test_again)
    assert not np.array_equal(test, test_other)


def test_split_local_keeps_one_example_on_each_side() -> None:
    # Execute
    train, test = split_local(np.array([3, 9]), 0.1, seed=0)

    # Assert
    assert len(train) == 1 and len(test) == 1
    with pytest.raises(ValueError):
        split_local(np.arange(10), 1.0, seed=0)
