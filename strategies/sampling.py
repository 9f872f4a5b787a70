"""Reproducible node sampling whose state survives a restart.

Flower's ``strategy_utils.sample_nodes`` waits, with no time limit, for enough
nodes to connect; the coordinator checks the node count itself and then asks a
strategy to sample from the node ids it has. The sampler's random state goes
into checkpoints as a uint8 array (its JSON text), so a resumed run samples as
the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

STATE_KEY = "sampler/rng"


def encode_json(value: object) -> np.ndarray:
    """Return ``value`` as the uint8 array of its UTF-8 JSON text (no pickle)."""
    return np.frombuffer(json.dumps(value).encode(), dtype=np.uint8).copy()


def decode_json(array: np.ndarray) -> object:
    """Inverse of :func:`encode_json`."""
    return json.loads(np.asarray(array, dtype=np.uint8).tobytes().decode())


class NodeSampler:
    """Samples a share of the available nodes, reproducibly from a seed.

    Parameters
    ----------
    seed : int
        Seeds the random generator.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def sample(
        self,
        node_ids: Iterable[int],
        fraction: float,
        minimum: int,
        key: Callable[[int], Any] | None = None,
    ) -> list[int]:
        """Sample ``ceil(fraction * n)`` of ``node_ids`` (at least ``minimum``, at most n).

        The nodes are put in ``key`` order (default: by node id) before sampling
        and the sample is returned in that order, so the same generator state
        and the same keys give the same sample whatever order ``node_ids`` come
        in and whatever the node ids are (the coordinator keys nodes by their
        partition id: simulated nodes get new random ids in every run).
        """
        available = sorted(node_ids, key=key)
        count = self.sample_size(len(available), fraction, minimum)
        chosen = set(self.rng.sample(available, count))
        return [node_id for node_id in available if node_id in chosen]

    @staticmethod
    def sample_size(available: int, fraction: float, minimum: int) -> int:
        """``ceil(fraction * available)``, at least ``minimum``, at most ``available``."""
        return min(available, max(minimum, math.ceil(fraction * available)))

    def sample_poisson(
        self,
        node_ids: Iterable[int],
        probability: float,
        key: Callable[[int], Any] | None = None,
    ) -> list[int]:
        """Each node joins independently with ``probability`` (Poisson sampling).

        One draw per node, in ``key`` order, from the same generator as
        :meth:`sample` (its state is checkpointed), so a seed gives the same
        samples whatever the node ids. The sample may be empty: it is never
        topped up, which amplification by sampling needs.
        """
        available = sorted(node_ids, key=key)
        return [node_id for node_id in available if self.rng.random() < probability]

    def state_dict(self) -> dict[str, np.ndarray]:
        """The generator's state as ``{"sampler/rng": uint8 array}``."""
        return {STATE_KEY: encode_json(self.rng.getstate())}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the generator's state saved by :meth:`state_dict`."""
        saved = decode_json(state[STATE_KEY])
        if not isinstance(saved, list) or len(saved) != 3:
            raise ValueError(f"{STATE_KEY} does not hold a random.Random state")
        version, internal, gauss_next = saved
        self.rng.setstate((version, tuple(internal), gauss_next))


class SamplesNodes:
    """Gives a strategy ``sample_nodes`` and ``sample_poisson``, drawn from its ``sampler``."""

    sampler: NodeSampler

    def sample_nodes(
        self,
        node_ids: Iterable[int],
        fraction: float,
        minimum: int,
        key: Callable[[int], Any] | None = None,
    ) -> list[int]:
        """Sample ``fraction`` of ``node_ids`` (at least ``minimum``), reproducibly.

        See :meth:`NodeSampler.sample` for ``key``.
        """
        return self.sampler.sample(node_ids, fraction, minimum, key)

    def sample_poisson(
        self,
        node_ids: Iterable[int],
        probability: float,
        key: Callable[[int], Any] | None = None,
    ) -> list[int]:
        """Each node joins independently with ``probability``, reproducibly.

        See :meth:`NodeSampler.sample_poisson`.
        """
        return self.sampler.sample_poisson(node_ids, probability, key)
