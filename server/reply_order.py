"""Hand replies over in a fixed node order, whatever order they arrive in.

Float addition is not associative, so a global model folded from the same
updates in another order differs in its last bits, and every later round
inherits the difference. The coordinator therefore folds a round's replies in
the order of its sample (nodes by partition id): a reply that arrives before an
earlier node's is held until that one is in, and at the deadline the held ones
are handed over, still in order, without the missing ones.

Memory: a held reply is a Message the coordinator would otherwise have dropped
after folding it. In the common case (replies arrive roughly in order, or the
slow node is late in the order) few are held; at worst, when the first node in
the order is the last to reply, every other reply of the round is held until it
comes, which is what Flower's ``Strategy.start`` keeps for every round.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

Reply = TypeVar("Reply")


class ReplyOrder(Generic[Reply]):
    """Release replies in ``node_order``, holding those that come early.

    Parameters
    ----------
    node_order : Iterable[int]
        The nodes asked, in the order their replies are to be handed over.
    """

    def __init__(self, node_order: Iterable[int]) -> None:
        self._order = list(node_order)
        self._positions = {node_id: index for index, node_id in enumerate(self._order)}
        self._next = 0
        self._held: dict[int, Reply] = {}
        self.most_held = 0

    @property
    def held(self) -> int:
        """Number of replies waiting for an earlier node's."""
        return len(self._held)

    def arrive(self, node_id: int, reply: Reply) -> list[tuple[int, Reply]]:
        """Take ``node_id``'s reply; return the replies now due, in order.

        A node not in the order, or one whose reply was already taken, is handed
        over at once (the caller records it as it would any reply).
        """
        position = self._positions.get(node_id)
        if position is None or position < self._next or node_id in self._held:
            return [(node_id, reply)]
        self._held[node_id] = reply
        due = self._release_prefix()
        self.most_held = max(self.most_held, len(self._held))
        return due

    def drain(self) -> list[tuple[int, Reply]]:
        """Return every held reply in order; the nodes that never replied are passed over."""
        due = [(node, self._held.pop(node)) for node in self._order if node in self._held]
        self._next = len(self._order)
        return due

    def _release_prefix(self) -> list[tuple[int, Reply]]:
        due = []
        while self._next < len(self._order) and self._order[self._next] in self._held:
            node_id = self._order[self._next]
            due.append((node_id, self._held.pop(node_id)))
            self._next += 1
        return due
