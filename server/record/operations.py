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
from server.record.weights import validate_weight

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


def request_weight(run_dir: Path, partition: int, weight: float) -> str:
    """Queue an operator weight for ``partition``, applied from the next round.

    Raises
    ------
    lifecycle.InvalidTransitionError
        If :func:`server.record.weights.find_weight_problem` refuses the command, or the run is not
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
