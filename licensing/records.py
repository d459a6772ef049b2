"""Plain data records shared by the store, the pool and the server."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Lease:
    """One authorization held by one client.

    ``expires_at`` is wall-clock seconds (``IReactorTime.seconds()``) so that a
    restarted server can tell from its store which leases are still alive. It
    is the one field that changes: renewal sets it in place, because a
    heartbeat renews thousands of leases a second. Slots keep a lease small.
    """

    lease_id: str
    feature: str
    version: str
    client_id: str
    user: str
    host: str
    count: int
    server: str
    issued_at: float
    expires_at: float


@dataclass(frozen=True)
class LogEntry:
    """One entry of the replicated record's log; ``data`` is opaque to the store."""

    index: int
    term: int
    data: bytes


@dataclass(frozen=True)
class Snapshot:
    """The record as of ``index`` (whose entry had ``term``), opaque ``data``."""

    index: int
    term: int
    data: bytes


@dataclass(frozen=True)
class InstalledLicense:
    """The signed license file bytes this server holds, with its sequence number."""

    sequence: int
    data: bytes


@dataclass
class StoredState:
    """Everything a store holds, as read at start-up."""

    term: int = 0
    voted_for: str | None = None
    snapshot: Snapshot | None = None
    log: list[LogEntry] = field(default_factory=list)
    license: InstalledLicense | None = None
    leases: list[Lease] = field(default_factory=list)
