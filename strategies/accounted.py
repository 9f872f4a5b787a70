"""Node sampling and privacy accounting around the strategy the coordinator drives.

``AccountedStrategy`` draws each round's training nodes as ``sampling`` says
(:mod:`strategies.accountant` lists the event each sampling is accounted as),
composes the round's privacy event when the round closes and stops the run
before a round would take epsilon above ``target-epsilon``.

With ``poisson`` and ``fixed``, ``clipped`` divides the sum by a denominator fixed
before any reply (``q * N``, the expected number of participants, or ``k``) and
always releases its noisy result, so neither the model's scale nor whether a
round changed it reveals how many nodes took part (``ClippedMeanAggregator``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase

from strategies.accountant import (
    AMPLIFIED_SAMPLING,
    PRIVACY_PREFIX,
    PrivacyAccountant,
    PrivacyEvent,
    adjacency_of,
    combined_noise_multiplier,
)
from strategies.flower_builtin import FlowerStrategyAdapter
from strategies.protocol import AsyncRounds, BufferSettings, NodeKey, RoundStrategy
from strategies.records import NamedArrays
from strategies.replies import ReplyOutcome, RoundSummary
from strategies.sampling import NodeSampler
from strategies.strategy import FedCoordStrategy
from task.config import ASYNC_STRATEGIES, NOISY_STRATEGIES, RunConfig


class PrivacyBudgetReachedError(RuntimeError):
    """The next round would take epsilon above ``target-epsilon``: the run ends completed."""


class AccountedStrategy(AsyncRounds):
    """A coordinated strategy with the round's node sampling and its privacy accounting.

    Offers the coordinator's interface around ``strategy``: every call of
    :class:`~strategies.protocol.RoundStrategy` is delegated to it, here and
    explicitly, and ``sample_train_nodes``, ``check_budget`` and ``epsilon``
    are added (:class:`~strategies.protocol.AccountedRounds`). The accountant's
    ledger goes into ``state_dict`` beside the strategy's own state. FedBuff's
    settings (:class:`~strategies.protocol.BufferSettings`) are those of a
    ``FedCoordStrategy``; another strategy has none.

    Parameters
    ----------
    strategy : RoundStrategy
        The strategy that aggregates (``FedCoordStrategy`` or ``FlowerStrategyAdapter``).
    config : RunConfig
        ``sampling``, ``fraction-train``, ``min-train-nodes``, ``noise-multiplier``,
        ``target-delta``, ``target-epsilon``, ``strategy``, ``seed``.
    """

    def __init__(self, strategy: RoundStrategy, config: RunConfig) -> None:
        self.strategy = strategy
        self.config = config
        self.accountant = PrivacyAccountant(config.target_delta, adjacency_of(config.sampling))
        self._pending: PrivacyEvent | None = None
        self._denominator: float | None = None
        self._norm_before = 0.0
        self._server_round = 0
        self._warned_delta = False

    @property
    def epsilon(self) -> float:
        """Epsilon of the rounds accounted so far, at ``target-delta``."""
        return self.accountant.epsilon()

    # ------------------------------------------------------------------ sampling
    def sample_train_nodes(self, node_ids: Iterable[int], key: NodeKey | None = None) -> list[int]:
        """The nodes of this round's training, drawn as ``sampling`` says.

        Also fixes the round's privacy event and, for ``clipped`` under
        ``poisson`` / ``fixed``, the denominator of its average.
        """
        available = list(node_ids)
        config = self.config
        if config.sampling == "poisson":
            sampled = self.strategy.sample_poisson(available, config.fraction_train, key)
            denominator = config.fraction_train * len(available)
        else:
            sampled = self.strategy.sample_nodes(
                available, config.fraction_train, config.min_train_nodes, key
            )
            denominator = float(len(sampled))
        fixed = config.sampling in AMPLIFIED_SAMPLING and config.strategy == "clipped"
        self._denominator = denominator if fixed and denominator > 0 else None
        self._pending = self.next_event(len(available))
        self._warn_about_delta(len(available))
        return sampled

    def sample_nodes(
        self,
        node_ids: Iterable[int],
        fraction: float,
        minimum: int,
        key: NodeKey | None = None,
    ) -> list[int]:
        """Sample as the strategy does (federated evaluation; FedBuff's idle nodes)."""
        return self.strategy.sample_nodes(node_ids, fraction, minimum, key)

    def sample_poisson(
        self, node_ids: Iterable[int], probability: float, key: NodeKey | None = None
    ) -> list[int]:
        """Poisson sampling as the strategy does it (no round event is fixed)."""
        return self.strategy.sample_poisson(node_ids, probability, key)

    def _warn_about_delta(self, population: int) -> None:
        """Warn once when delta is not below 1 / n: publishing one node's data meets it."""
        delta = self.config.target_delta
        noisy = self._pending is not None and self._pending.noise_multiplier > 0
        if self._warned_delta or not noisy or population == 0 or delta < 1 / population:
            return
        self._warned_delta = True
        log(
            WARNING,
            "target-delta=%g is not below 1 / %d nodes: a mechanism that publishes one "
            "node's data outright has that delta; choose one well below (e.g. n^-1.1 = %.1g)",
            delta,
            population,
            population**-1.1,
        )

    def next_event(self, population: int) -> PrivacyEvent:
        """The event of a round that samples from ``population`` nodes, at the noise planned."""
        config = self.config
        noise = self._planned_noise_multiplier()
        if config.sampling == "poisson":
            return PrivacyEvent("poisson", noise, probability=config.fraction_train)
        if config.sampling == "fixed":
            fraction, minimum = config.fraction_train, config.min_train_nodes
            size = NodeSampler.sample_size(population, fraction, minimum)
            return PrivacyEvent("fixed", noise, population=population, sample_size=size)
        return PrivacyEvent("fraction", noise)

    def _planned_noise_multiplier(self) -> float:
        """The noise multiplier the accountant can count on for the next round (0: none)."""
        if self.config.strategy not in NOISY_STRATEGIES:
            return 0.0
        layer = self._adaptive_layer()
        if layer is None:
            return self.config.noise_multiplier
        return combined_noise_multiplier(layer.noise_multiplier, layer.clipped_count_stddev)

    # ----------------------------------------------------------------- budget
    def check_budget(self, server_round: int, population: int) -> None:
        """Raise if round ``server_round`` would take epsilon above ``target-epsilon``.

        Raises
        ------
        PrivacyBudgetReachedError
            ``privacy budget reached: epsilon X at round k-1; ...``.
        """
        target = self.config.target_epsilon
        if target <= 0:
            return
        projected = self.accountant.epsilon_after(self.next_event(population))
        if projected > target:
            raise PrivacyBudgetReachedError(
                f"privacy budget reached: epsilon {self.epsilon:.4g} at round "
                f"{server_round - 1}; round {server_round} would reach {projected:.4g}, "
                f"above target-epsilon={target:g} (delta {self.config.target_delta:g})"
            )

    # ----------------------------------------------------------- per round
    def set_node_partitions(self, partitions: Mapping[int, int | None]) -> None:
        """Pass the roll call's partitions on to the strategy, which checks replies."""
        self.strategy.set_node_partitions(partitions)

    def begin_round(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        """Start the round (with the fixed denominator where one applies)."""
        self._server_round = server_round
        if self._denominator is not None and isinstance(self.strategy, FedCoordStrategy):
            self.strategy.begin_round(server_round, global_arrays, denominator=self._denominator)
        else:
            self.strategy.begin_round(server_round, global_arrays)
        layer = self._adaptive_layer()
        self._norm_before = float(layer.clipping_norm) if layer is not None else 0.0

    def add_reply(self, reply: Message) -> ReplyOutcome:
        """Validate and fold (or keep) one training reply."""
        return self.strategy.add_reply(reply)

    def end_round(self) -> tuple[NamedArrays | None, RoundSummary]:
        """Close the round and compose its privacy event (whether or not the model changed)."""
        new_global, summary = self.strategy.end_round()
        # Without sample_train_nodes (a caller of its own), every node is taken as sampled
        event = self._pending or PrivacyEvent(
            self.config.sampling, self._planned_noise_multiplier(), 1.0, 1, 1
        )
        layer = self._adaptive_layer()
        if layer is not None and new_global is not None:
            event = self._top_up_adaptive_noise(event, layer, new_global, summary.accepted)
        self.accountant.compose(event)
        self._pending, self._denominator = None, None
        return new_global, summary

    def _adaptive_layer(self) -> Any:
        """Flower's adaptive-clipping wrapper when it adds noise, else None."""
        if not isinstance(self.strategy, FlowerStrategyAdapter):
            return None
        layer: Any = self.strategy.privacy_layer()
        if not isinstance(layer, DifferentialPrivacyAdaptiveBase):
            return None
        return layer if layer.noise_multiplier > 0 else None

    def _top_up_adaptive_noise(
        self, event: PrivacyEvent, layer: Any, new_global: NamedArrays, accepted: int
    ) -> PrivacyEvent:
        """Make the adaptive wrapper's noise match the norm the updates were clipped to.

        Flower clips with this round's norm ``C_t``, then updates the norm and
        scales the noise to the new ``C_t+1`` (std ``z C_t+1 / n``). When the norm
        went down, Gaussian noise of std ``z sqrt(C_t^2 - C_t+1^2) / n`` (times
        ``server-lr``) is added, so the model's noise is ``z C_t / n`` as the
        accountant assumes; when it went up, the event records the larger multiplier.
        """
        before, after = self._norm_before, float(layer.clipping_norm)
        model_noise = float(layer.noise_multiplier)
        if after < before and accepted > 0:
            scale = (
                self.strategy.server_lr if isinstance(self.strategy, FlowerStrategyAdapter) else 1.0
            )
            std = scale * model_noise * math.sqrt(before**2 - after**2) / accepted
            rng = np.random.default_rng([self.config.seed, self._server_round, 13])
            for name, array in new_global.items():
                if array.dtype.kind == "f":
                    noise = rng.standard_normal(array.shape).astype(array.dtype) * std
                    new_global[name] = array + noise
        applied = model_noise * max(after, before) / before if before > 0 else model_noise
        multiplier = combined_noise_multiplier(applied, float(layer.clipped_count_stddev))
        return PrivacyEvent(
            event.sampling, multiplier, event.probability, event.population, event.sample_size
        )

    # ------------------------------------------- what FedBuff reads (mode='async')
    @property
    def aggregator_name(self) -> str:
        """The strategy's aggregator."""
        return self._buffer_settings().aggregator_name

    @property
    def aggregator_options(self) -> Mapping[str, object]:
        """The strategy's aggregator options."""
        return self._buffer_settings().aggregator_options

    @property
    def weight_fn(self) -> Callable[[int, int, Mapping[str, float]], float]:
        """The strategy's weight of one reply (operator weights included, as they change)."""
        return self._buffer_settings().weight_fn

    @property
    def server_lr(self) -> float:
        """The strategy's server step size."""
        return self._buffer_settings().server_lr

    def _buffer_settings(self) -> BufferSettings:
        if not isinstance(self.strategy, FedCoordStrategy):
            raise TypeError(
                f"{type(self.strategy).__name__} cannot aggregate asynchronously; "
                f"mode='async' takes {', '.join(ASYNC_STRATEGIES)}"
            )
        return self.strategy

    # ------------------------------------------------------------------ state
    def set_operator_weight(self, partition_id: int, weight: float) -> None:
        """Pass an operator weight on to the strategy."""
        self.strategy.set_operator_weight(partition_id, weight)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The strategy's state and the privacy ledger."""
        return {**self.strategy.state_dict(), **self.accountant.state_dict()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the strategy's state and replay the privacy ledger.

        Raises
        ------
        ValueError
            If either part cannot be restored.
        """
        own = {k: v for k, v in state.items() if not k.startswith(PRIVACY_PREFIX)}
        self.strategy.load_state_dict(own)
        self.accountant.load_state_dict(state)


def accounted(strategy: RoundStrategy, config: RunConfig) -> AccountedStrategy:
    """``strategy`` with sampling and accounting, wrapped once.

    The ServerApp wraps the strategy it builds (its ``load_state_dict`` replays
    the privacy ledger on resume) and the coordinator wraps what it is given:
    an ``AccountedStrategy`` is returned as it is, so a strategy is never
    accounted twice.
    """
    if isinstance(strategy, AccountedStrategy):
        return strategy
    return AccountedStrategy(strategy, config)
