"""Split a training set's labels into per-node index sets.

The splitting itself is done by the ``flwr-datasets`` partitioners, run on a
small local :class:`datasets.Dataset` holding only the labels and the original
row indices, so any in-memory dataset can be partitioned offline.

Parameter choices (the library defaults target 60k-example datasets; these also
work for scikit-learn's digits, 1,437 training examples, up to 20 partitions):

- ``iid``: :class:`IidPartitioner` cuts the dataset into contiguous blocks and
  does not shuffle, so the rows are permuted with ``seed`` first.
- ``dirichlet``: :class:`DirichletPartitioner` with ``self_balancing=True`` (as
  in the reference code of https://arxiv.org/abs/1905.12022) and
  ``min_partition_size = clip(num_examples // (10 * num_partitions), 2, 10)``.
  The partitioner redraws up to 10 times when a partition is smaller than that;
  if all draws fail the minimum is halved (down to 1) and the draw repeated,
  still deterministically from ``seed``.
- ``pathological``: :class:`PathologicalPartitioner` with
  ``class_assignment_mode="first-deterministic"`` (as in
  https://arxiv.org/abs/2102.02079): partition ``i`` always holds class
  ``i % num_classes`` plus ``classes_per_partition - 1`` random others, so each
  partition has exactly ``classes_per_partition`` classes and every class is used
  when there are at least as many partitions as classes.
- ``shard``: :class:`ShardPartitioner` as in the FedAvg paper
  (https://arxiv.org/abs/1602.05629): rows sorted by label, cut into
  ``num_partitions * classes_per_partition`` equal shards, each partition gets
  ``classes_per_partition`` random shards (2 by default, as in the paper). The
  remainder of ``num_examples / num_shards`` (fewer rows than shards) is dropped.
"""

import warnings
from collections.abc import Callable

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)

from task.names import PARTITIONER_NAMES

LABEL_COLUMN = "label"
INDEX_COLUMN = "index"

# Largest minimum partition size asked of the Dirichlet partitioner.
DIRICHLET_MAX_MIN_PARTITION_SIZE = 10


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    seed: int,
    *,
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Split example indices into ``num_partitions`` disjoint sets.

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of every example, shape ``(N,)``.
    num_partitions : int
        Number of partitions (nodes), ``1 <= num_partitions <= N``.
    partitioner : str
        One of :data:`PARTITIONER_NAMES`.
    seed : int
        Seed; the same seed gives the same partitions.
    alpha : float
        Dirichlet concentration (``dirichlet``); smaller means more label skew.
    classes_per_partition : int
        Classes per partition (``pathological``) or shards per partition (``shard``).
    num_classes : int | None
        Number of classes in the task; ``None`` means the distinct values in
        ``labels``. Only used to validate ``classes_per_partition``.

    Returns
    -------
    list[np.ndarray]
        ``num_partitions`` sorted ``int64`` arrays of indices into ``labels``;
        pairwise disjoint. They cover all examples except for ``shard``, which
        drops the remainder that does not fill a whole shard.

    Raises
    ------
    ValueError
        If the partitioner name is unknown or the parameters cannot be satisfied.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    validate_partition_args(labels, num_partitions, partitioner, alpha, classes_per_partition)
    if partitioner == "pathological":
        available = len(np.unique(labels)) if num_classes is None else num_classes
        if classes_per_partition > available:
            raise ValueError(
                f"classes-per-partition={classes_per_partition} exceeds the {available} "
                "classes of the dataset"
            )
    if partitioner == "iid":
        order = np.random.default_rng(seed).permutation(len(labels))
    else:
        order = np.arange(len(labels))
    dataset = datasets.Dataset.from_dict(
        {LABEL_COLUMN: labels[order], INDEX_COLUMN: order.astype(np.int64)}
    )
    if partitioner == "dirichlet":
        return _partition_dirichlet(dataset, num_partitions, alpha, seed)
    make_fn = _PARTITIONER_FACTORIES[partitioner]
    return _load_all(make_fn(num_partitions, seed, alpha, classes_per_partition), dataset)


def validate_partition_args(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    classes_per_partition: int,
) -> None:
    """Raise ``ValueError`` for an unknown partitioner or out-of-range parameters.

    Parameters
    ----------
    labels : np.ndarray
        Class labels, shape ``(N,)``.
    num_partitions : int
        Requested number of partitions.
    partitioner : str
        Requested partitioner name.
    alpha : float
        Dirichlet concentration.
    classes_per_partition : int
        Classes (or shards) per partition.
    """
    if partitioner not in PARTITIONER_NAMES:
        raise ValueError(
            f"Unknown partitioner {partitioner!r}; valid: {', '.join(PARTITIONER_NAMES)}"
        )
    if not 1 <= num_partitions <= len(labels):
        raise ValueError(
            f"num_partitions must be between 1 and the {len(labels)} examples, got {num_partitions}"
        )
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet alpha must be a positive number, got {alpha}")
    if classes_per_partition < 1:
        raise ValueError(f"classes-per-partition must be >= 1, got {classes_per_partition}")


def split_local(
    indices: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one node's indices into local train and test indices.

    Parameters
    ----------
    indices : np.ndarray
        The node's example indices.
    test_fraction : float
        Share held out for local evaluation, in ``[0, 1)``. When it is positive and
        the node has at least two examples, both sides get at least one.
    seed : int
        Seed of the split (e.g. the run seed plus the partition id).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Sorted train indices and sorted test indices, disjoint, covering ``indices``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    shuffled = np.random.default_rng(seed).permutation(indices)
    num_test = int(round(len(indices) * test_fraction))
    if test_fraction > 0 and len(indices) >= 2:
        num_test = min(max(num_test, 1), len(indices) - 1)
    return np.sort(shuffled[num_test:]), np.sort(shuffled[:num_test])


def _make_iid(num_partitions: int, seed: int, alpha: float, per_partition: int) -> Partitioner:
    del seed, alpha, per_partition  # the rows are already permuted with the seed
    return IidPartitioner(num_partitions=num_partitions)


def _make_pathological(
    num_partitions: int, seed: int, alpha: float, per_partition: int
) -> Partitioner:
    del alpha
    return PathologicalPartitioner(
        num_partitions=num_partitions,
        partition_by=LABEL_COLUMN,
        num_classes_per_partition=per_partition,
        class_assignment_mode="first-deterministic",
        shuffle=False,
        seed=seed,
    )


def _make_shard(num_partitions: int, seed: int, alpha: float, per_partition: int) -> Partitioner:
    del alpha
    return ShardPartitioner(
        num_partitions=num_partitions,
        partition_by=LABEL_COLUMN,
        num_shards_per_partition=per_partition,
        shuffle=False,
        seed=seed,
    )


_PARTITIONER_FACTORIES: dict[str, Callable[[int, int, float, int], Partitioner]] = {
    "iid": _make_iid,
    "pathological": _make_pathological,
    "shard": _make_shard,
}


def _partition_dirichlet(
    dataset: datasets.Dataset, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Run the Dirichlet partitioner, relaxing the minimum size until a draw fits."""
    min_size = int(
        np.clip(len(dataset) // (10 * num_partitions), 2, DIRICHLET_MAX_MIN_PARTITION_SIZE)
    )
    while True:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LABEL_COLUMN,
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=True,
            shuffle=False,
            seed=seed,
        )
        try:
            return _load_all(partitioner, dataset)
        except ValueError as error:
            if min_size <= 1:
                raise ValueError(
                    f"Dirichlet partitioning (alpha={alpha}) left a partition empty in "
                    f"every draw; use fewer partitions or a larger alpha ({error})"
                ) from error
            min_size //= 2


def _load_all(partitioner: Partitioner, dataset: datasets.Dataset) -> list[np.ndarray]:
    """Load every partition and return its sorted original indices."""
    partitioner.dataset = dataset
    with warnings.catch_warnings():
        # Redraw and "class not used" notices are expected (see the module doc);
        # pyarrow's FutureWarning comes from datasets' own sort.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        partitions = [
            partitioner.load_partition(partition_id)
            for partition_id in range(partitioner.num_partitions)
        ]
    return [np.sort(np.asarray(part[INDEX_COLUMN], dtype=np.int64)) for part in partitions]
