"""A store whose writes become durable later, as SQLite's do, and can be lost in a crash."""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from licensing.interfaces import ILicenseStore
from licensing.records import InstalledLicense, Lease, LogEntry, Snapshot, StoredState
from licensing.store.memory import MemoryStore


@implementer(ILicenseStore)
class GroupCommitStore:
    """Queues writes for a random while, then applies them in order to a MemoryStore.

    Like a group-committing SQLite backend: each write's Deferred fires only
    once the write reached ``durable`` (the MemoryStore that outlives
    crashes), writes are applied in call order, and ``crash`` throws away
    whatever was still queued, without firing it.
    """

    durable = False

    def __init__(self, durable: MemoryStore, clock: IReactorTime, rng: random.Random,
                 latency: tuple[float, float]) -> None:
        self.durable_store = durable
        self._clock = clock
        self._rng = rng
        self._latency = latency
        self._queue: list[tuple[Callable[[], Deferred[None]], Deferred[None]]] = []
        self._commit: IDelayedCall | None = None

    def crash(self) -> None:
        """The process died: queued writes are lost."""
        self._queue = []
        if self._commit is not None and self._commit.active():
            self._commit.cancel()
        self._commit = None

    def _enqueue(self, write: Callable[[], Deferred[None]]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self._queue.append((write, done))
        if self._commit is None:
            self._commit = self._clock.callLater(self._rng.uniform(*self._latency), self._flush)
        return done

    def _flush(self) -> None:
        self._commit = None
        queue, self._queue = self._queue, []
        for write, _ in queue:
            write()
        for _, done in queue:
            done.callback(None)

    def load(self) -> Deferred[StoredState]:
        return self.durable_store.load()

    def save_term(self, term: int, voted_for: str | None) -> Deferred[None]:
        return self._enqueue(lambda: self.durable_store.save_term(term, voted_for))

    def append_entries(self, entries: list[LogEntry]) -> Deferred[None]:
        entries = list(entries)
        return self._enqueue(lambda: self.durable_store.append_entries(entries))

    def truncate_log(self, from_index: int) -> Deferred[None]:
        return self._enqueue(lambda: self.durable_store.truncate_log(from_index))

    def save_snapshot(self, snapshot: Snapshot) -> Deferred[None]:
        return self._enqueue(lambda: self.durable_store.save_snapshot(snapshot))

    def save_license(self, license: InstalledLicense) -> Deferred[None]:
        return self._enqueue(lambda: self.durable_store.save_license(license))

    def put_leases(self, leases: list[Lease]) -> Deferred[None]:
        return self._enqueue(lambda: self.durable_store.put_leases(leases))

    def remove_leases(self, lease_ids: list[str]) -> Deferred[None]:
        return self._enqueue(lambda: self.durable_store.remove_leases(lease_ids))

    def close(self) -> Deferred[None]:
        return self._enqueue(self.durable_store.close)
