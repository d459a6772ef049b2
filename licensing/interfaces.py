"""The contracts of every replaceable part, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from .records import InstalledLicense, Lease, LogEntry, Snapshot, StoredState


class ILicenseStore(Interface):
    """Durable state of one license server.

    Every write returns a Deferred that fires (with None) once the write is
    durable: after it fires, a ``kill -9`` of the process does not lose it.
    Writes are applied in the order they were called, and a backend may commit
    several of them in one transaction (group commit). A failed write fires its
    Deferred with ``StoreError`` and changes nothing.
    """

    durable = Attribute(
        "True if the contents survive a restart of the process (sqlite), "
        "False if not (memory). A server without a durable lease table waits "
        "one lease TTL after start before it issues seats."
    )

    def load() -> Deferred[StoredState]:
        """Read everything the store holds, as at the last durable write."""

    def save_term(term: int, voted_for: str | None) -> Deferred[None]:
        """Record the current term and the vote cast in it (None: no vote yet)."""

    def append_entries(entries: list[LogEntry]) -> Deferred[None]:
        """Append entries to the log; their indices follow the last stored one."""

    def truncate_log(from_index: int) -> Deferred[None]:
        """Delete every log entry with index >= from_index."""

    def save_snapshot(snapshot: Snapshot) -> Deferred[None]:
        """Store the snapshot and drop every log entry with index <= snapshot.index."""

    def save_license(license: InstalledLicense) -> Deferred[None]:
        """Replace the installed license file (the caller checks the sequence)."""

    def put_leases(leases: list[Lease]) -> Deferred[None]:
        """Insert or replace leases, keyed by lease_id."""

    def remove_leases(lease_ids: list[str]) -> Deferred[None]:
        """Delete the leases with these ids; unknown ids are ignored."""

    def close() -> Deferred[None]:
        """Finish pending writes and release the backend; later writes fail."""
