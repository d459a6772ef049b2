"""AMP responders for the client listener, wrapping ``LicenseServer``.

Only client commands are served here; peer commands live on the peer listener.
Each connection is limited in how many requests it may have outstanding, so a
misbehaving client slows itself down and nobody else.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from . import commands
from .errors import BadRequest, Busy, LicenseFileError
from .quiet_amp import QuietAMP
from .records import Lease
from .server import MAX_CLAIM_WAIT, Claim, LicenseServer

log = Logger()

MAX_OUTSTANDING = 256
_BAD_REQUEST = commands.REQUEST_ERRORS[BadRequest]
_CHECKOUT_ERRORS = commands.Checkout.allErrors
_CHECKOUT_FATAL = commands.Checkout.fatalErrors


def _claim_wait(seconds: float | None) -> float:
    if seconds is None:
        return 0.0
    if not 0.0 <= seconds <= MAX_CLAIM_WAIT:
        raise BadRequest(f"claim_wait must be between 0 and {MAX_CLAIM_WAIT:g} seconds, got {seconds!r}")
    return seconds


def _claims(rows: list[tuple[str, ...]] | None) -> list[Claim]:
    claims = []
    for row in rows or ():
        if len(row) != 6:
            raise BadRequest("a claim has 6 fields: lease_id, feature, version, count, user, host")
        lease_id, feature, version, count, user, host = row
        try:
            n = int(count)
        except ValueError:
            raise BadRequest(f"claim count {count[:20]!r} is not an integer") from None
        claims.append((lease_id, feature, version, n, user, host))
    return claims


class ClientLocator(amp.CommandLocator):
    """Responders for the client wire schema (``licensing.commands``)."""

    def __init__(self, server: LicenseServer, connection: ClientConnection) -> None:
        super().__init__()
        self.server = server
        self.connection = connection

    def locateResponder(self, name: bytes) -> Any:  # noqa: N802 - Twisted API
        """The responder for ``name``, answering arguments that do not parse with BadRequest.

        AMP parses a box's values before our code runs; a value that is not
        what the schema says (a count that is not an integer, text that is not
        UTF-8, a missing key) would otherwise be logged as a failure and drop
        the connection. Checkout, the call every client makes all the time,
        is answered from its box directly (``checkout_box``).
        """
        if name == commands.Checkout.commandName:
            return self.checkout_box
        responder = super().locateResponder(name)
        if responder is None:
            return None

        def parse_or_refuse(box: amp.AmpBox) -> Any:
            try:
                return responder(box)
            except (KeyError, ValueError, TypeError) as e:
                return _malformed(e)

        return parse_or_refuse

    def _admit(self) -> None:
        """Count one more request outstanding on this connection, or refuse it with Busy."""
        conn = self.connection
        if conn.outstanding >= MAX_OUTSTANDING:
            raise Busy(f"more than {MAX_OUTSTANDING} requests outstanding on one connection")
        conn.outstanding += 1

    def _answered(self, result: Any) -> Any:
        self.connection.outstanding -= 1
        return result

    def _guarded(self, coro: Any) -> Deferred:
        try:
            self._admit()
        except Busy:
            coro.close()
            raise
        return ensureDeferred(coro).addBoth(self._answered)

    @commands.Checkout.responder
    def checkout(self, feature, version, client_id, user, host, count):
        """Checkout with the schema's Python values (AMP's own path, and the simulation's)."""
        self._admit()
        issued = self.server.checkout(feature, version, client_id, user, host, count)
        return issued.addCallbacks(self._checkout_values, self._answered)

    def _checkout_values(self, lease: Lease) -> dict[str, Any]:
        self.connection.outstanding -= 1
        # Not the license's feature: a license installed while the lease was
        # being stored may no longer have it. The lease carries its own TTL.
        ttl = lease.expires_at - lease.issued_at
        return {
            "lease_id": lease.lease_id,
            "server": lease.server,
            "ttl": ttl,
            "heartbeat": min(self.server.client_heartbeat, ttl / 3),
        }

    def checkout_box(self, box: amp.AmpBox) -> Deferred[amp.AmpBox]:
        """``commands.Checkout`` from its box to its answer box, on the store's own Deferred.

        What ``CommandLocator`` does with the schema (parse each argument,
        call, serialize each answer, map the errors) written out for this one
        command: the same keys in the same order, the same conversions
        (UTF-8 text, ``int`` for the count, ``str`` of a float), the same
        BadRequest for a box that does not parse and the same error codes,
        without a lookup, a keyword dict and a Deferred layer per call.
        Extra keys are ignored, as AMP does. A test holds it to ``checkout``
        served through AMP's schema handling.
        """
        try:
            feature = box[b"feature"].decode("utf-8")
            version = box[b"version"].decode("utf-8")
            client_id = box[b"client_id"].decode("utf-8")
            user = box[b"user"].decode("utf-8")
            host = box[b"host"].decode("utf-8")
            count = int(box[b"count"])
        except (KeyError, ValueError, TypeError) as e:
            return _malformed(e)
        conn = self.connection
        if conn.outstanding >= MAX_OUTSTANDING:
            busy = Busy(f"more than {MAX_OUTSTANDING} requests outstanding on one connection")
            return fail(busy).addErrback(_checkout_error)
        conn.outstanding += 1
        issued = self.server.checkout(feature, version, client_id, user, host, count)
        return issued.addCallbacks(self._checkout_answer, self._checkout_refused)

    def _checkout_answer(self, lease: Lease) -> amp.AmpBox:
        self.connection.outstanding -= 1
        ttl = lease.expires_at - lease.issued_at
        answer = amp.AmpBox()
        answer[b"lease_id"] = lease.lease_id.encode("utf-8")
        answer[b"server"] = lease.server.encode("utf-8")
        answer[b"ttl"] = _float(ttl)
        answer[b"heartbeat"] = _float(min(self.server.client_heartbeat, ttl / 3))
        return answer

    def _checkout_refused(self, failure: Failure) -> Failure:
        self.connection.outstanding -= 1
        return _checkout_error(failure)

    @commands.Heartbeat.responder
    def heartbeat(self, client_id, leases, claims=None, claim_wait=None):
        async def run() -> dict:
            rows = await self.server.heartbeat(client_id, leases, _claims(claims), _claim_wait(claim_wait))
            return {"statuses": rows}

        return self._guarded(run())

    @commands.Checkin.responder
    def checkin(self, lease_id):
        async def run() -> dict:
            return {"released": await self.server.checkin(lease_id)}

        return self._guarded(run())

    @commands.Locate.responder
    def locate(self):
        server, leader, members = self.server.locate()
        return {"server": server, "leader": leader, "members": members}

    @commands.Status.responder
    def status(self, verbose=None):
        return {"status": self.server.status(bool(verbose))}

    @commands.InstallLicense.responder
    def install_license(self, license):
        async def run() -> dict:
            assert self.server.pool is not None
            try:
                sequence = await self.server.pool.offer_license(license)
            except LicenseFileError as e:
                log.warn("pushed license refused: {error}", error=str(e))
                raise
            return {"sequence": sequence}

        return self._guarded(run())


def _malformed(error: Exception) -> Deferred[Any]:
    return fail(amp.RemoteAmpError(_BAD_REQUEST, f"malformed arguments: {error}"[:200]))


def _float(value: float) -> bytes:
    """``amp.Float``'s encoding, refusing the same values."""
    if not isinstance(value, float):
        raise ValueError(f"Bad float value {value!r}")
    return str(value).encode("ascii")


def _checkout_error(failure: Failure) -> Failure:
    """A Checkout error as AMP sends it: a mapped error's code, anything else as it is (a bug)."""
    error = failure.trap(*_CHECKOUT_ERRORS)
    return Failure(amp.RemoteAmpError(
        _CHECKOUT_ERRORS[error], str(failure.value), error in _CHECKOUT_FATAL, local=failure
    ))


class ClientConnection(QuietAMP):
    """One client program's connection."""

    def __init__(self, server: LicenseServer, factory: ClientFactory) -> None:
        self.outstanding = 0
        self.client_factory = factory
        super().__init__(locator=ClientLocator(server, self))

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted API
        self.client_factory.connections -= 1
        super().connectionLost(reason)


class ClientFactory(Factory):
    """Builds client connections, refusing new ones over ``max_connections``."""

    def __init__(self, server: LicenseServer, max_connections: int = 50_000) -> None:
        self.server = server
        self.max_connections = max_connections
        self.connections = 0

    def buildProtocol(self, addr: Any) -> ClientConnection | Refused:  # noqa: N802 - Twisted API
        if self.connections >= self.max_connections:
            log.warn("refused a client connection from {addr}: limit {n} reached",
                     addr=addr, n=self.max_connections)
            # Not None: behind TLS the listener wraps whatever we return, and a
            # wrapped None fails in makeConnection with a logged traceback.
            return Refused()
        self.connections += 1
        return ClientConnection(self.server, self)


class Refused(Protocol):
    """A connection over the limit: closed as soon as it is made."""

    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        self.transport.abortConnection()
