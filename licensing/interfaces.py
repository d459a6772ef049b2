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


class IPool(Interface):
    """This server's view of the pool: who leads, and what it may issue.

    A pool of one (``SoloPool``) and the replicated pool both provide it, so
    the license server above never asks how many members there are.
    """

    role = Attribute('"leader", "follower" or "candidate"')
    leader = Attribute("Name of the member believed to lead, or None.")
    term = Attribute("Current leadership term (0 for a pool of one).")

    def start() -> Deferred[None]:
        """Begin taking part in the pool; fires once the server may answer requests."""

    def stop() -> None:
        """Stop every timer and link; used on shutdown and by simulated crashes."""

    def check_issue(feature: object) -> None:
        """Raise NoQuorum or NotServing if this server may not issue or renew seats
        of ``feature`` (a ``licensing.license.Feature``) right now."""

    def allocation(feature: str) -> int:
        """How many seats of ``feature`` this server may have in use."""

    def offer_license(data: bytes) -> Deferred[int]:
        """Hand a signed license file to the pool. Fires with the sequence
        number installed; fails with LicenseFileError if the file is invalid,
        or StaleLicense if a newer or equal one is installed."""

    def members() -> list[dict]:
        """One dict per member for status and Locate: name, client address,
        role, reachable, last_contact, term, commit_index, license_sequence."""

    def leases_changed() -> None:
        """Tell the pool this server's leases changed (a status report is due)."""

    def request_seats(feature: str, count: int) -> None:
        """This server is short of ``count`` seats of ``feature``: ask the leader
        to move free seats here (borrowing). Returns at once; the allocation
        grows later, if at all."""

    def retry_after(feature: str) -> float | None:
        """Seconds until seats of ``feature`` tied up in an unreachable member's
        allocation can be reclaimed, or None if none can be."""

    def lease_adopted(lease: object) -> None:
        """The leader converted a lease issued elsewhere (F8); record the move."""

    def usage(feature: str) -> dict[str, dict]:
        """Per member: {"allocation": n, "used": n} of ``feature``, as this server knows it."""

    def awaiting_leader() -> bool:
        """True while this member knows no live leader: an election is on, or the
        leader it follows has been silent for two peer heartbeats (it died, or is
        cut off from us), so an election is about to start."""


class IPeerNetwork(Interface):
    """How a pool member reaches the others: one Raft message per call.

    The pool's consensus code never waits on the network and never assumes
    it is reliable, so the AMP transport and the simulation can both provide
    this with the same guarantees (none).
    """

    def send(to: str, message: object) -> None:
        """Fire and forget; the message may be lost, delayed, reordered or duplicated."""


class IRecordStateMachine(Interface):
    """The replicated record as Raft drives it.

    Raft calls ``apply`` once per committed entry, in index order, on every
    member; identical logs must give identical states, so the implementation
    may not look at clocks, randomness or anything outside its entries.
    """

    def apply(index: int, data: bytes) -> object:
        """Apply a committed entry (exactly once per index, in order). Must be deterministic.

        Raft's own no-op entries (empty ``data``) are never passed here.
        """

    def snapshot() -> bytes:
        """The state as of the last applied entry."""

    def restore(data: bytes) -> None:
        """Replace the state by a snapshot."""
