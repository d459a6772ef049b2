"""An ILicenseStore that lives in memory, for tests and the pool simulation.

Every write fires its Deferred before returning (``defer.succeed``), so code
under a ``task.Clock`` runs without a reactor and a simulated crash that keeps
the same store object keeps everything written to it.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from ..errors import StoreError
from ..interfaces import ILicenseStore
from ..records import InstalledLicense, Lease, LogEntry, Snapshot, StoredState
from ._validation import check_append


@implementer(ILicenseStore)
class MemoryStore:
    """Holds the store's contents in plain attributes; nothing survives the process."""

    durable = False

    def __init__(self) -> None:
        self._term = 0
        self._voted_for: str | None = None
        self._snapshot: Snapshot | None = None
        self._log: list[LogEntry] = []
        self._license: InstalledLicense | None = None
        self._leases: dict[str, Lease] = {}
        self._closed = False

    def load(self) -> Deferred[StoredState]:
        """Return a copy of the contents; later writes do not change it."""
        if self._closed:
            return fail(StoreError("the memory store is closed"))
        return succeed(
            StoredState(
                term=self._term,
                voted_for=self._voted_for,
                snapshot=self._snapshot,
                log=list(self._log),
                license=self._license,
                leases=[self._leases[key] for key in sorted(self._leases)],
            )
        )

    def save_term(self, term: int, voted_for: str | None) -> Deferred[None]:
        """Record the current term and vote."""
        if self._closed:
            return self._refuse()
        self._term = term
        self._voted_for = voted_for
        return succeed(None)

    def append_entries(self, entries: list[LogEntry]) -> Deferred[None]:
        """Append entries that continue the log; anything else fails with StoreError."""
        if self._closed:
            return self._refuse()
        try:
            check_append(self._last_index(), entries)
        except StoreError as error:
            return fail(error)
        self._log.extend(entries)
        return succeed(None)

    def truncate_log(self, from_index: int) -> Deferred[None]:
        """Drop every entry with index >= from_index."""
        if self._closed:
            return self._refuse()
        self._log = [entry for entry in self._log if entry.index < from_index]
        return succeed(None)

    def save_snapshot(self, snapshot: Snapshot) -> Deferred[None]:
        """Replace the snapshot and drop the entries it covers."""
        if self._closed:
            return self._refuse()
        self._snapshot = snapshot
        self._log = [entry for entry in self._log if entry.index > snapshot.index]
        return succeed(None)

    def save_license(self, license: InstalledLicense) -> Deferred[None]:
        """Replace the installed license file."""
        if self._closed:
            return self._refuse()
        self._license = license
        return succeed(None)

    def put_leases(self, leases: list[Lease]) -> Deferred[None]:
        """Insert or replace leases by id."""
        if self._closed:
            return self._refuse()
        for lease in leases:
            self._leases[lease.lease_id] = lease
        return succeed(None)

    def remove_leases(self, lease_ids: list[str]) -> Deferred[None]:
        """Delete leases by id, ignoring ids that are not held."""
        if self._closed:
            return self._refuse()
        for lease_id in lease_ids:
            self._leases.pop(lease_id, None)
        return succeed(None)

    def close(self) -> Deferred[None]:
        """Refuse every later call; there is nothing to flush."""
        self._closed = True
        return succeed(None)

    def _last_index(self) -> int:
        if self._log:
            return self._log[-1].index
        if self._snapshot is not None:
            return self._snapshot.index
        return 0

    def _refuse(self) -> Deferred[None]:
        return fail(StoreError("the memory store is closed"))
