"""Keep Raft's promises behind the store writes that make them true.

A vote, an acknowledgement of log entries or a candidacy must not leave the
process before the term, vote or entries it stands for are durable; the store
fires each write's Deferred once it is (at once for the memory store, later
for SQLite). ``DurableWrites`` numbers the writes as they are issued and runs
a waiting action once every write issued before it has fired, whatever order
the Deferreds fire in. Writes are issued synchronously in the order Raft
makes its decisions, and the store applies them in call order, so nothing is
ever reordered on disk either.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class DurableWrites:
    """Ordered store writes and the actions waiting for them."""

    def __init__(self, on_failure: Callable[[Failure], None]) -> None:
        """``on_failure`` is told about a write that failed; nothing after it runs."""
        self._on_failure = on_failure
        self._issued = 0
        self._durable = 0
        self._fired: set[int] = set()
        self._waiting: deque[tuple[int, Callable[[], None]]] = deque()
        self._failed = False

    @property
    def idle(self) -> bool:
        """True when every issued write is durable."""
        return self._durable == self._issued

    def issue(self, write: Deferred[None]) -> None:
        """Track a write the caller just started."""
        self._issued += 1
        write.addCallbacks(self._write_fired, self._write_failed, callbackArgs=(self._issued,))

    def after(self, action: Callable[[], None]) -> None:
        """Run ``action`` once every write issued so far is durable (now, if it is)."""
        if self._failed:
            return
        if self.idle and not self._waiting:
            action()
        else:
            self._waiting.append((self._issued, action))

    def _write_fired(self, _: object, number: int) -> None:
        self._fired.add(number)
        while self._durable + 1 in self._fired:
            self._durable += 1
            self._fired.discard(self._durable)
        while self._waiting and self._waiting[0][0] <= self._durable and not self._failed:
            _, action = self._waiting.popleft()
            action()

    def _write_failed(self, failure: Failure) -> None:
        self._failed = True
        self._waiting.clear()
        self._on_failure(failure)
