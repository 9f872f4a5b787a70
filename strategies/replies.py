"""One training round's replies: validation, bookkeeping and metrics.

Shared by every strategy the coordinator drives (``FedCoordStrategy`` and
``FlowerStrategyAdapter``), so that a reply is accepted or rejected by the same
rules, with the same reasons, whichever strategy aggregates it.

A reply comes from an untrusted node: :func:`check_train_reply` and
:func:`check_evaluate_reply` never raise. Each known fault has a precise reason;
anything else that goes wrong while reading one reply rejects that reply with
the exception named ("reply could not be read: ..."), never the round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message

from strategies.records import NamedArrays, arrays_to_numpy, is_packed
from strategies.validation import (
    ArraySpec,
    find_array_names_problem,
    find_evaluate_problem,
    find_partition_id_problem,
    specs_from_arrays,
    validate_reply,
)
from task import keys
from task.text import escape_unprintable


@dataclass
class ReplyOutcome:
    """What happened to one reply: accepted, or rejected with a reason."""

    node_id: int
    accepted: bool
    reason: str = ""
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    partition_id: int | None = None


@dataclass
class RoundSummary:
    """Outcome of one aggregation round."""

    server_round: int
    accepted: int
    rejected: int
    updated: bool
    reason: str
    metrics: dict[str, float]


class RoundReplyTracker:
    """Remembers which nodes replied in one round, to reject a second reply.

    Check every reply, valid or not, before validating it: a node's first reply
    uses up its turn even if it is rejected.

    Parameters
    ----------
    server_round : int
        The round whose replies are tracked; start a new tracker each round.
    """

    def __init__(self, server_round: int) -> None:
        self.server_round = server_round
        self._replied: set[int] = set()

    @property
    def replied_nodes(self) -> frozenset[int]:
        """Node ids that have replied in this round."""
        return frozenset(self._replied)

    def check_duplicate(self, node_id: int) -> str | None:
        """Record a reply from ``node_id``; return a reason if it already replied."""
        if node_id in self._replied:
            return f"duplicate reply from node {node_id} in round {self.server_round}"
        self._replied.add(node_id)
        return None


# The info a node reports (its device) is shown to operators: keep it short.
MAX_INFO_ITEMS = 8
MAX_INFO_TEXT = 100
# An error reply's reason, as the node (or its ClientApp) wrote it.
MAX_ERROR_TEXT = 500


def node_text(value: object, limit: int) -> str:
    """A text a node sent, safe to store, log and print: one line, escaped, bounded."""
    return escape_unprintable(" ".join(str(value).split()), limit=limit)


def unreadable(error: BaseException) -> str:
    """The reason for a reply whose reading raised ``error`` (one line, bounded)."""
    text = escape_unprintable(" ".join(str(error).split()), limit=200)
    return f"reply could not be read: {type(error).__name__}: {text}"


def check_train_reply(
    reply: Message,
    specs: Mapping[str, ArraySpec],
    tracker: RoundReplyTracker,
    *,
    check_finite: bool = True,
    roll_call: Mapping[int, int | None] | None = None,
) -> tuple[ReplyOutcome, NamedArrays | None]:
    """Validate one training reply against the global model's ``specs``; never raise.

    Returns the outcome and, for an accepted reply, its arrays as read-only
    views (None when rejected). Error replies, a node's second reply in the
    round, malformed arrays (:func:`strategies.records.arrays_to_numpy`) and
    everything ``validate_reply`` checks are rejected with a reason; so is a
    reply whose reading raises anything else. With ``check_finite=False`` the
    caller checks the values for NaN and infinities (see ``validate_reply``).
    ``roll_call`` maps node ids to the partition each gave at the roll call
    (None: no partition recorded, such as a node with its own data or one
    without a valid answer; a node missing from it has none recorded either).
    A node's identity is what the server recorded, never what a reply says: a
    reply that claims another partition than the record, or any partition
    when none is recorded, is rejected (operator weights go by partition); one
    that names none is taken as the record's, and the accepted outcome carries
    the recorded partition. Without ``roll_call`` (no coordinator, e.g. a
    strategy used on its own) the reply's own valid ``partition-id`` is taken.
    """
    node_id = reply.metadata.src_node_id
    try:
        if reply.has_error():
            error = reply.error
            return ReplyOutcome(
                node_id,
                False,
                f"error reply: {error.code} {node_text(error.reason, MAX_ERROR_TEXT)}",
            ), None
        duplicate = tracker.check_duplicate(node_id)
        if duplicate is not None:
            return ReplyOutcome(node_id, False, duplicate), None
        return _read_train_reply(reply, specs, check_finite, roll_call)
    except Exception as error:  # noqa: BLE001 - the trust boundary: one reply, never the run
        return ReplyOutcome(node_id, False, unreadable(error)), None


def _read_info(reply: Message) -> dict[str, str]:
    record = reply.content.config_records.get(keys.INFO)
    items = list(record.items())[:MAX_INFO_ITEMS] if record else []
    return {node_text(k, MAX_INFO_TEXT): node_text(v, MAX_INFO_TEXT) for k, v in items}


def _find_identity_problem(
    metrics: Mapping[str, object] | None, claimed: int | None, recorded: int | None
) -> str | None:
    """Why a reply's ``partition-id`` contradicts the roll call's record, or None.

    An invalid claim is left to ``validate_reply``, which names its fault; -1 (own
    data, no partition) and no claim agree with a node that has none recorded.
    """
    if metrics is None or metrics.get(keys.PARTITION_ID) is None or claimed is None:
        return None
    if recorded is None and claimed >= 0:
        return (
            f"partition-id {claimed} claimed, but this node gave no partition at the roll "
            "call (it is weighed and sampled as a node without one)"
        )
    if recorded is not None and claimed != recorded:
        return (
            f"partition-id {claimed} differs from partition {recorded} this node gave at the "
            "roll call"
        )
    return None


def _read_partition_id(metrics: Mapping[str, object] | None) -> int | None:
    """The reply's partition id if it is valid (even when the rest of the reply is not)."""
    value = (metrics or {}).get(keys.PARTITION_ID)
    return int(value) if value is not None and find_partition_id_problem(value) is None else None  # type: ignore[call-overload]


def _read_train_reply(
    reply: Message,
    specs: Mapping[str, ArraySpec],
    check_finite: bool,
    roll_call: Mapping[int, int | None] | None,
) -> tuple[ReplyOutcome, NamedArrays | None]:
    node_id = reply.metadata.src_node_id
    content = reply.content
    metrics_record = content.metric_records.get(keys.METRICS)
    array_record = content.array_records.get(keys.ARRAYS)
    metrics = dict(metrics_record) if metrics_record is not None else None
    num_examples = metrics.get(keys.NUM_EXAMPLES) if metrics else None
    info = _read_info(reply)
    partition = _read_partition_id(metrics)
    rejected = ReplyOutcome(node_id, False, info=info, partition_id=partition)
    if roll_call is not None:
        recorded = roll_call.get(node_id)
        rejected.partition_id = recorded
        problem = _find_identity_problem(metrics, partition, recorded)
        if problem is not None:
            rejected.reason = problem
            return rejected, None
        invalid_claim = metrics is not None and metrics.get(keys.PARTITION_ID) is not None
        invalid_claim = invalid_claim and partition is None  # validate_reply names it
        partition = recorded
        if metrics is not None and not invalid_claim:  # weights read the record, not the reply
            metrics.pop(keys.PARTITION_ID, None)
            if recorded is not None:
                metrics[keys.PARTITION_ID] = recorded
    if array_record is not None and not is_packed(array_record):
        # Named arrays: their names are checked before any of them is read
        rejected.reason = find_array_names_problem(array_record, specs) or ""  # type: ignore[arg-type]
        if rejected.reason:
            return rejected, None
    try:
        arrays = arrays_to_numpy(array_record) if array_record is not None else None
    except ValueError as error:  # MalformedRecordError: a bad Array or packed layout
        rejected.reason = f"malformed arrays: {error}"
        return rejected, None
    reason = validate_reply(arrays, num_examples, metrics, specs, check_finite=check_finite)
    if reason is not None:
        rejected.reason = reason
        return rejected, None
    float_metrics = {k: float(v) for k, v in (metrics or {}).items()}  # type: ignore[arg-type]
    examples = int(num_examples)  # type: ignore[arg-type]
    return ReplyOutcome(node_id, True, "", examples, float_metrics, info, partition), arrays


def check_evaluate_reply(reply: Message) -> ReplyOutcome:
    """Validate one evaluate reply; never raise.

    Accepted: ``num-examples`` an integer >= 0, ``eval-loss`` finite and >= 0,
    ``eval-accuracy`` in [0, 1], ``partition-id`` (if sent) in [-1, 2^31), every
    other metric a finite number (:func:`strategies.validation.find_evaluate_problem`).
    The reasons start with ``evaluate reply``.
    """
    node_id = reply.metadata.src_node_id
    try:
        record = reply.content.metric_records.get(keys.METRICS)
        metrics = dict(record) if record is not None else None
        partition = _read_partition_id(metrics)
        problem = find_evaluate_problem(metrics)
        if problem is not None:
            reason = (
                problem if problem.startswith("evaluate reply") else f"evaluate reply: {problem}"
            )
            return ReplyOutcome(node_id, False, reason, partition_id=partition)
        values = {k: float(v) for k, v in (metrics or {}).items()}  # type: ignore[arg-type]
        examples = int(values[keys.NUM_EXAMPLES])
        return ReplyOutcome(node_id, True, "", examples, values, partition_id=partition)
    except Exception as error:  # noqa: BLE001 - the trust boundary: one reply, never the run
        return ReplyOutcome(node_id, False, f"evaluate {unreadable(error)}")


class TrainRound:
    """The replies of one training round, checked against the global model.

    Parameters
    ----------
    server_round : int
        The round these replies belong to.
    global_arrays : Mapping[str, np.ndarray]
        The global model sent to the clients; replies must match its names,
        shapes and dtypes.
    roll_call : Mapping[int, int | None] or None
        Node id -> the partition it gave at the roll call (see
        :func:`check_train_reply`); None: no roll call, replies' own claims count.
    """

    def __init__(
        self,
        server_round: int,
        global_arrays: Mapping[str, np.ndarray],
        roll_call: Mapping[int, int | None] | None = None,
    ) -> None:
        self.server_round = server_round
        self.roll_call = roll_call
        self.global_arrays: NamedArrays = dict(global_arrays)
        self.specs = specs_from_arrays(self.global_arrays)
        self.outcomes: list[ReplyOutcome] = []
        self._tracker = RoundReplyTracker(server_round)

    def check(
        self, reply: Message, *, check_finite: bool = True
    ) -> tuple[ReplyOutcome, NamedArrays | None]:
        """Validate and record one reply (see :func:`check_train_reply`)."""
        outcome, arrays = check_train_reply(
            reply,
            self.specs,
            self._tracker,
            check_finite=check_finite,
            roll_call=self.roll_call,
        )
        self.outcomes.append(outcome)
        return outcome, arrays

    def reject(self, outcome: ReplyOutcome, reason: str) -> ReplyOutcome:
        """Turn an accepted reply that could not be folded in into a rejected one."""
        outcome.accepted, outcome.reason, outcome.num_examples = False, reason, 0
        return outcome

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


def compute_weighted_mean(values: list[float], weights: list[float]) -> float:
    """Mean of ``values`` weighted by ``weights`` (finite, >= 0, not all 0).

    The weights are normalised first, so huge values or counts never overflow:
    the result is a convex combination, clamped to [min, max] of the values
    against rounding.
    """
    total = math.fsum(weights)
    mean = math.fsum(
        value * (weight / total) for value, weight in zip(values, weights, strict=True)
    )
    return min(max(mean, min(values)), max(values))


def _weighted_metrics(metrics: list[Mapping[str, float]], counts: list[int]) -> dict[str, float]:
    """Example-weighted mean of every metric all replies share, plus the total count."""
    usable = [(m, n) for m, n in zip(metrics, counts, strict=True) if n > 0]
    if not usable:
        return {}
    names = set.intersection(*(set(m) for m, _ in usable)) - {keys.NUM_EXAMPLES, keys.PARTITION_ID}
    weights = [float(n) for _, n in usable]
    result = {
        name: compute_weighted_mean([float(m[name]) for m, _ in usable], weights) for name in names
    }
    result[keys.NUM_EXAMPLES] = float(sum(n for _, n in usable))
    return result


def aggregate_train_metrics(outcomes: list[ReplyOutcome]) -> dict[str, float]:
    """Example-weighted mean of accepted replies' numeric metrics, plus totals."""
    return _weighted_metrics([o.metrics for o in outcomes], [o.num_examples for o in outcomes])


def aggregate_evaluate_metrics(metrics: list[Mapping[str, float]]) -> dict[str, float]:
    """Example-weighted mean of evaluation metrics (pass accepted replies only)."""
    counts = [int(m.get(keys.NUM_EXAMPLES, 0)) for m in metrics]
    return _weighted_metrics(metrics, counts)
