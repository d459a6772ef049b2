"""The client wire schema: AMP commands that client programs send to a server.

Every error a responder may raise on purpose is mapped here; an unmapped
exception would drop the connection, so it is treated as a bug.
"""

from __future__ import annotations

from twisted.protocols import amp

from .errors import (
    BadRequest,
    Busy,
    LicenseExpired,
    LicenseFileError,
    NoQuorum,
    NoSeats,
    NotServing,
    StaleLicense,
    UnknownFeature,
    UnknownLease,
)
from .wire import JSON, ChunkedBytes, Lines, Rows

REQUEST_ERRORS = {
    NoSeats: b"NO_SEATS",
    UnknownFeature: b"UNKNOWN_FEATURE",
    LicenseExpired: b"LICENSE_EXPIRED",
    NoQuorum: b"NO_QUORUM",
    NotServing: b"NOT_SERVING",
    BadRequest: b"BAD_REQUEST",
    Busy: b"BUSY",
    UnknownLease: b"UNKNOWN_LEASE",
}

# Heartbeat answers, one per lease.
RENEWED = "renewed"
CONVERTED = "converted"
RETRY_AFTER = "retry-after"
UNKNOWN = "unknown"
LOST = "lost"


class Checkout(amp.Command):
    """Ask for ``count`` seats of a feature; answers with the new lease."""

    commandName = b"checkout"
    arguments = [
        (b"feature", amp.Unicode()),
        (b"version", amp.Unicode()),
        (b"client_id", amp.Unicode()),
        (b"user", amp.Unicode()),
        (b"host", amp.Unicode()),
        (b"count", amp.Integer()),
    ]
    response = [
        (b"lease_id", amp.Unicode()),
        (b"server", amp.Unicode()),
        (b"ttl", amp.Float()),
        (b"heartbeat", amp.Float()),
    ]
    errors = REQUEST_ERRORS


class Heartbeat(amp.Command):
    """Renew many leases of one client in one call.

    ``statuses`` has one row per lease: (lease_id, status, seconds) where
    seconds is the TTL granted for renewed/converted and the wait for
    retry-after. A lease the server does not hold comes back ``unknown``; the
    client then sends it again in ``claims`` (id, feature, version, count,
    user, host) so that the leader can convert it (F8).

    ``claim_wait`` is how long the leader may hold the answer while a claim
    waits for seats it is moving here (or for its own first commit as a new
    leader) before answering retry-after: a retry-after costs the client a
    whole wait that is a guess, where the leader knows the moment the seats
    arrive. Without it (older clients) the leader answers at once.
    """

    commandName = b"heartbeat"
    arguments = [
        (b"client_id", amp.Unicode()),
        (b"leases", Lines()),
        (b"claims", Rows(optional=True)),
        (b"claim_wait", amp.Float(optional=True)),
    ]
    response = [(b"statuses", Rows())]
    errors = REQUEST_ERRORS


class Checkin(amp.Command):
    """Give a lease back; ``released`` is False if this server did not hold it."""

    commandName = b"checkin"
    arguments = [(b"lease_id", amp.Unicode())]
    response = [(b"released", amp.Boolean())]
    errors = REQUEST_ERRORS


class Locate(amp.Command):
    """Where the pool is: its members' client addresses and the current leader."""

    commandName = b"locate"
    arguments: list = []
    response = [
        (b"server", amp.Unicode()),
        (b"leader", amp.Unicode(optional=True)),
        (b"members", Rows()),
    ]
    errors = REQUEST_ERRORS


class Status(amp.Command):
    """This server's view of the pool and its seats, as a JSON document."""

    commandName = b"status"
    arguments = [(b"verbose", amp.Boolean(optional=True))]
    response = [(b"status", JSON())]
    errors = REQUEST_ERRORS


class InstallLicense(amp.Command):
    """Hand a vendor-signed license file to the pool (``licensectl license push``)."""

    commandName = b"install-license"
    arguments = [(b"license", ChunkedBytes())]
    response = [(b"sequence", amp.Integer())]
    # AMP maps an error to the first listed class it is an instance of: the
    # subclass StaleLicense must come before its base LicenseFileError.
    errors = {**REQUEST_ERRORS, StaleLicense: b"STALE_LICENSE", LicenseFileError: b"LICENSE_FILE"}
