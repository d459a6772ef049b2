"""The domain error hierarchy.

Errors that cross the client wire are mapped to AMP error codes in
``licensing.commands``; everything else is raised locally with a message that
says what was wrong and what to do about it.
"""

from __future__ import annotations


class LicensingError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(LicensingError):
    """A configuration file is wrong; names the file, section and key."""

    def __init__(self, path: str, section: str | None, key: str | None, message: str) -> None:
        self.path = path
        self.section = section
        self.key = key
        self.message = message
        where = path
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {message}")


class LicenseFileError(LicensingError):
    """A license file cannot be used (malformed, unsigned, forged or expired)."""


class LicenseFormatError(LicenseFileError):
    """The license file is not in the documented format."""


class LicenseSignatureError(LicenseFileError):
    """The license file is unsigned or its signature does not verify."""


class LicenseFileExpired(LicenseFileError):
    """Every feature of the license file has expired."""


class StaleLicense(LicenseFileError):
    """The offered license's sequence number is not higher than the installed one."""


class StoreError(LicensingError):
    """The durable store cannot be opened or written."""


class PKIError(LicensingError):
    """A certificate or key is missing, unreadable or does not fit."""


# Errors a server answers to a client request. Each is mapped on the wire.


class RequestError(LicensingError):
    """Base of the errors a server sends back for a client request."""


class NoSeats(RequestError):
    """Every seat of the feature this server may hand out is in use."""


class UnknownFeature(RequestError):
    """The license has no such feature, or not in the requested version."""


class LicenseExpired(RequestError):
    """The feature's expiry date has passed."""


class NoQuorum(RequestError):
    """The feature needs a majority of the pool and this server cannot see one."""


class NotServing(RequestError):
    """This server cannot serve right now (starting, fenced, or shutting down)."""


class BadRequest(RequestError):
    """The request's arguments are invalid (too long, out of range, malformed)."""


class Busy(RequestError):
    """The server is over a connection or request limit; retry later."""


class UnknownLease(RequestError):
    """No lease with this id is held here."""


# Errors of the pool's consensus core (licensing.pool.raft).


class NotLeader(LicensingError):
    """Only the leader may do this, and this member is not it (or stopped being it).

    ``leader`` names the member believed to lead, or is None when unknown. A
    proposal that fails with NotLeader may still be committed later by the
    new leader: the outcome is unknown, not negative.
    """

    def __init__(self, leader: str | None, message: str | None = None) -> None:
        self.leader = leader
        super().__init__(message or f"not the leader (leader: {leader or 'unknown'})")


class LeadershipTransferFailed(LicensingError):
    """A leadership transfer did not complete: the target never took over in time."""


class NotPeer(LicensingError):
    """A peer command came from a connection not identified as a pool member."""
