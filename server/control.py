"""Operator commands, as the running server sees them.

The CLI queues commands in the run store after checking them against the run's
state; the coordinator asks this channel at safe points:

- while waiting for replies, only ``stop`` is acted on (within a poll interval);
- between rounds, every command is: ``pause`` holds the loop here (the round in
  flight has already finished and been checkpointed) until ``resume`` or
  ``stop``; ``weight`` changes an operator weight from the next round on.

A queued command is checked again when applied (the queue is a file anyone
with access to the run directory can write): one that fails then is marked
consumed, recorded as a ``refused`` event with the reason, and never retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.common.logger import log

from server.record import lifecycle
from server.record.schema import int_value
from server.record.store import RunStore
from server.record.weights import validate_weight

PAUSE_POLL_S = 0.25
STOP_POLL_S = 0.25


class StopRequestedError(Exception):
    """An operator asked the run to stop; the round in flight is abandoned."""


def parse_weight_argument(argument: str) -> tuple[int, float]:
    """``"PARTITION=WEIGHT"`` -> ``(partition, weight)``, checked as at enqueue.

    Raises
    ------
    lifecycle.InvalidTransitionError
        If the argument is malformed or the weight command is refused
        (:func:`server.record.weights.find_weight_problem`).
    """
    partition, separator, weight = argument.partition("=")
    try:
        if not separator or len(argument) > 100:
            raise ValueError
        return validate_weight(int(partition), float(weight))
    except ValueError as error:
        if isinstance(error, lifecycle.InvalidTransitionError):
            raise
        raise lifecycle.InvalidTransitionError(
            f"weight argument {argument[:100]!r} is not PARTITION=WEIGHT"
        ) from None


class ControlChannel:
    """Reads queued commands and moves the run's state accordingly.

    Parameters
    ----------
    store : RunStore
        The run store the CLI writes commands to.
    on_weight : Callable[[int, float], None]
        Called with ``(partition_id, weight)`` for each ``weight`` command.
    """

    def __init__(self, store: RunStore, on_weight: Callable[[int, float], None]) -> None:
        self.store = store
        self.on_weight = on_weight
        self.state = lifecycle.RUNNING
        self._last_stop_check = 0.0

    def check_stop(self) -> None:
        """Raise :class:`StopRequestedError` if a stop is queued (rate-limited)."""
        now = time.monotonic()
        if now - self._last_stop_check < STOP_POLL_S:
            return
        self._last_stop_check = now
        for command in self.store.pending_commands():
            if command["command"] == "stop":
                self._consume_stop(command)

    def between_rounds(self) -> None:
        """Apply queued commands; block while paused; raise on stop."""
        while True:
            self.apply_pending()
            if self.state != lifecycle.PAUSED:
                return
            time.sleep(PAUSE_POLL_S)

    def apply_pending(self) -> None:
        """Apply queued commands without blocking (async mode: while trainings are in flight).

        Raises
        ------
        StopRequestedError
            If a stop is queued.
        """
        for command in self.store.pending_commands():
            self._apply(command)

    def _apply(self, command: dict[str, object]) -> None:
        name, command_id = str(command["command"]), int_value(command, "id")
        if name == "stop":
            self._consume_stop(command)
        try:
            if name == "weight":
                self._apply_weight(str(command["argument"]))
            elif name in ("pause", "resume"):
                self._transition(name)
        except Exception as error:  # noqa: BLE001 - a queued command must not end the run
            self._refuse(command_id, f"{name} {str(command['argument'])[:100]!r}", error)
            return
        self.store.consume_command(command_id)

    def _apply_weight(self, argument: str) -> None:
        partition, weight = parse_weight_argument(argument)
        self.on_weight(partition, weight)
        self.store.set_partition_weight(partition, weight)
        self.store.add_event("weight", f"partition {partition} weight {weight}")

    def _refuse(self, command_id: int, command: str, error: Exception) -> None:
        """Consume a command that failed when applied; record why, never retry it."""
        self.store.consume_command(command_id)
        reason = f"command {command} refused: {error}"
        self.store.add_event("refused", reason)
        log(WARNING, "%s", reason)

    def _transition(self, name: str) -> None:
        try:
            self.state = lifecycle.next_state(self.state, name)
        except lifecycle.InvalidTransitionError as error:
            self.store.add_event("ignored", str(error))
            return
        self.store.update_run(state=self.state, phase=self.state)
        self.store.add_event(self.state, f"{name} applied")
        log(INFO, "run %s", self.state)

    def _consume_stop(self, command: dict[str, object]) -> None:
        self.store.consume_command(int_value(command, "id"))
        self.state = lifecycle.next_state(self.state, "stop")
        self.store.update_run(state=self.state, phase="stopping")
        raise StopRequestedError("stop requested by the operator")
