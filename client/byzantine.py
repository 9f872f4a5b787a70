"""Byzantine clients, for robustness tests and benchmarks only (off by default).

A client whose partition id is listed in ``byzantine-partitions`` trains
honestly, then replaces its reply with an attack built from its honest update
``u = trained - received``:

- ``flip``: ``received - 10 * u``, the honest update reversed and scaled up;
- ``noise``: ``received + n`` with ``n`` Gaussian, its L2 norm 100 times that of
  ``u``.

Both follow the Byzantine workers of Blanchard et al. 2017 (Krum,
https://arxiv.org/abs/1703.02757): "omniscient" workers that send the opposite
of the correct direction at a large scale, and "Gaussian" workers.

Only float arrays are attacked; integer arrays (counters) keep their trained
values. The L2 norms are taken over all float arrays together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

NamedArrays = dict[str, np.ndarray]

FLIP_SCALE = -10.0
NOISE_NORM_RATIO = 100.0


def _honest_update(
    received: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray]
) -> NamedArrays:
    return {
        name: trained[name].astype(np.float64) - received[name].astype(np.float64)
        for name in trained
        if trained[name].dtype.kind == "f"
    }


def _l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.vdot(a, a)) for a in arrays.values()))


def byzantine_arrays(
    received: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    mode: str,
    rng: np.random.Generator,
) -> NamedArrays:
    """Return the attacked reply arrays for ``mode`` (``flip`` or ``noise``).

    Parameters
    ----------
    received : Mapping[str, np.ndarray]
        The global arrays the client received.
    trained : Mapping[str, np.ndarray]
        The arrays after honest local training, same names, shapes and dtypes.
    mode : str
        ``flip`` or ``noise`` (see the module docstring).
    rng : np.random.Generator
        Draws the noise of ``noise``.

    Raises
    ------
    ValueError
        For an unknown mode.
    """
    update = _honest_update(received, trained)
    if mode == "flip":
        attack = {name: FLIP_SCALE * u for name, u in update.items()}
    elif mode == "noise":
        noise = {name: rng.standard_normal(u.shape) for name, u in update.items()}
        scale = NOISE_NORM_RATIO * _l2_norm(update) / max(_l2_norm(noise), 1e-300)
        attack = {name: scale * n for name, n in noise.items()}
    else:
        raise ValueError(f"unknown byzantine-mode {mode!r}; valid: flip, noise")
    result = dict(trained)
    for name, step in attack.items():
        result[name] = (received[name].astype(np.float64) + step).astype(trained[name].dtype)
    return result
