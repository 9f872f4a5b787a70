"""One phase of a round on the Grid: push a message per node, pull and hand over the replies.

The coordinator's phases (the roll call's ``query``, ``train``, ``evaluate``)
and the asynchronous loop's trainings all go through :class:`PhaseRunner`:
replies are pulled with a short poll interval and handed over as they arrive,
in the order of the nodes asked (:mod:`server.reply_order`), until all are in
or ``round-timeout`` passes.

Replies come from untrusted nodes. Whatever goes wrong while reading,
validating, recording or folding ONE reply is caught where the reply is
handed over (:meth:`PhaseRunner.dispatch`), recorded as that reply's rejection
with the exception named, and counted against its node: the round and the run
go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.control import ControlChannel
from server.object_pull import pull_deadline
from server.record.store import RunStore
from server.reply_order import ReplyOrder
from strategies.replies import unreadable
from task.text import escape_unprintable

POLL_INTERVAL_S = 0.05

OnReplyFn = Callable[[int, Message], None]
"""Handles one reply of a round: ``(server_round, reply)``; may raise (the reply is rejected)."""
RejectFn = Callable[[int, int, str], None]
"""Records the rejection of a node's reply: ``(server_round, node_id, reason)``."""


@dataclass
class PhaseResult:
    """Replies gathered in one phase (train or evaluate) of a round."""

    sampled: int
    received: int = 0  # replies handed over; each is dropped once handled (streaming)
    failed: dict[int, str] = field(default_factory=dict)
    timed_out: list[int] = field(default_factory=list)
    most_held: int = 0  # most replies held at once to keep the fold order


def summarize_error(code: int, reason: str | None, limit: int = 300) -> str:
    """One readable line from an error reply: the ClientApp's own message if present.

    Ray wraps a ClientApp's exception in several layers of actor reprs; the
    useful part is the text after the last ``Message:``. No reason (None) reads
    as an empty one.
    """
    reason = reason or ""
    marker = "Message:"
    text = reason.rsplit(marker, 1)[1] if marker in reason else reason
    lines = [line.strip(" '>\n") for line in text.splitlines() if line.strip(" '>")]
    summary = lines[0] if marker in reason and lines else (lines[-1] if lines else reason)
    return escape_unprintable(f"error reply (code {code}): {summary}", limit=limit)


class PhaseRunner:
    """Pushes a phase's messages and hands over its replies, one reply a trust boundary.

    Parameters
    ----------
    grid : Grid
        Flower's Grid for this run.
    store : RunStore
        The run's store: node failures, unreadable pulls and progress go to it.
    control : ControlChannel
        Asked for a stop while waiting for replies.
    round_timeout : float
        Seconds a phase waits for its replies.
    reject : RejectFn
        Records a reply whose handling raised as that reply's rejection.
    """

    def __init__(
        self,
        grid: Grid,
        store: RunStore,
        control: ControlChannel,
        round_timeout: float,
        reject: RejectFn,
    ) -> None:
        self.grid = grid
        self.store = store
        self.control = control
        self.round_timeout = round_timeout
        self.reject = reject
        self._last_progress: tuple[str, int, int] = ("", 0, 0)
        self._last_pull_error = ""

    def run(
        self,
        server_round: int,
        message_type: str,
        node_ids: list[int],
        content: RecordDict,
        on_reply: OnReplyFn,
        timeout_s: float | None = None,
    ) -> PhaseResult:
        """Push one message per node, then pull and hand over replies until done.

        Replies are handed over in the order of ``node_ids`` (see
        :mod:`server.reply_order`), so that a round folds the same updates in
        the same order whatever order they arrive in. The phase ends at
        ``timeout_s`` (default: ``round-timeout``); a node whose reply did not
        come is recorded as a failure.
        """
        timeout_s = self.round_timeout if timeout_s is None else timeout_s
        messages = [Message(content, node_id, message_type) for node_id in node_ids]
        message_ids = list(self.grid.push_messages(messages))
        pending = {mid: nid for mid, nid in zip(message_ids, node_ids, strict=True) if mid}
        result = PhaseResult(sampled=len(node_ids))
        order: ReplyOrder[Message] = ReplyOrder(pending.values())
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            replies = self.pull(server_round, message_type, pending, deadline)
            for reply in replies:
                node_id = pending.pop(reply.metadata.reply_to_message_id, None)
                if node_id is None:
                    continue
                for due_node, due_reply in order.arrive(node_id, reply):
                    self.dispatch(server_round, due_node, due_reply, result, on_reply)
            self.report_progress(message_type, len(node_ids) - len(pending), len(node_ids))
            self.control.check_stop()
            if pending:
                time.sleep(POLL_INTERVAL_S)
        for due_node, due_reply in order.drain():
            self.dispatch(server_round, due_node, due_reply, result, on_reply)
        result.most_held = order.most_held
        result.timed_out = sorted(pending.values())
        for node_id in result.timed_out:
            limit = "round-timeout=" if timeout_s == self.round_timeout else ""
            reason = f"no {message_type} reply within {limit}{timeout_s}s"
            self.store.record_node_fault(node_id, server_round, "failure", reason)
        return result

    def pull(
        self, server_round: int, message_type: str, pending: dict[str, int], deadline: float
    ) -> list[Message]:
        """Pull the replies that are in; a pull that raises loses that poll, not the run.

        Flower's Grid builds every pulled reply before returning any, so one reply
        it cannot build fails the whole pull. Such a failure is logged and
        recorded once, the poll retried; the nodes whose replies stay unreadable
        close at ``round-timeout``, counted as failed.
        """
        try:
            with pull_deadline(deadline):
                return list(self.grid.pull_messages(list(pending)))
        except Exception as error:  # noqa: BLE001 - a node's reply must not end the run
            reason = f"{message_type} {unreadable(error)}"
            if self._last_pull_error != reason:
                self._last_pull_error = reason
                self.store.add_event("reply-unreadable", f"round {server_round}: {reason}")
                log(WARNING, "round %s: %s", server_round, reason)
            return []

    def dispatch(
        self,
        server_round: int,
        node_id: int,
        reply: Message,
        result: PhaseResult,
        on_reply: OnReplyFn,
    ) -> None:
        """Route a reply: error replies count as failures of the node they answer.

        The trust boundary of one reply: whatever ``on_reply`` raises becomes the
        rejection of that reply, recorded with its reason and counted against
        the node; the round goes on.
        """
        if reply.has_error():
            reason = summarize_error(reply.error.code, reply.error.reason)
            result.failed[node_id] = reason
            self.store.record_node_fault(node_id, server_round, "failure", reason)
            log(WARNING, "round %s: node %s failed: %s", server_round, node_id, reason)
            return
        result.received += 1
        try:
            on_reply(server_round, reply)
        except Exception as error:  # noqa: BLE001 - the trust boundary: one reply, never the run
            self.reject(server_round, node_id, f"{reply.metadata.message_type} {unreadable(error)}")

    def report_progress(self, phase: str, received: int, expected: int) -> None:
        """Record what the run waits for and how much of it is in (only when it changed)."""
        progress = (phase, received, expected)
        if progress != self._last_progress:
            self.store.set_progress(phase, received, expected)
            self._last_progress = progress
