"""Client-level differential privacy: the epsilon each round brings a run to.

The accounting itself: pure numpy and Google's ``dp-accounting``, no flwr and no
strategy. The strategy wrapper that samples each round's nodes and composes the
round's event is :mod:`strategies.accounted`.

Node-level (user-level) DP: neighbouring runs differ in all the data of one node.
The mechanism is DP-FedAvg (McMahan et al. 2018, https://arxiv.org/abs/1710.06963):
each node's update is clipped to L2 norm ``C``, the clipped updates are summed and
Gaussian noise of std ``z * C`` is added (``z``: ``noise-multiplier``), so one node
moves the noisy sum by at most ``C``. Which nodes take part each round decides
the amplification by sampling the accountant may claim (``sampling``):

============  ======================================  ====================================
sampling      nodes of a round                        event of the round (dp-accounting)
============  ======================================  ====================================
``fraction``  ``ceil(fraction-train * N)``, drawn     ``GaussianDpEvent(z)``: no amplification,
              without replacement                     the round's nodes treated as public
``poisson``   each available node with probability   ``PoissonSampledDpEvent(q, Gaussian(z))``
              ``q = fraction-train``
``fixed``     ``k = ceil(fraction-train * N)``,       ``SampledWithoutReplacementDpEvent(N, k,
              drawn without replacement               Gaussian(z / 2))``, replace-one
============  ======================================  ====================================

``fraction`` and ``poisson`` are accounted under add/remove-one-node adjacency;
``fixed`` under replace-one, the only adjacency dp-accounting analyses sampling
without replacement in (Wang et al. 2019, https://arxiv.org/abs/1808.00087): the
population size ``N`` is public, and replacing one node moves the sum by up to
``2 C``, so the library is given ``z / 2``. The population is the nodes
registered when the round samples.

The accountant is the RDP accountant of Google's ``dp-accounting`` (the library
behind Flower 1.42's own ``flwr[dp]`` accountant, whose event types cannot state a
Poisson probability that is not ``k / N``). Every round that trains composes one
event, also a round that keeps the model (conservative); a round without noise
is non-private and makes epsilon infinite for the rest of the run. The events are
kept as a ledger that goes into every checkpoint, so a resumed run continues the
same epsilon.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from strategies.sampling import decode_json, encode_json
from task.config import NOISY_STRATEGIES, ConfigError, RunConfig

FLOWER_DP_STRATEGIES: tuple[str, ...] = ("dp-fixed-clipping", "dp-adaptive-clipping")
# Sampling whose amplification the accountant claims; the rest is "fraction".
AMPLIFIED_SAMPLING: tuple[str, ...] = ("poisson", "fixed")
ADD_OR_REMOVE_ONE = "add-or-remove-one"
REPLACE_ONE = "replace-one"
LEDGER_KEY = "privacy/ledger"
PRIVACY_PREFIX = "privacy/"
EPSILON_METRIC = "epsilon"


def adjacency_of(sampling: str) -> str:
    """The neighbouring relation the accountant uses for ``sampling``."""
    return REPLACE_ONE if sampling == "fixed" else ADD_OR_REMOVE_ONE


@dataclass(frozen=True)
class PrivacyEvent:
    """The privacy cost of one round that trains.

    Attributes
    ----------
    sampling : str
        ``fraction``, ``poisson`` or ``fixed``: how the round's nodes were drawn.
    noise_multiplier : float
        Noise std over the clip norm (``z``), as applied; 0 = no noise (not private).
    probability : float
        ``poisson``: the probability of each node to join.
    population : int
        ``fixed``: the number of nodes sampled from (``N``).
    sample_size : int
        ``fixed``: the number of nodes sampled (``k``).
    """

    sampling: str
    noise_multiplier: float
    probability: float = 1.0
    population: int = 0
    sample_size: int = 0

    def to_dp_event(self) -> Any:
        """The event in ``dp_accounting``'s terms (imported here: it takes a second)."""
        from dp_accounting import dp_event

        if self.noise_multiplier <= 0:
            return dp_event.NonPrivateDpEvent()
        if self.sampling == "poisson":
            gaussian = dp_event.GaussianDpEvent(self.noise_multiplier)
            return dp_event.PoissonSampledDpEvent(self.probability, gaussian)
        if self.sampling == "fixed":
            # Replace-one: one node moves the clipped sum by up to 2 C.
            gaussian = dp_event.GaussianDpEvent(self.noise_multiplier / 2)
            return dp_event.SampledWithoutReplacementDpEvent(
                self.population, self.sample_size, gaussian
            )
        return dp_event.GaussianDpEvent(self.noise_multiplier)

    def as_list(self) -> list[object]:
        """The event as a JSON list: sampling, z, probability, population, sample size."""
        return [
            self.sampling,
            self.noise_multiplier,
            self.probability,
            self.population,
            self.sample_size,
        ]


def event_from_list(values: object) -> PrivacyEvent:
    """Inverse of :meth:`PrivacyEvent.as_list`, checked.

    Raises
    ------
    ValueError
        If ``values`` is not a valid event.
    """
    if not isinstance(values, list) or len(values) != 5:
        raise ValueError(f"privacy event {values!r} is not [sampling, z, q, N, k]")
    sampling, noise, probability, population, sample_size = values
    numbers_ok = all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in (noise, probability)
    ) and all(isinstance(v, int) and not isinstance(v, bool) for v in (population, sample_size))
    if sampling not in ("fraction", *AMPLIFIED_SAMPLING) or not numbers_ok:
        raise ValueError(f"privacy event {values!r} is malformed")
    smallest = 1 if sampling == "fixed" else 0  # a fixed sample of k >= 1 of N >= k nodes
    if noise < 0 or not 0 < probability <= 1 or not smallest <= sample_size <= population:  # type: ignore[operator]
        raise ValueError(f"privacy event {values!r} is out of range")
    return PrivacyEvent(sampling, float(noise), float(probability), population, sample_size)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=256)
def round_rdp(event: PrivacyEvent) -> tuple[np.ndarray, np.ndarray]:
    """The RDP orders and the RDP of one round of ``event``, from dp-accounting.

    Computed once per distinct event (a Poisson round costs dp-accounting about
    0.1 s, a round sampled without replacement 0.3 s; a run repeats one event).
    """
    from dp_accounting import privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    relation = privacy_accountant.NeighboringRelation
    replace_one = adjacency_of(event.sampling) == REPLACE_ONE
    backend = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=relation.REPLACE_ONE if replace_one else relation.ADD_OR_REMOVE_ONE
    )
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "failed to converge ... excluding this order": conservative
    try:
        backend.compose(event.to_dp_event())
    finally:
        absl.setLevel(level)
    orders, rdp = backend.orders, backend.rdp
    orders.flags.writeable = rdp.flags.writeable = False
    return orders, rdp


def rdp_orders() -> np.ndarray:
    """dp-accounting's default RDP orders: those of every :func:`round_rdp` curve."""
    orders, _ = round_rdp(PrivacyEvent("fraction", 1.0))
    return orders


class PrivacyAccountant:
    """Composes one event per round and reports epsilon at ``target_delta``.

    dp-accounting's RDP accountant gives each round's RDP curve (``round_rdp``)
    and turns the run's curve into epsilon (``compute_epsilon``, the conversion
    of Balle et al. 2020, https://arxiv.org/abs/1905.09982); rounds compose by
    adding their curves, as its ``RdpAccountant.compose`` does.

    Parameters
    ----------
    target_delta : float
        The delta epsilon is reported at, in (0, 1).
    adjacency : str
        ``add-or-remove-one`` or ``replace-one`` (``sampling=fixed``).
    """

    def __init__(self, target_delta: float, adjacency: str = ADD_OR_REMOVE_ONE) -> None:
        self.target_delta = target_delta
        self.adjacency = adjacency
        self.entries: list[tuple[PrivacyEvent, int]] = []  # consecutive equal events merged
        self._rdp: np.ndarray | None = None  # the run's RDP curve; None before any round

    @property
    def rounds(self) -> int:
        """Number of events composed (rounds accounted)."""
        return sum(count for _, count in self.entries)

    def compose(self, event: PrivacyEvent, count: int = 1) -> None:
        """Add ``count`` rounds of ``event`` to the run's privacy cost."""
        self._check_adjacency(event)
        self._rdp = self._curve_after(event, count)
        if self.entries and self.entries[-1][0] == event:
            self.entries[-1] = (event, self.entries[-1][1] + count)
        else:
            self.entries.append((event, count))

    def epsilon(self) -> float:
        """Epsilon of every round composed so far at ``target_delta`` (0 before any)."""
        return 0.0 if self._rdp is None else self._epsilon_of(self._rdp)

    def epsilon_after(self, event: PrivacyEvent) -> float:
        """The epsilon one more round of ``event`` would reach; changes nothing."""
        self._check_adjacency(event)
        return self._epsilon_of(self._curve_after(event, 1))

    def _curve_after(self, event: PrivacyEvent, count: int) -> np.ndarray:
        _, rdp = round_rdp(event)
        with np.errstate(invalid="ignore"):  # 0 * inf never happens: count >= 1
            added = count * rdp
        return added if self._rdp is None else self._rdp + added

    def _epsilon_of(self, rdp: np.ndarray) -> float:
        from dp_accounting.rdp import rdp_privacy_accountant

        epsilon, _ = rdp_privacy_accountant.compute_epsilon(rdp_orders(), rdp, self.target_delta)
        return float(epsilon)

    def _check_adjacency(self, event: PrivacyEvent) -> None:
        if adjacency_of(event.sampling) != self.adjacency:
            raise ValueError(
                f"a sampling={event.sampling} round is accounted under "
                f"{adjacency_of(event.sampling)} adjacency, this run under {self.adjacency}"
            )

    def state_dict(self) -> dict[str, np.ndarray]:
        """The ledger of events as ``{"privacy/ledger": uint8 array}`` (its JSON text)."""
        ledger = {
            "adjacency": self.adjacency,
            "events": [[*event.as_list(), count] for event, count in self.entries],
        }
        return {LEDGER_KEY: encode_json(ledger)}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Replay the ledger saved by :meth:`state_dict`.

        A checkpoint without a ledger (written before accounting) leaves its
        rounds unaccounted: epsilon is infinite, as nothing can be stated.

        Raises
        ------
        ValueError
            If the ledger is malformed or was accounted under another adjacency.
        """
        self.entries, self._rdp = [], None
        if LEDGER_KEY not in state:
            self.compose(PrivacyEvent(self._any_sampling(), 0.0))
            return
        ledger = decode_json(state[LEDGER_KEY])
        if not isinstance(ledger, dict) or not isinstance(ledger.get("events"), list):
            raise ValueError(f"{LEDGER_KEY} does not hold a privacy ledger")
        if ledger.get("adjacency") != self.adjacency:
            raise ValueError(
                f"the checkpoint's rounds were accounted under {ledger.get('adjacency')} "
                f"adjacency, this run's sampling is accounted under {self.adjacency}; "
                "resume with the sampling the run was started with"
            )
        for entry in ledger["events"]:
            if not isinstance(entry, list) or len(entry) != 6:
                raise ValueError(f"privacy ledger entry {entry!r} is malformed")
            count = entry[5]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"privacy ledger entry {entry!r} has a bad count")
            self.compose(event_from_list(entry[:5]), count)

    def _any_sampling(self) -> str:
        return "fixed" if self.adjacency == REPLACE_ONE else "fraction"


def combined_noise_multiplier(model_noise: float, count_stddev: float) -> float:
    """One Gaussian equivalent to the model's noise and the adaptive clipped count's.

    Adaptive clipping releases two Gaussian sums per round: the clipped updates
    (sensitivity 1 in units of the clip norm, multiplier ``model_noise``) and the
    number of clipped updates. Andrew et al. (https://arxiv.org/abs/1905.03871,
    Theorem 1) compose them as one Gaussian with ``(z_model^-2 + (2 sigma_b)^-2)^-1/2``
    for centred bits (sensitivity 1/2). Flower counts plain 0/1 bits, whose sum has
    sensitivity 1, so ``(z_model^-2 + sigma_b^-2)^-1/2`` is used: below Flower's
    nominal ``noise-multiplier`` (0.76 for noise-multiplier 1 and a count std of 1).
    """
    if model_noise <= 0 or count_stddev <= 0:
        return 0.0
    return float((model_noise**-2 + count_stddev**-2) ** -0.5)


# ---------------------------------------------------------------------------
# Which configurations can be accounted
# ---------------------------------------------------------------------------


def check_accountable(config: RunConfig) -> None:
    """Refuse configurations whose privacy cannot be stated, with the reason.

    Raises
    ------
    ConfigError
        For noise that no accounting covers (a strategy that does not add
        calibrated noise), amplified sampling with Flower's DP wrappers (they
        average over the replies that arrived), noise in asynchronous mode, or a
        budget for a run without noise.
    """
    noisy = config.noise_multiplier > 0
    if noisy and config.strategy not in NOISY_STRATEGIES:
        raise ConfigError(
            f"noise-multiplier={config.noise_multiplier:g} with strategy {config.strategy!r}: "
            f"no epsilon can be stated, as {config.strategy} does not add noise calibrated to "
            f"clipped updates; use one of {', '.join(NOISY_STRATEGIES)}, or noise-multiplier=0"
        )
    if noisy and getattr(config, "mode", "sync") != "sync":
        raise ConfigError(
            "noise-multiplier > 0 in mode='async' cannot be accounted (a model version mixes "
            "updates trained from older versions); use mode='sync' for differential privacy"
        )
    if noisy and config.strategy in FLOWER_DP_STRATEGIES and config.sampling != "fraction":
        raise ConfigError(
            f"sampling={config.sampling!r} with {config.strategy}: Flower's DP wrappers average "
            "over the replies that arrived and scale the noise to their count, which "
            "amplification by sampling cannot allow (Flower accounts them without "
            "amplification too); use strategy='clipped' (a fixed denominator) or "
            "sampling='fraction'"
        )
    if config.target_epsilon > 0 and not noisy:
        raise ConfigError(
            f"target-epsilon={config.target_epsilon:g} needs noise: a run without it is not "
            f"private (epsilon is infinite); set noise-multiplier > 0 with one of "
            f"{', '.join(NOISY_STRATEGIES)}, or target-epsilon=0"
        )
