"""The seams between the coordinator and the strategies it drives, written down.

The coordinator (:mod:`server.coordinator`, :mod:`server.async_rounds`) never
calls Flower's ``Strategy.start()``: it samples nodes, then hands a round's
replies to a strategy one by one. Three layers meet there:

- an aggregating strategy, ``FedCoordStrategy`` (our aggregators) or
  ``FlowerStrategyAdapter`` (Flower's built-ins), implements :class:`RoundStrategy`;
- ``AccountedStrategy`` wraps one, delegating every call of
  :class:`RoundStrategy` and adding the round's training sample, the privacy
  budget and epsilon: :class:`AccountedRounds`, what the coordinator holds;
- FedBuff (``mode='async'``) also folds updates itself, with the aggregating
  strategy's aggregator, weights and server step: :class:`BufferSettings`,
  which only ``FedCoordStrategy`` has (asynchronous mode takes our own
  strategies only), and :class:`AsyncRounds`, what the async coordinator holds.

The strategies subclass these protocols explicitly, so mypy checks each one
against the seam where it is defined; nothing is forwarded implicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import numpy as np
from flwr.app import Message

from strategies.records import NamedArrays
from strategies.replies import ReplyOutcome, RoundSummary

NodeKey = Callable[[int], Any]
"""Orders node ids before sampling (the coordinator keys nodes by partition id)."""


class RoundStrategy(Protocol):
    """A strategy that samples nodes and folds one training round reply by reply."""

    def sample_nodes(
        self,
        node_ids: Iterable[int],
        fraction: float,
        minimum: int,
        key: NodeKey | None = None,
    ) -> list[int]:
        """Sample ``fraction`` of ``node_ids`` (at least ``minimum``), reproducibly."""
        ...

    def sample_poisson(
        self, node_ids: Iterable[int], probability: float, key: NodeKey | None = None
    ) -> list[int]:
        """Each node joins independently with ``probability`` (may be none)."""
        ...

    def set_node_partitions(self, partitions: Mapping[int, int | None]) -> None:
        """Check each reply's ``partition-id`` against ``partitions`` (kept, not copied).

        The coordinator's roll call fills the mapping (node id -> the partition
        the node gave, None for no valid answer) and updates it in place.
        """
        ...

    def begin_round(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Start folding replies for ``server_round`` relative to ``global_arrays``."""
        ...

    def add_reply(self, reply: Message) -> ReplyOutcome:
        """Validate one training reply and fold (or keep) it, or reject it with a reason."""
        ...

    def end_round(self) -> tuple[NamedArrays | None, RoundSummary]:
        """Close the round: the new global arrays (None if kept) and the round's summary."""
        ...

    def set_operator_weight(self, partition_id: int, weight: float) -> None:
        """Apply an operator weight from the next reply on (where the strategy uses one)."""
        ...

    def state_dict(self) -> dict[str, np.ndarray]:
        """What must survive a restart, as named arrays."""
        ...

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the state saved by :meth:`state_dict`; ``ValueError`` if it cannot."""
        ...


class AccountedRounds(RoundStrategy, Protocol):
    """A :class:`RoundStrategy` with the round's training sample and its privacy cost."""

    @property
    def epsilon(self) -> float:
        """Epsilon of the rounds accounted so far, at ``target-delta``."""
        ...

    def sample_train_nodes(self, node_ids: Iterable[int], key: NodeKey | None = None) -> list[int]:
        """The nodes of this round's training, drawn as ``sampling`` says."""
        ...

    def check_budget(self, server_round: int, population: int) -> None:
        """Raise if round ``server_round`` would take epsilon above ``target-epsilon``."""
        ...


class BufferSettings(Protocol):
    """What FedBuff takes from the aggregating strategy to fold updates itself."""

    @property
    def aggregator_name(self) -> str:
        """The aggregator's name (``fedavg``, ``mean``, ``weighted`` or ``clipped``)."""
        ...

    @property
    def aggregator_options(self) -> Mapping[str, object]:
        """The aggregator's options (its noise ``seed``, ...)."""
        ...

    @property
    def weight_fn(self) -> Callable[[int, int, Mapping[str, float]], float]:
        """Weight of one reply given ``(node_id, num_examples, metrics)``."""
        ...

    @property
    def server_lr(self) -> float:
        """Step size applied to the aggregated update."""
        ...


class AsyncRounds(AccountedRounds, BufferSettings, Protocol):
    """What the asynchronous coordinator drives: :class:`AccountedRounds` and FedBuff's settings."""
