r"""Flower's ``flower-superlink``, with two per-request costs of its database taken out.

With ``--database FILE``, Flower 1.42 keeps the link state (registered node
keys, nodes, runs, messages' metadata) in that SQLite file, and two things it
does there cost every round:

- the object store (every message's payload: a model's arrays, in parts of up
  to 5 MB) is in the same file, one transaction per part;
- every request, the nodes' idle polls included, checks that its run is still
  going, and each check first cleans up expired task tokens: two ``UPDATE``
  statements, a write transaction per request.

Together they more than double a small model's round on three nodes; the second
is most of it (BENCHMARKS.md).

``--objects-in-memory`` keeps the link state in the database and the object
store in the SuperLink's memory (Flower's own ``InMemoryObjectStore``, the one
it uses without ``--database``). Payloads are transient: Flower deletes a
message's objects once its reply has been read. What a SuperLink restart loses
is the payloads of the messages in flight at that moment; the coordinator counts
those replies as failed (the round closes at ``round-timeout`` with what it has)
and the next round's messages carry the model again. Node keys, nodes and runs
survive the restart as before.

Everything after ``--`` is passed to Flower's ``flower-superlink`` unchanged::

    python -m deploy.flower_superlink --objects-in-memory --status-cleanup-interval 1 -- \
        --database state.db ...

``--status-cleanup-interval S`` runs that cleanup at most every S seconds in
run-status checks (:class:`StatusCleanupThrottle`); task activation, heartbeats
and message storage still clean up every time.

Both replace attributes of the pinned Flower version (``flwr==1.42.0``) and
refuse to run on a Flower that no longer has them.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar

from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.superlink import config_loader
from flwr.superlink.cli.flower_superlink import flower_superlink

STATUS_CLEANUP_INTERVAL_S = 1.0
_in_status_check: ContextVar[bool] = ContextVar("fedcoord_in_run_status_check", default=False)


def in_memory_object_store_factory(database: str) -> ObjectStoreFactory:
    """Flower's in-memory object store, whatever ``--database`` names."""
    del database  # the link state still uses it
    return ObjectStoreFactory()


def keep_objects_in_memory() -> None:
    """Make the SuperLink build its object store in memory; its link state is unchanged.

    Raises
    ------
    RuntimeError
        If ``flwr.superlink.config_loader`` no longer builds the object store
        through ``ObjectStoreFactory`` (another Flower version).
    """
    if getattr(config_loader, "ObjectStoreFactory", None) is not ObjectStoreFactory:
        raise RuntimeError(
            "flwr.superlink.config_loader has no ObjectStoreFactory: this Flower version is "
            "not the one deploy/flower_superlink.py was written for (flwr 1.42); run "
            "flower-superlink directly"
        )
    config_loader.ObjectStoreFactory = in_memory_object_store_factory  # type: ignore[assignment,misc]


class StatusCleanupThrottle:
    """Runs the task-token cleanup of run-status checks at most once per interval.

    Flower's SQL link state answers every Fleet and ServerApp request with a run
    status check (is the run still going?), and each check first runs a cleanup
    of expired task tokens: two ``UPDATE`` statements, a write transaction per
    request. Inside ``get_run_status`` this lets that cleanup run at most every
    ``interval_s``; every other caller (task activation, heartbeats, message
    storage) still cleans up each time. A task's token expires after tens of
    seconds without a heartbeat, so seeing that up to ``interval_s`` later
    changes nothing a user can observe.
    """

    def __init__(self, interval_s: float = STATUS_CLEANUP_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.last_run = float("-inf")
        self.lock = threading.Lock()

    def due(self, now: float) -> bool:
        """Whether a status check's cleanup should run at ``now``; if so, mark it run."""
        with self.lock:
            if now - self.last_run < self.interval_s:
                return False
            self.last_run = now
            return True

    def install(self, state_class: type = SqlLinkState) -> None:
        """Wrap ``state_class``'s ``get_run_status`` and token cleanup (idempotent)."""
        for name in ("get_run_status", "_cleanup_expired_task_tokens"):
            if not callable(getattr(state_class, name, None)):
                raise RuntimeError(
                    f"{state_class.__name__} has no {name}: this Flower version is not the "
                    "one deploy/flower_superlink.py was written for (flwr 1.42); run "
                    "flower-superlink directly"
                )
        if hasattr(state_class.get_run_status, "fedcoord_wrapped"):
            return
        status: Callable[..., object] = state_class.get_run_status
        cleanup: Callable[..., None] = state_class._cleanup_expired_task_tokens
        throttle = self

        def get_run_status(state: object, run_ids: set[int]) -> object:
            token = _in_status_check.set(True)
            try:
                return status(state, run_ids)
            finally:
                _in_status_check.reset(token)

        def cleanup_expired_task_tokens(state: object) -> None:
            if _in_status_check.get() and not throttle.due(time.monotonic()):
                return
            cleanup(state)

        get_run_status.fedcoord_wrapped = status  # type: ignore[attr-defined]
        state_class.get_run_status = get_run_status  # type: ignore[attr-defined]
        state_class._cleanup_expired_task_tokens = cleanup_expired_task_tokens  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> None:
    """Apply the options, then run ``flower-superlink`` with the arguments after ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ours, flower_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--objects-in-memory",
        action="store_true",
        help="keep message payloads in memory; the link state stays in --database",
    )
    parser.add_argument(
        "--status-cleanup-interval",
        type=float,
        default=0.0,
        help="run the expired-token cleanup of run-status checks at most this often (s)",
    )
    args = parser.parse_args(ours)
    try:
        if args.objects_in_memory:
            keep_objects_in_memory()
        if args.status_cleanup_interval > 0:
            StatusCleanupThrottle(args.status_cleanup_interval).install()
    except RuntimeError as error:
        parser.error(str(error))
    sys.argv = ["flower-superlink", *flower_args]
    flower_superlink()


if __name__ == "__main__":
    main()
