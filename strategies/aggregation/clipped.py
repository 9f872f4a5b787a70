"""Clipped mean with Gaussian noise: the DP-FedAvg aggregator, streaming."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.aggregation.base import (
    NDArrays,
    _require_number,
    _require_seed,
    _to_arrays,
    _UpdateLayout,
    compute_update_norm,
    difference_norm,
)
from strategies.aggregation.streaming import _StreamingAggregatorBase


class ClippedMeanAggregator(_StreamingAggregatorBase):
    """Unweighted mean of clipped updates, with optional Gaussian noise.

    Each update is scaled by ``min(1, clip_norm / ||u||)``, the L2 norm taken over
    all its float arrays together (FlatClip, https://arxiv.org/abs/1710.06963);
    the clipped updates are averaged with equal weights and, when
    ``noise_multiplier > 0``, Gaussian noise of standard deviation
    ``noise_multiplier * clip_norm / n`` is added to the average (DP-FedAvg with
    fixed clipping, Andrew et al. 2021, https://arxiv.org/abs/1905.03871).

    The weight passed to ``add`` is ignored on purpose: with equal weights one
    client moves the average by at most ``clip_norm / n``, the sensitivity the
    noise is calibrated to. Weighting by example counts would let one client move
    it by up to ``clip_norm * w_i / sum(w)``, breaking that bound. Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` wrapper does the same.

    Integer arrays are averaged unclipped and without noise, so they are outside
    any privacy guarantee (``num_batches_tracked`` reveals local step counts).

    With a ``denominator`` the sum is divided by it instead of by ``n``, and the
    noise std is ``noise_multiplier * clip_norm / denominator``: the fixed-denominator
    estimator of DP-FedAvg (McMahan et al. 2018, https://arxiv.org/abs/1710.06963),
    with the expected number of participants under Poisson sampling. Neither the
    scale of the result nor its noise then depends on how many updates came in,
    which amplification by sampling needs. After :meth:`expect`, a round with no
    update at all returns the noise alone.

    Parameters
    ----------
    clip_norm : float
        L2 bound on each update, > 0.
    noise_multiplier : float
        Noise standard deviation in units of ``clip_norm / n``, >= 0.
    seed : int or None
        Seed of the noise generator. One aggregator serves one round; derive a
        fresh seed per round (re-using one repeats the noise), or pass None.
    denominator : float or None
        Fixed divisor of the sum of clipped updates (> 0); None divides by ``n``.
    """

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 0.0,
        seed: int | None = None,
        denominator: float | None = None,
    ) -> None:
        super().__init__()
        self.clip_norm = _require_number("clip_norm", clip_norm, minimum=0.0, inclusive=False)
        self.noise_multiplier = _require_number("noise_multiplier", noise_multiplier, minimum=0.0)
        self.denominator = (
            None
            if denominator is None
            else _require_number("denominator", denominator, minimum=0.0, inclusive=False)
        )
        self._rng = np.random.default_rng(_require_seed(seed))
        self._num_clipped = 0

    @property
    def num_clipped(self) -> int:
        """Number of updates whose norm exceeded ``clip_norm`` and were scaled down."""
        return self._num_clipped

    def add(self, update: Sequence[np.ndarray], weight: float = 1.0) -> None:
        """Clip one update to ``clip_norm`` and fold it in; ``weight`` is ignored."""
        arrays = self._accept(update)
        norm = compute_update_norm(arrays)
        float_scale = 1.0
        if norm > self.clip_norm:
            float_scale = self.clip_norm / norm
            self._num_clipped += 1
        layout = self._require_layout()
        scales = [float_scale if is_float else 1.0 for is_float in layout.is_float]
        self._streaming_sum().fold(arrays, scales)
        self._count += 1

    def add_difference(
        self,
        clients: Sequence[np.ndarray],
        references: Sequence[np.ndarray],
        weight: float = 1.0,
        *,
        scale: float = 1.0,
    ) -> None:
        """Clip the update ``clients - references`` and fold it in, without materialising it.

        Two blocked passes per array: the norm (which also checks the clients'
        float values), then the scaled fold. ``weight`` is ignored, as in :meth:`add`.
        ``scale`` in [0, 1] multiplies the clipped float arrays (FedBuff's staleness
        weight); at most 1, it keeps each update's norm within ``clip_norm``.

        Raises
        ------
        NonFiniteUpdateError
            If a client's float array holds NaN or infinite values; nothing is folded in.
        ValueError
            For arrays that do not match the first update's layout.
        """
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"scale must be in [0, 1], got {scale}")
        arrays = self._accept(clients)
        layout = self._require_layout()
        layout.validate(_to_arrays(references))
        norm = difference_norm(arrays, list(references))
        float_scale = 1.0
        if norm > self.clip_norm:
            float_scale = self.clip_norm / norm
            self._num_clipped += 1
        scales = [float_scale * scale if is_float else 1.0 for is_float in layout.is_float]
        self._streaming_sum().fold_scaled_difference(arrays, list(references), scales)
        self._count += 1

    def expect(self, references: Sequence[np.ndarray]) -> None:
        """Take the layout of the updates from ``references`` before any update comes.

        With a ``denominator``, :meth:`result` then works with no update at all
        (zeros plus the noise), so whether any node took part does not decide
        whether the round releases a model.

        Raises
        ------
        ValueError
            Without a ``denominator``, or when updates were already added.
        """
        if self.denominator is None or self._count:
            raise ValueError("expect() needs a denominator and comes before any update")
        self._accept(references)
        self._streaming_sum()

    def result(self) -> NDArrays:
        """Return the average of the clipped updates, plus noise if configured."""
        fixed = self.denominator is not None
        layout = self._require_layout() if fixed else self._require_updates()
        if self._sum is None:
            raise ValueError("no updates to aggregate")
        averages = self._sum.averages(self._divisor())
        if self.noise_multiplier > 0.0:
            self._add_noise(averages, layout)
        return layout.restore(averages)

    def _divisor(self) -> float:
        return float(self._count) if self.denominator is None else self.denominator

    def _add_noise(self, averages: NDArrays, layout: _UpdateLayout) -> None:
        std = self.noise_multiplier * self.clip_norm / self._divisor()
        for average, is_float in zip(averages, layout.is_float, strict=True):
            if not is_float:
                continue
            noise_dtype = np.float32 if average.dtype == np.float32 else np.float64
            noise = self._rng.standard_normal(average.size, dtype=noise_dtype)
            np.multiply(noise, std, out=noise)
            np.add(average, noise, out=average)
