"""The ``strategy`` run-config key -> a strategy ready for the coordinator."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from strategies.strategy import FedCoordStrategy, WeightFn, uniform_weight, weight_by_examples
from task import keys
from task.config import ConfigError, RunConfig

OWN_STRATEGIES: tuple[str, ...] = ("fedavg", "mean", "weighted", "clipped")
STRATEGY_NAMES: tuple[str, ...] = OWN_STRATEGIES


def operator_weights(weights: dict[int, float]) -> WeightFn:
    """Weight each reply by its partition's operator weight (1.0 if unset)."""

    def weight(node_id: int, num_examples: int, metrics: Mapping[str, float]) -> float:
        del node_id, num_examples
        partition = metrics.get(keys.PARTITION_ID)
        return weights.get(int(partition), 1.0) if partition is not None else 1.0

    return weight


def _weight_fn(config: RunConfig) -> WeightFn:
    if config.strategy == "fedavg":
        return weight_by_examples
    if config.strategy == "weighted":
        return operator_weights(config.parsed_node_weights)
    return uniform_weight


def _options(config: RunConfig) -> dict[str, object]:
    if config.strategy == "clipped":
        return {
            "clip_norm": config.clip_norm,
            "noise_multiplier": config.noise_multiplier,
            "seed": config.seed,
        }
    return {}


BUILDERS: dict[str, Callable[[RunConfig], FedCoordStrategy]] = {
    name: lambda config: FedCoordStrategy(
        aggregator=config.strategy,
        aggregator_options=_options(config),
        weight_fn=_weight_fn(config),
        server_lr=config.server_lr,
        fraction_train=config.fraction_train,
        min_train_nodes=config.min_train_nodes,
        seed=config.seed,
    )
    for name in OWN_STRATEGIES
}


def build_strategy(config: RunConfig) -> FedCoordStrategy:
    """Build the strategy named by ``config.strategy``.

    Raises
    ------
    ConfigError
        If the name is unknown; the message lists the valid names.
    """
    if config.strategy not in BUILDERS:
        raise ConfigError(
            f"unknown strategy {config.strategy!r}; valid: {', '.join(STRATEGY_NAMES)}"
        )
    return BUILDERS[config.strategy](config)
