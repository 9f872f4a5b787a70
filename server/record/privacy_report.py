"""Read-side privacy figures: the epsilon a round row records and a run's privacy summary.

The ServerApp stores the run's cumulative epsilon after each round as the round
metric ``epsilon`` (``strategies.accountant``); infinity when the run adds no noise.
Text output shows infinity as ``inf``; strict JSON, which has no infinity, has
``null`` beside ``epsilon_text`` ``"inf"``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence

from server.record.schema import stored_number
from task.config import NOISY_STRATEGIES

EPSILON_KEY = "epsilon"
DEFAULT_DELTA = 1e-5
# Poisson and fixed samples are drawn from the run's seed, which every node receives.
PUBLIC_SAMPLE_NOTE = "; sample drawn from the public seed: assumes it is hidden (README)"


def round_epsilon(row: Mapping[str, object]) -> float | None:
    """The epsilon a round row records (its metric ``epsilon``), or None when it has none."""
    try:
        metrics = json.loads(str(row.get("metrics_json") or "{}"))
    except (ValueError, RecursionError):
        return None
    value = metrics.get(EPSILON_KEY) if isinstance(metrics, dict) else None
    epsilon = stored_number(value, allow_inf=True)
    return epsilon if epsilon is not None and epsilon >= 0 else None  # no epsilon is negative


def format_epsilon(value: float | None) -> str:
    """``2.31``, ``inf`` (no guarantee) or ``-`` (not recorded)."""
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _number(value: object, default: float) -> float:
    number = stored_number(value, allow_inf=True)
    return default if number is None else number


def privacy_summary(
    config: Mapping[str, object], rounds: Sequence[Mapping[str, object]]
) -> dict[str, object]:
    """The run's epsilon so far and the settings it is stated under.

    ``epsilon`` is the latest round's; before any round, 0 for a run with noise
    and infinity for one without; None for a noisy run recorded before
    accounting existed (its rounds carry no epsilon).
    """
    noise = _number(config.get("noise-multiplier"), 0.0)
    noisy = config.get("strategy") in NOISY_STRATEGIES and noise > 0
    trained = [row for row in rounds if _number(row.get("round"), 0.0) > 0]
    recorded = [e for e in (round_epsilon(row) for row in trained) if e is not None]
    epsilon: float | None
    if recorded:
        epsilon = recorded[-1]
    elif not noisy:
        epsilon = math.inf
    else:
        epsilon = 0.0 if not trained else None
    sampling = str(config.get("sampling", "fraction"))
    return {
        "epsilon": epsilon,
        "epsilon_text": format_epsilon(epsilon),
        "private": epsilon is not None and math.isfinite(epsilon),
        "delta": _number(config.get("target-delta"), DEFAULT_DELTA),
        "target_epsilon": _number(config.get("target-epsilon"), 0.0),
        "sampling": sampling,
        "adjacency": "replace-one" if sampling == "fixed" else "add-or-remove-one",
        "noise_multiplier": noise,
        # Poisson and fixed samples are drawn from the run's seed, which nodes receive
        "sample_drawn_from_public_seed": sampling in ("poisson", "fixed"),
    }


def privacy_line(privacy: Mapping[str, object]) -> str:
    """One line for ``fedcoord status``: epsilon, delta, sampling and the budget."""
    text = str(privacy.get("epsilon_text", "-"))
    if text == "inf":
        return "epsilon inf: no noise, not differentially private"
    if text == "-":
        return "epsilon not recorded (rounds from before privacy accounting)"
    budget = _number(privacy.get("target_epsilon"), 0.0)
    return (
        f"epsilon {text} at delta {_number(privacy.get('delta'), DEFAULT_DELTA):g} "
        f"({privacy.get('sampling')} sampling, noise-multiplier "
        f"{_number(privacy.get('noise_multiplier'), 0.0):g}, {privacy.get('adjacency')} node)"
        + (f"; budget {budget:g}" if budget > 0 else "; no budget")
        + (PUBLIC_SAMPLE_NOTE if privacy.get("sampling") in ("poisson", "fixed") else "")
    )
