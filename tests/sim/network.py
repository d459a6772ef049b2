"""A simulated network between pool members: delay, loss, duplication, partitions.

Every message is encoded with the real codec when sent and decoded when
delivered, as the AMP transport will, so the simulation also exercises the
wire format and nodes never share message objects.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable

from zope.interface import implementer

from licensing.interfaces import IPeerNetwork
from licensing.pool.codec import decode, encode

from .clock import SimClock


@implementer(IPeerNetwork)
class _Endpoint:
    """One member's handle on the network."""

    def __init__(self, network: SimNetwork, name: str) -> None:
        self._network = network
        self._name = name

    def send(self, to: str, message: object) -> None:
        self._network.send(self._name, to, message)


class SimNetwork:
    """Delivers messages after a random delay from the seeded ``rng``, or not at all.

    ``blocked`` holds (source, destination) pairs that cannot talk: a
    two-way partition blocks both directions, a one-way one a single
    direction. A message is dropped if its link is blocked when it is sent or
    when it would arrive. Reordering follows from independent delays.
    """

    def __init__(self, clock: SimClock, rng: random.Random) -> None:
        self._clock = clock
        self._rng = rng
        self.loss = 0.0
        self.duplicate = 0.0
        self.delay = (0.001, 0.02)
        self.blocked: set[tuple[str, str]] = set()
        self._receivers: dict[str, Callable[[str, object], None]] = {}
        # Called after every delivery, so invariants are checked at every event.
        self.after_delivery: Callable[[], None] = lambda: None
        self.sent: Counter[str] = Counter()
        self.delivered = 0

    def endpoint(self, name: str) -> IPeerNetwork:
        """The IPeerNetwork that member ``name`` sends through."""
        return _Endpoint(self, name)

    def attach(self, name: str, receive: Callable[[str, object], None]) -> None:
        """Deliver messages for ``name`` to ``receive`` (a node's receive method)."""
        self._receivers[name] = receive

    def detach(self, name: str) -> None:
        """``name`` is down: messages to it vanish."""
        self._receivers.pop(name, None)

    def send(self, source: str, destination: str, message: object) -> None:
        data = encode(message)  # type: ignore[arg-type]
        self.sent[type(message).__name__] += 1
        if (source, destination) in self.blocked or self._rng.random() < self.loss:
            return
        copies = 2 if self._rng.random() < self.duplicate else 1
        for _ in range(copies):
            delay = self._rng.uniform(*self.delay)
            self._clock.callLater(delay, self._deliver, source, destination, data)

    def _deliver(self, source: str, destination: str, data: bytes) -> None:
        receive = self._receivers.get(destination)
        if receive is None or (source, destination) in self.blocked:
            return
        self.delivered += 1
        receive(source, decode(data))
        self.after_delivery()

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between members of different groups, both ways."""
        sets = [set(group) for group in groups]
        for group in sets:
            for other in sets:
                if other is not group:
                    self.blocked |= {(a, b) for a in group for b in other}

    def block(self, source: str, destination: str) -> None:
        """Cut one direction of one link."""
        self.blocked.add((source, destination))

    def heal(self) -> None:
        """Restore every link."""
        self.blocked.clear()
