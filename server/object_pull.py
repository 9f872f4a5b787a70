"""Reply object pulls that keep to the round: short retries, no pull past round-timeout.

A Flower 1.42 ServerApp reads replies through ``HttpGrid.pull_messages``. The
SuperLink lists a reply as soon as the node has pushed the message, before the
node has uploaded the message's objects (the arrays), so the Grid's first
object pull often finds them missing. Flower then retries after 1 s, 2 s, 4 s,
... (capped at 10 s) for up to 7200 s. With a 50 ms reply poll that backoff,
not the clients, sets the round's length; and a node that dies halfway through
its upload holds the round up to two hours past ``round-timeout``.

:func:`install` makes the ServerApp process's Grid retry a missing object after
20 ms (doubling up to 0.5 s). Inside :func:`pull_deadline` the pulls also stop
at that deadline; the Grid then hands back an error reply for that node
("reply message objects are unavailable"), which the coordinator counts as that
node's failure, and the round closes on time with the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from flwr.superlink.grid import http_grid

INITIAL_BACKOFF_S = 0.02
BACKOFF_CAP_S = 0.5

_deadline: ContextVar[float | None] = ContextVar("fedcoord_object_pull_deadline", default=None)
PullObjects = Callable[..., dict[str, bytes]]


def pull_options(
    options: dict[str, object], deadline: float | None, now: float
) -> dict[str, object]:
    """Flower's ``pull_objects`` keyword arguments with our backoff and the deadline's time limit.

    Parameters
    ----------
    options
        The keyword arguments Flower passed (they win over our backoff defaults).
    deadline
        ``time.monotonic()`` value after which no object is retried; None for no limit.
    now
        The current ``time.monotonic()``.
    """
    bounded: dict[str, object] = {
        "initial_backoff": INITIAL_BACKOFF_S,
        "backoff_cap": BACKOFF_CAP_S,
        **options,
    }
    if deadline is not None:
        remaining = max(deadline - now, 0.0)
        limit = bounded.get("max_time")
        bounded["max_time"] = remaining if limit is None else min(float(limit), remaining)  # type: ignore[arg-type]
    return bounded


def bounded(pull_objects: PullObjects) -> PullObjects:
    """Wrap Flower's ``pull_objects`` with :func:`pull_options`."""

    def pull_within_round(
        object_ids: list[str], pull_object_fn: Callable[[str], bytes], **options: object
    ) -> dict[str, bytes]:
        settings = pull_options(options, _deadline.get(), time.monotonic())
        return pull_objects(object_ids, pull_object_fn, **settings)

    pull_within_round.fedcoord_wrapped = pull_objects  # type: ignore[attr-defined]
    return pull_within_round


def install() -> None:
    """Make this process's ``HttpGrid`` pull reply objects with :func:`bounded` (idempotent).

    Raises
    ------
    RuntimeError
        If Flower's Grid module no longer has ``pull_objects`` (another Flower version).
    """
    current = getattr(http_grid, "pull_objects", None)
    if current is None:
        raise RuntimeError(
            "flwr.superlink.grid.http_grid has no pull_objects: server/object_pull.py was "
            "written for flwr 1.42"
        )
    if not hasattr(current, "fedcoord_wrapped"):
        http_grid.pull_objects = bounded(current)  # type: ignore[attr-defined]


@contextmanager
def pull_deadline(deadline: float) -> Iterator[None]:
    """Within this block, object pulls stop at ``deadline`` (a ``time.monotonic()`` value)."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)
