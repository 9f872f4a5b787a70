"""The ``strategy`` run-config key -> a strategy ready for the coordinator.

Our own strategies (``FedCoordStrategy`` with one of our aggregators) fold each
update in as it arrives; Flower's built-ins run inside ``FlowerStrategyAdapter``.
Both validate replies the same way and offer the same interface. Our ``krum``
takes the name ``krum``; Flower's is reachable as ``multikrum`` with
``num-selected=1``.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING

from flwr.common.logger import log
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    MultiKrum,
    Strategy,
)

from strategies.accountant import check_accountable
from strategies.flower_builtin import UNIT_WEIGHT_KEY, FlowerStrategyAdapter
from strategies.strategy import (
    FedCoordStrategy,
    OperatorWeights,
    WeightFn,
    uniform_weight,
    weight_by_examples,
)
from task.config import ConfigError, RunConfig

OWN_STRATEGIES: tuple[str, ...] = (
    "fedavg",
    "mean",
    "weighted",
    "clipped",
    "median",
    "trimmed-mean",
    "krum",
)
FLOWER_STRATEGIES: tuple[str, ...] = (
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedavgm",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "multikrum",
    "bulyan",
    "dp-fixed-clipping",
    "dp-adaptive-clipping",
)
STRATEGY_NAMES: tuple[str, ...] = OWN_STRATEGIES + FLOWER_STRATEGIES

# Flower strategies that apply a server step of their own, with server-lr as its size.
SERVER_OPTIMISERS: frozenset[str] = frozenset({"fedadam", "fedyogi", "fedadagrad", "fedavgm"})
# An Adam-style server step moves every coordinate by about eta: larger is rarely useful.
_LARGEST_USUAL_FEDOPT_ETA = 0.1

CoordinatedStrategy = FedCoordStrategy | FlowerStrategyAdapter


# ---------------------------------------------------------------------------
# Our own strategies
# ---------------------------------------------------------------------------


def _weight_fn(config: RunConfig) -> WeightFn:
    if config.strategy == "fedavg":
        return weight_by_examples
    if config.strategy == "weighted":
        return OperatorWeights(config.node_weights)
    return uniform_weight


def _aggregator_options(config: RunConfig) -> dict[str, object]:
    if config.strategy == "clipped":
        return {
            "clip_norm": config.clip_norm,
            "noise_multiplier": config.noise_multiplier,
            "seed": config.seed,
        }
    if config.strategy == "trimmed-mean":
        return {"beta": config.trim_beta}
    if config.strategy == "krum":
        return {"num_malicious": config.num_malicious, "num_selected": config.num_selected}
    return {}


def build_own_strategy(config: RunConfig) -> FedCoordStrategy:
    """``FedCoordStrategy`` with the aggregator named by ``config.strategy``."""
    return FedCoordStrategy(
        aggregator=config.strategy,
        aggregator_options=_aggregator_options(config),
        weight_fn=_weight_fn(config),
        server_lr=config.server_lr,
        fraction_train=config.fraction_train,
        min_train_nodes=config.min_train_nodes,
        seed=config.seed,
    )


# ---------------------------------------------------------------------------
# Flower's built-ins, their parameters from run-config keys
# ---------------------------------------------------------------------------


def _fedprox(config: RunConfig) -> Strategy:
    if config.proximal_mu <= 0:
        raise ConfigError(
            "strategy 'fedprox' needs proximal-mu > 0 (the clients' proximal term), "
            "e.g. proximal-mu=0.01"
        )
    return FedProx(min_train_nodes=config.min_train_nodes, proximal_mu=config.proximal_mu)


def _check_fedopt_eta(config: RunConfig) -> None:
    if config.server_lr > _LARGEST_USUAL_FEDOPT_ETA:
        log(
            WARNING,
            "strategy %s: server-lr=%s is the server optimiser's step (eta), about the change "
            "of every parameter per round; 0.001 to 0.1 is usual",
            config.strategy,
            config.server_lr,
        )


def _adaptive_fedopt(
    strategy_class: type[FedAdam] | type[FedYogi],
) -> Callable[[RunConfig], Strategy]:
    """A builder of FedAdam or FedYogi (https://arxiv.org/abs/2003.00295) from the config."""

    def build(config: RunConfig) -> Strategy:
        _check_fedopt_eta(config)
        return strategy_class(
            min_train_nodes=config.min_train_nodes,
            eta=config.server_lr,
            eta_l=config.lr,
            beta_1=config.fedopt_beta1,
            beta_2=config.fedopt_beta2,
            tau=config.fedopt_tau,
        )

    return build


def _fedadagrad(config: RunConfig) -> Strategy:
    _check_fedopt_eta(config)
    return FedAdagrad(
        min_train_nodes=config.min_train_nodes,
        eta=config.server_lr,
        eta_l=config.lr,
        tau=config.fedopt_tau,
    )


def _fedavgm(config: RunConfig) -> Strategy:
    return FedAvgM(
        min_train_nodes=config.min_train_nodes,
        server_learning_rate=config.server_lr,
        server_momentum=config.server_momentum,
    )


def _dp_fixed_clipping(config: RunConfig) -> Strategy:
    return DifferentialPrivacyServerSideFixedClipping(
        FedAvg(min_train_nodes=config.min_train_nodes, weighted_by_key=UNIT_WEIGHT_KEY),
        noise_multiplier=config.noise_multiplier,
        clipping_norm=config.clip_norm,
        num_sampled_clients=config.min_train_nodes,  # set to the replies' count each round
    )


def _dp_adaptive_clipping(config: RunConfig) -> Strategy:
    noise, stddev = config.noise_multiplier, config.dp_clipped_count_stddev
    if noise > 0 and stddev <= noise / 2:
        raise ConfigError(
            f"dp-adaptive-clipping with noise-multiplier={noise} needs "
            f"dp-clipped-count-stddev > {noise / 2:g} (Andrew et al. suggest the expected "
            f"number of clients / 20), e.g. dp-clipped-count-stddev={noise:g}"
        )
    return DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(min_train_nodes=config.min_train_nodes, weighted_by_key=UNIT_WEIGHT_KEY),
        noise_multiplier=noise,
        num_sampled_clients=config.min_train_nodes,  # set to the replies' count each round
        initial_clipping_norm=config.clip_norm,
        clipped_count_stddev=stddev,
    )


FLOWER_BUILDERS: dict[str, Callable[[RunConfig], Strategy]] = {
    "fedprox": _fedprox,
    "fedadam": _adaptive_fedopt(FedAdam),
    "fedyogi": _adaptive_fedopt(FedYogi),
    "fedavgm": _fedavgm,
    "fedadagrad": _fedadagrad,
    "fedmedian": lambda config: FedMedian(min_train_nodes=config.min_train_nodes),
    "fedtrimmedavg": lambda config: FedTrimmedAvg(
        min_train_nodes=config.min_train_nodes, beta=config.trim_beta
    ),
    "multikrum": lambda config: MultiKrum(
        min_train_nodes=config.min_train_nodes,
        num_malicious_nodes=config.num_malicious,
        num_nodes_to_select=config.num_selected,
    ),
    "bulyan": lambda config: Bulyan(
        min_train_nodes=config.min_train_nodes, num_malicious_nodes=config.num_malicious
    ),
    "dp-fixed-clipping": _dp_fixed_clipping,
    "dp-adaptive-clipping": _dp_adaptive_clipping,
}


def build_flower_strategy(config: RunConfig) -> FlowerStrategyAdapter:
    """Flower's built-in named by ``config.strategy``, inside the adapter.

    Raises
    ------
    ConfigError
        If Flower refuses the parameters taken from the run config.
    """
    try:
        strategy = FLOWER_BUILDERS[config.strategy](config)
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"strategy {config.strategy!r}: {error}") from error
    own_step = config.strategy in SERVER_OPTIMISERS
    return FlowerStrategyAdapter(
        strategy,
        name=config.strategy,
        server_lr=1.0 if own_step else config.server_lr,
        min_train_nodes=config.min_train_nodes,
        seed=config.seed,
    )


def build_strategy(config: RunConfig) -> CoordinatedStrategy:
    """Build the strategy named by ``config.strategy``.

    Raises
    ------
    ConfigError
        If the name is unknown (the message lists the valid names), its
        parameters cannot be used, or its privacy cannot be accounted
        (``strategies.accountant.check_accountable``).
    """
    if config.strategy in STRATEGY_NAMES:
        check_accountable(config)
    if config.strategy in OWN_STRATEGIES:
        return build_own_strategy(config)
    if config.strategy in FLOWER_BUILDERS:
        return build_flower_strategy(config)
    raise ConfigError(f"unknown strategy {config.strategy!r}; valid: {', '.join(STRATEGY_NAMES)}")
