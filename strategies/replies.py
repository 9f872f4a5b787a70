"""One training round's replies: validation, bookkeeping and metrics.

Shared by every strategy the coordinator drives (``FedCoordStrategy`` and
``FlowerStrategyAdapter``), so that a reply is accepted or rejected by the same
rules, with the same reasons, whichever strategy aggregates it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

from strategies.records import NamedArrays, arrays_to_numpy
from strategies.validation import (
    ArraySpec,
    RoundReplyTracker,
    specs_from_arrays,
    validate_reply,
)
from task import keys


@dataclass
class ReplyOutcome:
    """What happened to one reply: accepted, or rejected with a reason."""

    node_id: int
    accepted: bool
    reason: str = ""
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)


@dataclass
class RoundSummary:
    """Outcome of one aggregation round."""

    server_round: int
    accepted: int
    rejected: int
    updated: bool
    reason: str
    metrics: dict[str, float]


def check_train_reply(
    reply: Message, specs: Mapping[str, ArraySpec], tracker: RoundReplyTracker
) -> tuple[ReplyOutcome, NamedArrays | None]:
    """Validate one training reply against the global model's ``specs``.

    Returns the outcome and, for an accepted reply, its arrays as read-only
    views (None when rejected). Error replies, a node's second reply in the
    round, and everything ``validate_reply`` checks are rejected with a reason.
    """
    node_id = reply.metadata.src_node_id
    if reply.has_error():
        error = reply.error
        return ReplyOutcome(node_id, False, f"error reply: {error.code} {error.reason}"), None
    duplicate = tracker.check_duplicate(node_id)
    if duplicate is not None:
        return ReplyOutcome(node_id, False, duplicate), None
    content = reply.content
    metrics_record = content.metric_records.get(keys.METRICS)
    array_record = content.array_records.get(keys.ARRAYS)
    metrics = dict(metrics_record) if metrics_record is not None else None
    num_examples = metrics.get(keys.NUM_EXAMPLES) if metrics else None
    info_record = content.config_records.get(keys.INFO)
    info = {k: str(v) for k, v in info_record.items()} if info_record else {}
    try:
        arrays = arrays_to_numpy(array_record) if array_record is not None else None
    except ValueError as error:  # MalformedRecordError, or an Array whose bytes are not .npy
        return ReplyOutcome(node_id, False, f"malformed arrays: {error}", info=info), None
    reason = validate_reply(arrays, num_examples, metrics, specs)
    if reason is not None:
        return ReplyOutcome(node_id, False, reason, info=info), None
    float_metrics = {k: float(v) for k, v in (metrics or {}).items()}  # type: ignore[arg-type]
    examples = int(num_examples)  # type: ignore[arg-type]
    return ReplyOutcome(node_id, True, "", examples, float_metrics, info), arrays


class TrainRound:
    """The replies of one training round, checked against the global model.

    Parameters
    ----------
    server_round : int
        The round these replies belong to.
    global_arrays : Mapping[str, np.ndarray]
        The global model sent to the clients; replies must match its names,
        shapes and dtypes.
    """

    def __init__(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        self.server_round = server_round
        self.global_arrays: NamedArrays = dict(global_arrays)
        self.specs = specs_from_arrays(self.global_arrays)
        self.outcomes: list[ReplyOutcome] = []
        self._tracker = RoundReplyTracker(server_round)

    def check(self, reply: Message) -> tuple[ReplyOutcome, NamedArrays | None]:
        """Validate and record one reply (see :func:`check_train_reply`)."""
        outcome, arrays = check_train_reply(reply, self.specs, self._tracker)
        self.outcomes.append(outcome)
        return outcome, arrays

    @property
    def accepted(self) -> list[ReplyOutcome]:
        """Outcomes of the accepted replies, in arrival order."""
        return [o for o in self.outcomes if o.accepted]

    def shortfall(self, min_train_nodes: int) -> str | None:
        """Return why the global model is kept if fewer than ``min_train_nodes`` were accepted."""
        count = len(self.accepted)
        if count >= min_train_nodes:
            return None
        return (
            f"only {count} accepted update(s), fewer than "
            f"min-train-nodes={min_train_nodes}: global model kept"
        )

    def summary(self, updated: bool, reason: str = "") -> RoundSummary:
        """The round's summary, with the example-weighted train metrics."""
        accepted = self.accepted
        rejected = len(self.outcomes) - len(accepted)
        metrics = aggregate_train_metrics(accepted)
        return RoundSummary(self.server_round, len(accepted), rejected, updated, reason, metrics)


def aggregate_train_metrics(outcomes: list[ReplyOutcome]) -> dict[str, float]:
    """Example-weighted mean of accepted replies' numeric metrics, plus totals."""
    total = sum(o.num_examples for o in outcomes)
    if not outcomes or total <= 0:
        return {}
    names = set.intersection(*(set(o.metrics) for o in outcomes))
    names -= {keys.NUM_EXAMPLES, keys.PARTITION_ID}
    result = {
        name: sum(o.metrics[name] * o.num_examples for o in outcomes) / total for name in names
    }
    result[keys.NUM_EXAMPLES] = float(total)
    return result


def aggregate_evaluate_metrics(metrics: list[Mapping[str, float]]) -> dict[str, float]:
    """Example-weighted mean of evaluation metrics."""
    usable = [m for m in metrics if m.get(keys.NUM_EXAMPLES, 0) > 0]
    total = sum(m[keys.NUM_EXAMPLES] for m in usable)
    if not usable:
        return {}
    names = set.intersection(*(set(m) for m in usable)) - {keys.NUM_EXAMPLES, keys.PARTITION_ID}
    result = {name: sum(m[name] * m[keys.NUM_EXAMPLES] for m in usable) / total for name in names}
    result[keys.NUM_EXAMPLES] = float(total)
    return result
