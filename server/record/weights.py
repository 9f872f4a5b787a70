"""The one check of an operator weight command, for the CLI, the dashboard and the server.

A leaf: the operator's side (:mod:`server.record.operations`) checks a weight
before queueing it, the round loop's control channel (:mod:`server.control`)
again before applying a queued one, and neither needs the other to do so.
"""

from __future__ import annotations

from server.record import lifecycle
from task.config_values import MAX_OPERATOR_WEIGHT, PARTITION_LIMIT


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
