"""Flower's ``flower-supernode``, with two of its fixed intervals made settable.

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) sleeps
3 s whenever a pull from the SuperLink brings no message, and 0.5 s between
checks for the ClientApp's reply. A round has two phases (train, evaluate), and
after each reply the next message is usually not there yet, so every phase
waits up to 3 s on every node however fast the server polls. ``--poll-interval``
caps those sleeps (0.1 s pulls cost a few small HTTPS requests a second per node;
raise it for fleets of hundreds of nodes).

The node heartbeat interval (30 s, so a node that dies without saying goodbye is
seen as gone after 60 s) is ``--heartbeat-interval``; the SuperLink accepts 10 s
to 1800 s.

Everything after ``--`` is passed to Flower's ``flower-supernode`` unchanged::

    python -m deploy.flower_supernode --poll-interval 0.1 -- --superlink HOST:PORT ...

The tuning replaces module attributes of the pinned Flower version
(``flwr==1.42.0``); :func:`tune_flower` refuses to run on a Flower whose modules
no longer have them.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Sequence
from types import ModuleType

from flwr.supercore.logger import update_console_handler
from flwr.supernode.cli.flower_supernode import flower_supernode

FLOWER_IDLE_SLEEP_S = 3.0
# A message's objects reach the SuperLink just after the message itself; Flower
# retries a missing object after 1 s, then 2 s, ...
OBJECT_PULL_BACKOFF_S = 0.02
OBJECT_PULL_BACKOFF_CAP_S = 0.5
MIN_HEARTBEAT_S, MAX_HEARTBEAT_S = 10.0, 1800.0


class CappedSleep:
    """Stands in for the ``time`` module of one Flower module: ``sleep`` is capped."""

    def __init__(self, cap_s: float) -> None:
        self.cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        """Sleep ``min(seconds, cap)``."""
        time.sleep(min(seconds, self.cap_s))

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def _module(name: str) -> ModuleType:
    __import__(name)
    return sys.modules[name]


def tune_flower(poll_interval_s: float, heartbeat_interval_s: float) -> None:
    """Set the SuperNode's idle pull interval and node heartbeat interval.

    Raises
    ------
    RuntimeError
        If the Flower modules do not have the attributes this relies on.
    """
    if not MIN_HEARTBEAT_S <= heartbeat_interval_s <= MAX_HEARTBEAT_S:
        raise ValueError(
            f"--heartbeat-interval must be in [{MIN_HEARTBEAT_S:g}, {MAX_HEARTBEAT_S:g}] "
            f"seconds (the SuperLink refuses others), got {heartbeat_interval_s:g}"
        )
    if poll_interval_s <= 0:
        raise ValueError(f"--poll-interval must be > 0, got {poll_interval_s:g}")
    loop = _module("flwr.supernode.start_client_internal")
    connection = _module("flwr.supernode.fleet_http_connection")
    heartbeat = _module("flwr.supercore.heartbeat")
    for module, attribute in (
        (loop, "time"),
        (loop, "pull_objects"),
        (connection, "HEARTBEAT_DEFAULT_INTERVAL"),
        (heartbeat, "HEARTBEAT_DEFAULT_INTERVAL"),
    ):
        if not hasattr(module, attribute):
            raise RuntimeError(
                f"{module.__name__} has no {attribute}: this Flower version is not the one "
                "deploy/flower_supernode.py was written for (flwr 1.42); run flower-supernode "
                "directly"
            )
    if poll_interval_s < FLOWER_IDLE_SLEEP_S:
        loop.time = CappedSleep(poll_interval_s)  # type: ignore[attr-defined]
        loop.pull_objects = functools.partial(  # type: ignore[attr-defined]
            loop.pull_objects,
            initial_backoff=min(poll_interval_s, OBJECT_PULL_BACKOFF_S),
            backoff_cap=OBJECT_PULL_BACKOFF_CAP_S,
        )
    connection.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_interval_s  # type: ignore[attr-defined]
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = heartbeat_interval_s  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> None:
    """Tune Flower, then run ``flower-supernode`` with the arguments after ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ours, flower_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--poll-interval", type=float, default=FLOWER_IDLE_SLEEP_S)
    parser.add_argument("--heartbeat-interval", type=float, default=30.0)
    args = parser.parse_args(ours)
    try:
        tune_flower(args.poll_interval, args.heartbeat_interval)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    update_console_handler(timestamps=True)  # a node operator reads when things happened
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
