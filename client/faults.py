"""Injected client faults, for tests of the coordinator's fault handling only.

Off by default: the ``faults`` run-config key is ``""``. ``"0=raise,1=sleep,2=nan"``
makes partition 0 raise during training, partition 1 sleep past the round
deadline, and partition 2 reply NaN weights. ``delay`` makes a straggler: the
partition waits ``DELAY_S`` seconds (at most a quarter of ``round-timeout``),
then trains and replies as usual. ``client/hooks.py`` acts them out around the
honest ``train_fn``.
"""

from __future__ import annotations

import time

import numpy as np

DELAY_S = 3.0


class InjectedFaultError(RuntimeError):
    """The failure a ``raise`` fault injects."""


def before_training(kind: str | None, round_timeout: float) -> None:
    """Act out a ``raise``, ``sleep`` or ``delay`` fault before local training."""
    if kind == "raise":
        raise InjectedFaultError("injected fault: this client raises during training")
    if kind == "sleep":
        time.sleep(round_timeout + 3.0)
    if kind == "delay":
        time.sleep(min(DELAY_S, round_timeout / 4))


def after_training(kind: str | None, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return ``arrays`` with NaN weights for a ``nan`` fault (a copy; input untouched)."""
    if kind != "nan":
        return arrays
    poisoned = dict(arrays)
    first = next(name for name, value in arrays.items() if value.dtype.kind == "f")
    poisoned[first] = np.full_like(arrays[first], np.nan)
    return poisoned
