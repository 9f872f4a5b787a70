"""Simulated client slowness (``client-delay``), for tests and benchmarks only.

Off by default (``client-delay=""``). A slowed node sleeps before it trains, as
a slower device or link would make it late. The delay is a pure function of the
run's seed, the node's partition and the model version (round) it trains, so
two runs of one configuration make the same stragglers:

- ``lognormal:SIGMA``: ``exp(SIGMA * z)`` seconds (median 1 s), ``z`` standard
  normal drawn from ``(seed, partition, version)``;
- ``PARTITION=SECONDS,...``: fixed seconds by partition, ``*=SECONDS`` for the
  partitions not listed (0 when there is no ``*``).

A delay never exceeds ``round-timeout`` (past it the training is given up anyway).
"""

from __future__ import annotations

import math
import time

import numpy as np

from task.config_values import ClientDelay


def delay_seconds(
    delay: ClientDelay, seed: int, partition_id: int, version: int, limit_s: float
) -> float:
    """Seconds partition ``partition_id`` waits before training ``version`` (<= ``limit_s``)."""
    if delay.sigma is not None:
        key = [seed, max(partition_id, 0), max(version, 0)]
        z = float(np.random.default_rng(key).standard_normal())
        seconds = math.exp(delay.sigma * z)
    else:
        seconds = delay.seconds.get(partition_id, delay.default_s)
    return min(seconds, limit_s)


def sleep_before_training(
    delay: ClientDelay, seed: int, partition_id: int, version: int, limit_s: float
) -> float:
    """Sleep this node's delay for ``version``; return the seconds slept."""
    if not delay.active:
        return 0.0
    seconds = delay_seconds(delay, seed, partition_id, version, limit_s)
    if seconds > 0:
        time.sleep(seconds)
    return seconds
