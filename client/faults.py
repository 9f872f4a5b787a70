"""Injected client faults, for tests of the coordinator's fault handling only.

Off by default: the ``faults`` run-config key is ``""``. ``"0=raise,1=sleep,2=nan"``
makes partition 0 raise during training, partition 1 sleep past the round
deadline, and partition 2 reply NaN weights.
"""

from __future__ import annotations

import time

import numpy as np

FAULT_KINDS: tuple[str, ...] = ("raise", "sleep", "nan")


class InjectedFaultError(RuntimeError):
    """The failure a ``raise`` fault injects."""


def parse_faults(text: str) -> dict[int, str]:
    """``"0=raise,2=nan"`` -> ``{0: "raise", 2: "nan"}``.

    Raises
    ------
    ValueError
        If an entry is malformed or names an unknown kind.
    """
    faults: dict[int, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        partition, _, kind = entry.partition("=")
        if not partition.strip().isdigit() or kind.strip() not in FAULT_KINDS:
            raise ValueError(
                f"faults entry {entry!r} is malformed; use PARTITION=KIND with KIND one of "
                f"{', '.join(FAULT_KINDS)}"
            )
        faults[int(partition)] = kind.strip()
    return faults


def before_training(kind: str | None, round_timeout: float) -> None:
    """Act out a ``raise`` or ``sleep`` fault before local training."""
    if kind == "raise":
        raise InjectedFaultError("injected fault: this client raises during training")
    if kind == "sleep":
        time.sleep(round_timeout + 3.0)


def after_training(kind: str | None, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return ``arrays`` with NaN weights for a ``nan`` fault (a copy; input untouched)."""
    if kind != "nan":
        return arrays
    poisoned = dict(arrays)
    first = next(name for name, value in arrays.items() if value.dtype.kind == "f")
    poisoned[first] = np.full_like(arrays[first], np.nan)
    return poisoned
