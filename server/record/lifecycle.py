"""The run's state machine, as pure functions (no I/O, no Flower).

States (SPEC "Lifecycle"): ``running``, ``paused``, ``stopping``, ``stopped``,
``completed``, ``failed``. ``interrupted`` is not stored: readers report it for a
non-final state whose heartbeat is stale.

Operators send commands (``pause``, ``resume``, ``stop``); the coordinator
moves the run on events (``round-done``, ``all-rounds-done``, ``error``,
``stopped``) and a restart with ``resume=true`` is the ``restart`` event.
"""

from __future__ import annotations

RUNNING = "running"
PAUSED = "paused"
STOPPING = "stopping"
STOPPED = "stopped"
COMPLETED = "completed"
FAILED = "failed"
INTERRUPTED = "interrupted"

STATES: tuple[str, ...] = (RUNNING, PAUSED, STOPPING, STOPPED, COMPLETED, FAILED)
FINAL_STATES: tuple[str, ...] = (STOPPED, COMPLETED, FAILED)
COMMANDS: tuple[str, ...] = ("pause", "resume", "stop")

# (state, command or event) -> next state
TRANSITIONS: dict[tuple[str, str], str] = {
    (RUNNING, "pause"): PAUSED,
    (PAUSED, "resume"): RUNNING,
    (RUNNING, "stop"): STOPPING,
    (PAUSED, "stop"): STOPPING,
    (STOPPING, "stopped"): STOPPED,
    (RUNNING, "all-rounds-done"): COMPLETED,
    (RUNNING, "error"): FAILED,
    (PAUSED, "error"): FAILED,
    (STOPPING, "error"): FAILED,
    (RUNNING, "stopped"): STOPPED,
    (PAUSED, "stopped"): STOPPED,
    (STOPPED, "restart"): RUNNING,
    (FAILED, "restart"): RUNNING,
    (INTERRUPTED, "restart"): RUNNING,
    (COMPLETED, "restart"): RUNNING,
}


class InvalidTransitionError(ValueError):
    """A command or event that the run's current state does not allow."""


def next_state(state: str, action: str) -> str:
    """Return the state after ``action`` (a command or event) in ``state``.

    Raises
    ------
    InvalidTransitionError
        If ``action`` is not allowed in ``state``; the message says why and
        what is allowed instead.
    """
    if (state, action) in TRANSITIONS:
        return TRANSITIONS[(state, action)]
    allowed = sorted(a for (s, a) in TRANSITIONS if s == state and a in COMMANDS)
    hint = f"allowed now: {', '.join(allowed)}" if allowed else "no command applies"
    if state in FINAL_STATES or state == INTERRUPTED:
        hint += "; restart it with --run-config \"run-name='NAME' resume=true\""
    raise InvalidTransitionError(f"cannot {action} a run that is {state} ({hint})")


def validate_command(effective_state: str, command: str) -> str:
    """Check an operator command against the run's effective state; return the target.

    ``effective_state`` may be ``interrupted`` (stale heartbeat): no command
    applies to a server that is gone.

    Raises
    ------
    InvalidTransitionError
        If the command is unknown or not allowed now.
    """
    if command not in COMMANDS:
        raise InvalidTransitionError(f"unknown command {command!r}; valid: {', '.join(COMMANDS)}")
    return next_state(effective_state, command)
