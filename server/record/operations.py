"""Operator actions on a run, shared by the CLI and the dashboard.

Each checks the request against the run's effective state (the same pure state
machine the server uses) before queueing a command in the run store, so an
invalid request changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from server.record import lifecycle
from server.record.runs import run_status
from server.record.store import RunStore
from task.config_values import MAX_OPERATOR_WEIGHT, PARTITION_LIMIT

WHEN = {
    "pause": "after the round in flight is aggregated and checkpointed",
    "resume": "within a second",
    "stop": "within a second; the round in flight is abandoned",
}


def request_command(run_dir: Path, command: str) -> str:
    """Queue ``pause`` / ``resume`` / ``stop``; return a sentence saying what happens.

    Raises
    ------
    lifecycle.InvalidTransitionError
        If the command is unknown or the run's state does not allow it.
    """
    status = run_status(run_dir)
    target = lifecycle.validate_command(str(status["state"]), command)
    store = RunStore(run_dir)
    try:
        store.add_command(command)
    finally:
        store.close()
    return f"{command} queued for {status['run_name']}: it becomes {target} {WHEN[command]}"


def find_weight_problem(partition: object, weight: object) -> str | None:
    """Return why an operator weight command is refused, or None if it is acceptable.

    The one check of a weight command: ``fedcoord weight`` and the dashboard
    use it before queueing, the server again before applying a queued one.
    ``partition`` must be an integer in [0, 2^31); ``weight`` a number, finite,
    in [0, 1e6] (bools are neither).
    """
    if isinstance(partition, bool) or not isinstance(partition, int):
        return f"partition must be an integer, got {type(partition).__name__}"
    if not 0 <= partition < PARTITION_LIMIT:
        return f"partition must be in [0, 2^31), got {partition}"
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return f"weight must be a number, got {type(weight).__name__}"
    if not 0 <= weight <= MAX_OPERATOR_WEIGHT:  # False for NaN; no float() of a huge int
        return f"weight must be finite and >= 0 and at most {MAX_OPERATOR_WEIGHT:g}, got {weight}"
    return None


def validate_weight(partition: object, weight: object) -> tuple[int, float]:
    """``(partition, weight)`` as ``(int, float)`` if :func:`find_weight_problem` accepts them.

    Raises
    ------
    lifecycle.InvalidTransitionError
        With the reason, if the command is refused.
    """
    problem = find_weight_problem(partition, weight)
    if problem is not None:
        raise lifecycle.InvalidTransitionError(problem)
    return int(partition), float(weight)  # type: ignore[call-overload, arg-type]


def request_weight(run_dir: Path, partition: int, weight: float) -> str:
    """Queue an operator weight for ``partition``, applied from the next round.

    Raises
    ------
    lifecycle.InvalidTransitionError
        If :func:`find_weight_problem` refuses the command, or the run is not
        running or paused.
    """
    partition, weight = validate_weight(partition, weight)
    state = str(run_status(run_dir)["state"])
    if state not in (lifecycle.RUNNING, lifecycle.PAUSED):
        raise lifecycle.InvalidTransitionError(f"cannot set a weight on a run that is {state}")
    store = RunStore(run_dir)
    try:
        store.add_command("weight", f"{partition}={weight}")
    finally:
        store.close()
    return f"partition {partition} weight {weight} queued; it applies from the next round"
