"""``LicenseClient``: check seats out of a pool from any Twisted program.

A ``Lease`` keeps itself alive: the client heartbeats every server that holds
its leases, in one call per server. When that server stops answering (lost
connection, no reply within the request timeout, NotServing or NoQuorum), the
client asks any reachable member where the leader is and claims its leases
there; the leader renews or converts them (F8). The application hears about a
lease only when it is finally lost, through ``Lease.lost``.
"""

from __future__ import annotations

import getpass
import os
import random
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionClosed
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from . import commands
from .errors import BadRequest, LicensingError, NoQuorum, NoSeats, NotServing, RequestError
from .quiet_amp import QuietAMP

log = Logger()

FAILOVER_RETRY = 0.5
"""Seconds between failover rounds while no member takes a lease (an election is on)."""

CLAIM_WAIT = 1.0
"""Seconds the leader may hold a claim while seats move to it (Heartbeat.claim_wait), at most."""

SILENT_FOR = 3
"""Request timeouts for which a member that did not answer at all is asked last,
and not asked for claims other than as the leader."""

HOME_MEMORY = 30.0
"""Seconds a client keeps its choice of home member for a feature."""

EndpointFactory = Callable[[str, str, int], IStreamClientEndpoint]
"""Makes the endpoint of a member from its name, host and port (as Locate tells them)."""

# A failed TLS handshake (the member's certificate does not verify or name
# it, or it refuses ours) ends the connection with the TLS error itself, not
# a ConnectionClosed: that member is as unusable as an unreachable one.
# A connection attempt cut short by the request timeout fails with
# ConnectingCancelledError (not a ConnectError): a frozen member whose listen
# backlog is full never completes the TCP handshake.
_SILENT_ERRORS = (DeferredTimeout, ConnectError, ConnectingCancelledError, ConnectionClosed,
                  CancelledError, SSL.Error, VerificationError)
_FAILOVER_ERRORS = (NotServing, NoQuorum, amp.ProtocolSwitched, *_SILENT_ERRORS)


class Unreachable(LicensingError):
    """No member of the pool answered."""


class LeaseLost(LicensingError):
    """A lease ended without the application releasing it."""


@dataclass
class _Held:
    feature: str
    version: str
    count: int
    user: str
    host: str


class Lease:
    """One authorization this program holds; it heartbeats itself until released or lost."""

    def __init__(self, client: LicenseClient, lease_id: str, feature: str, version: str,
                 count: int, server: str, ttl: float, heartbeat: float) -> None:
        self.client = client
        self.lease_id = lease_id
        self.feature = feature
        self.version = version
        self.count = count
        self.server = server
        self.ttl = ttl
        self.heartbeat = heartbeat
        self.renewed_at = client.clock.seconds()
        self.retry_at = 0.0
        self.converted = 0
        self.lost: Deferred[LeaseLost] = Deferred()
        """Fires with a ``LeaseLost`` (as its result, not an error) when the lease is gone."""
        self.released = False

    @property
    def alive(self) -> bool:
        return not self.released and not self.lost.called

    def expires_at(self) -> float:
        """When the holding server forgets the lease if no heartbeat reaches it."""
        return self.renewed_at + self.ttl

    def add_loss_callback(self, fn: Callable[[LeaseLost], Any]) -> None:
        """Call ``fn(LeaseLost)`` when the lease is lost (never on release)."""
        self.lost.addCallback(lambda why: (fn(why), why)[1])

    async def release(self) -> None:
        """Check the lease in; its seats are free for others once this returns."""
        if not self.alive:
            return
        self.released = True
        self.client._forget(self)
        try:
            answer = await self.client.call(self.server, commands.Checkin, lease_id=self.lease_id)
            if not answer["released"]:
                # A leader that deferred a claim (retry-after) is where the
                # heartbeats go, but the member that issued the lease may
                # still hold it: give it back wherever it is.
                await self.client.checkin(self.lease_id)
        except (RequestError, Unreachable, *_FAILOVER_ERRORS) as e:
            log.warn("checkin of {lease_id} not confirmed ({error}); it expires after its TTL",
                     lease_id=self.lease_id, error=str(e))

    def _lose(self, why: str) -> None:
        if self.alive:
            self.client._forget(self)
            log.warn("lease {lease_id} of {feature} lost: {why}", lease_id=self.lease_id,
                     feature=self.feature, why=why)
            self.lost.callback(LeaseLost(f"lease {self.lease_id} of {self.feature} lost: {why}"))

    def __repr__(self) -> str:
        return f"<Lease {self.lease_id} {self.feature} x{self.count} at {self.server}>"


class LicenseClient:
    """Checks seats out of a pool and keeps them alive."""

    def __init__(
        self,
        clock: Any,
        endpoints: Mapping[str, IStreamClientEndpoint],
        *,
        endpoint_factory: EndpointFactory | None = None,
        client_id: str | None = None,
        user: str | None = None,
        host: str | None = None,
        home: str | None = None,
        request_timeout: float = 2.0,
        heartbeat: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not endpoints:
            raise LicensingError("a LicenseClient needs the endpoint of at least one member")
        self.clock = clock
        self.endpoints = dict(endpoints)
        self.endpoint_factory = endpoint_factory
        self.rng = rng or random.Random()
        self.client_id = client_id or f"{socket.gethostname()}:{os.getpid()}:{self.rng.getrandbits(32):08x}"
        self.user = user if user is not None else _user()
        self.host = host if host is not None else socket.gethostname()
        self.home = home
        self.leader: str | None = None
        self.request_timeout = request_timeout
        self.heartbeat = heartbeat
        self.leases: dict[str, Lease] = {}
        self._homes: dict[str, tuple[str | None, float]] = {}
        self._connections: dict[str, amp.AMP] = {}
        self._connecting: dict[str, list[Deferred[amp.AMP]]] = {}
        self._silent: dict[str, float] = {}
        """Member -> when it last failed to answer at all (down, frozen, cut off)."""
        self._beating = False
        self._soon: IDelayedCall | None = None
        self._loop = LoopingCall(self._beat)
        self._loop.clock = clock
        self._tick = 0.0
        self.closed = False

    @classmethod
    def from_config(cls, clock: Any, path: str | os.PathLike[str], **kwargs: Any) -> LicenseClient:
        """A client for the pool in ``pool.ini``, with the [client] certificate."""
        from .config import load_config
        from .tls import client_tls_options

        settings = load_config(path)
        if settings.client is None:
            from .errors import ConfigError

            raise ConfigError(str(settings.path), "client", None,
                              "missing section; add [client] with cert and key")
        cs = settings.client

        def factory(name: str, host: str, port: int) -> IStreamClientEndpoint:
            options = client_tls_options(name, settings.ca, cs.cert, cs.key)
            return SSL4ClientEndpoint(clock, host, port, options)

        endpoints = {
            name: factory(name, s.client.host, s.client.port) for name, s in settings.servers.items()
        }
        kwargs.setdefault("home", cs.home)
        kwargs.setdefault("request_timeout", cs.request_timeout or settings.timings.request_timeout)
        kwargs.setdefault("heartbeat", cs.heartbeat)
        return cls(clock, endpoints, endpoint_factory=factory, **kwargs)

    # -- connections -----------------------------------------------------------

    def _connect(self, name: str) -> Deferred[amp.AMP]:
        """The open connection to ``name``; concurrent callers share one attempt."""
        if self.closed:
            raise Unreachable("the client is closed")
        proto = self._connections.get(name)
        if proto is not None:
            return succeed(proto)
        waiters = self._connecting.get(name)
        if waiters is not None:
            mine: Deferred[amp.AMP] = Deferred()
            waiters.append(mine)
            return mine
        endpoint = self.endpoints.get(name)
        if endpoint is None:
            raise Unreachable(f"no endpoint known for member {name!r}")
        self._connecting[name] = waiters = []
        d = connectProtocol(endpoint, _Connection(self, name))
        d.addTimeout(self.request_timeout, self.clock)

        def connected(proto: amp.AMP) -> amp.AMP:
            del self._connecting[name]
            self._connections[name] = proto
            for w in waiters:
                w.callback(proto)
            return proto

        def failed(failure: Failure) -> Failure:
            del self._connecting[name]
            for w in waiters:
                w.errback(failure)
            return failure

        return d.addCallbacks(connected, failed)

    def _disconnected(self, name: str, proto: amp.AMP) -> None:
        if self._connections.get(name) is proto:
            del self._connections[name]
        if any(lease.server == name for lease in self.leases.values()):
            # The member holding leases went away (killed, restarted, cut
            # off): fail over now rather than at the next heartbeat. The
            # jitter spreads a crowd of clients over a moment.
            self._beat_soon(self.rng.uniform(0.05, 0.25))

    def _beat_soon(self, delay: float) -> None:
        """Run a heartbeat round in ``delay`` seconds, unless one is due sooner."""
        if self.closed or not self.leases:
            return
        due = self.clock.seconds() + delay
        if self._soon is not None and self._soon.active():
            if self._soon.getTime() <= due:
                return
            self._soon.cancel()
        self._soon = self.clock.callLater(delay, self._soon_due)

    def _soon_due(self) -> None:
        self._soon = None
        self._beat()

    async def call(self, name: str, command: type[amp.Command], **kwargs: Any) -> dict[str, Any]:
        """One request to member ``name``, bounded by the request timeout."""
        try:
            proto = await self._connect(name)
            d = proto.callRemote(command, **kwargs)
            d.addTimeout(self.request_timeout, self.clock)
            try:
                answer = await d
            except DeferredTimeout:
                # A member that does not answer in time is treated as gone.
                if proto.transport is not None:
                    proto.transport.abortConnection()
                raise
        except _SILENT_ERRORS:
            self._silent[name] = self.clock.seconds()
            raise
        self._silent.pop(name, None)
        return answer

    def _is_silent(self, name: str) -> bool:
        """Whether ``name`` failed to answer at all lately: asking it again costs a
        request timeout (a frozen member) that a lease in failover cannot spare."""
        since = self._silent.get(name)
        return since is not None and self.clock.seconds() - since < SILENT_FOR * self.request_timeout

    def _order(self, first: str | None = None) -> list[str]:
        names = list(self.endpoints)
        self.rng.shuffle(names)
        for preferred in (self.leader, self.home, first):
            if preferred in names:
                names.remove(preferred)
                names.insert(0, preferred)
        names.sort(key=self._is_silent)
        return names

    async def locate(self) -> tuple[str | None, list[tuple[str, str, int]]]:
        """Ask members in turn where the leader is; learns every member's address."""
        errors = []
        for name in self._order():
            try:
                answer = await self.call(name, commands.Locate)
            except (RequestError, *_FAILOVER_ERRORS) as e:
                errors.append(f"{name}: {_describe(e)}")
                continue
            members = [(m[0], m[1], int(m[2])) for m in answer["members"]]
            self._learn(members)
            self.leader = answer["leader"]
            return self.leader, members
        raise Unreachable("no member of the pool answered Locate (" + "; ".join(errors) + ")")

    def _learn(self, members: list[tuple[str, str, int]]) -> None:
        if self.endpoint_factory is None:
            return
        for name, host, port in members:
            if name not in self.endpoints:
                self.endpoints[name] = self.endpoint_factory(name, host, port)

    # -- leases ----------------------------------------------------------------

    async def checkout(self, feature: str, version: str = "", count: int = 1) -> Lease:
        """A lease of ``count`` seats; tries the home server first, then the others.

        Raises the last typed error (NoSeats, UnknownFeature, LicenseExpired,
        NoQuorum, NotServing, BadRequest) when no member can issue it, or
        ``Unreachable`` when none answers. A member that answered outranks
        one that could not be reached: with one member down and the others
        full, the pool is full, not unreachable. NoSeats outranks NoQuorum
        and NotServing: a member that sees a majority found no seat anywhere
        it could borrow from, so a member that cannot act for a moment
        (around a change of leader) does not make a full pool look broken.
        """
        last: Exception | None = None
        refused: RequestError | None = None
        full: NoSeats | None = None
        for name in self._order(self.home or await self._roomiest(feature)):
            try:
                answer = await self.call(
                    name, commands.Checkout, feature=feature, version=version,
                    client_id=self.client_id, user=self.user, host=self.host, count=count,
                )
            except (NoSeats, *_FAILOVER_ERRORS) as e:
                last = e
                if isinstance(e, NoSeats):
                    full = e
                elif isinstance(e, RequestError):
                    refused = e
                continue
            lease = Lease(self, answer["lease_id"], feature, version, count, answer["server"],
                          answer["ttl"], self.heartbeat or answer["heartbeat"])
            self.leases[lease.lease_id] = lease
            self._schedule()
            return lease
        if full is not None:
            raise full
        if refused is not None:
            raise refused
        raise Unreachable(f"no member of the pool answered the checkout of {feature!r}: {_describe(last)}")

    async def _roomiest(self, feature: str) -> str | None:
        """A reachable member with free seats of ``feature``, the more free seats the likelier.

        Asked once per feature and remembered for ``HOME_MEMORY`` seconds, so a
        busy client pays one Status call, not one per checkout.
        """
        now = self.clock.seconds()
        known = self._homes.get(feature)
        if known is not None and now - known[1] < HOME_MEMORY:
            return known[0]
        if len(self.endpoints) == 1:
            return None
        try:
            doc = await self.status()
        except (Unreachable, RequestError):
            return None
        reachable = {m["name"] for m in doc.get("members", []) if m.get("reachable")}
        best = None
        for f in doc.get("features", []):
            if f.get("name") == feature:
                shares = {name: u["allocation"] - u["used"] for name, u in f["members"].items()
                          if name in reachable and u["allocation"] > u["used"]}
                if shares:
                    # Weighted, not the maximum: many clients starting together
                    # spread over the members instead of all landing on one.
                    names = sorted(shares)
                    best = self.rng.choices(names, weights=[shares[n] for n in names])[0]
        self._homes[feature] = (best, now)
        return best

    async def checkin(self, lease_id: str, server: str | None = None) -> bool:
        """Check in a lease by id (for tools that did not keep the ``Lease``)."""
        for name in self._order(server):
            try:
                answer = await self.call(name, commands.Checkin, lease_id=lease_id)
            except (NotServing, NoQuorum, *_FAILOVER_ERRORS):
                continue
            if answer["released"]:
                return True
        return False

    async def status(self, server: str | None = None, verbose: bool = False) -> dict[str, Any]:
        """The status document of ``server`` (or of the first member that answers)."""
        errors = []
        for name in ([server] if server else self._order()):
            try:
                return (await self.call(name, commands.Status, verbose=verbose))["status"]
            except (RequestError, *_FAILOVER_ERRORS) as e:
                errors.append(f"{name}: {_describe(e)}")
        raise Unreachable("no member answered Status (" + "; ".join(errors) + ")")

    async def push_license(self, data: bytes) -> int:
        """Hand a signed license file to the pool; returns the sequence installed."""
        leader, _ = await self.locate()
        answer = await self.call(leader or self._order()[0], commands.InstallLicense, license=data)
        return answer["sequence"]

    def _forget(self, lease: Lease) -> None:
        self.leases.pop(lease.lease_id, None)
        if not self.leases and self._loop.running:
            self._loop.stop()

    def _schedule(self) -> None:
        interval = min(lease.heartbeat for lease in self.leases.values())
        if self._loop.running and abs(self._loop.interval - interval) < 1e-9:
            return
        if self._loop.running:
            self._loop.stop()
        self._loop.start(interval, now=False).addErrback(
            lambda f: log.failure("heartbeat loop stopped", f)
        )

    def _beat(self) -> None:
        """Start a heartbeat round unless one is running.

        The round's Deferred is deliberately not handed to the LoopingCall:
        a round may stop that loop (its last lease lost or released), and a
        LoopingCall stopped while it waits on its own Deferred fails an
        internal assertion when that Deferred fires (found by the chaos soak).
        """
        if self._beating:
            return
        self._beating = True
        d = Deferred.fromCoroutine(self.heartbeat_now())
        d.addErrback(lambda f: log.failure("heartbeat round failed", f))

        def done(_: Any) -> None:
            self._beating = False

        d.addBoth(done)

    async def heartbeat_now(self) -> None:
        """One heartbeat round: every holding server once, then failover for the rest."""
        now = self.clock.seconds()
        by_server: dict[str, list[Lease]] = {}
        for lease in list(self.leases.values()):
            if lease.expires_at() <= now:
                lease._lose("no server renewed it within its TTL")
            elif lease.retry_at <= now:
                by_server.setdefault(lease.server, []).append(lease)
        try:
            await self._heartbeat_round(now, by_server)
        finally:
            self._follow_up(now)

    def _follow_up(self, started: float) -> None:
        """Schedule the next round early where waiting for the heartbeat interval
        would waste a lease's time: a retry-after that is due, or leases no
        member took in this round (the pool may be electing a leader)."""
        now = self.clock.seconds()
        waits = [lease.retry_at - now for lease in self.leases.values() if lease.retry_at > now]
        if any(lease.renewed_at < started and lease.retry_at <= now for lease in self.leases.values()):
            waits.append(FAILOVER_RETRY)
        if waits:
            self._beat_soon(max(0.0, min(waits)))

    async def _heartbeat_round(self, now: float, by_server: dict[str, list[Lease]]) -> None:
        orphans: list[Lease] = []
        for server, leases in by_server.items():
            try:
                answer = await self.call(server, commands.Heartbeat, client_id=self.client_id,
                                         leases=[lease.lease_id for lease in leases])
            except (*_FAILOVER_ERRORS,) as e:
                log.info("server {server} did not renew ({error}); failing over",
                         server=server, error=_describe(e))
                orphans.extend(leases)
                continue
            except BadRequest as e:
                log.error("heartbeat refused as bad request: {error}", error=str(e))
                continue
            orphans.extend(self._settle(server, answer["statuses"]))
        if orphans:
            await self._claim(orphans)

    def _settle(self, server: str, statuses: list[tuple[str, ...]]) -> list[Lease]:
        """Apply one server's answers; returns the leases it did not hold."""
        now = self.clock.seconds()
        unknown = []
        for lease_id, status, seconds in statuses:
            lease = self.leases.get(lease_id)
            if lease is None:
                continue
            value = float(seconds)
            if status in (commands.RENEWED, commands.CONVERTED):
                lease.server = server
                lease.renewed_at = now
                lease.ttl = value
                lease.retry_at = 0.0
                if status == commands.CONVERTED:
                    lease.converted += 1
                    log.info("lease {lease_id} converted by {server}", lease_id=lease_id, server=server)
            elif status == commands.RETRY_AFTER:
                lease.server = server
                lease.retry_at = now + min(value, max(0.0, lease.expires_at() - now - 0.5))
            elif status == commands.UNKNOWN:
                unknown.append(lease)
            else:
                lease._lose(f"server {server} answered {status}")
        return unknown

    def _claim_wait(self) -> float:
        """How long the leader may hold our claims for seats on their way: half
        the request timeout, so that a held claim never looks like a dead member."""
        return min(CLAIM_WAIT, self.request_timeout / 2)

    async def _claim(self, leases: list[Lease]) -> None:
        """Send leases whose server failed or forgot them to the leader as claims."""
        try:
            leader, _ = await self.locate()
        except Unreachable as e:
            log.warn("{error}; retrying at the next heartbeat", error=str(e))
            return
        candidates = [leader] if leader else []
        candidates += [name for name in self._order()
                       if name not in candidates and not self._is_silent(name)]
        claims = [(x.lease_id, x.feature, x.version, x.count, self.user, self.host) for x in leases]
        for name in candidates:
            try:
                answer = await self.call(name, commands.Heartbeat, client_id=self.client_id,
                                         leases=[], claims=claims, claim_wait=self._claim_wait())
            except (*_FAILOVER_ERRORS, BadRequest, Unreachable) as e:
                # Unreachable: closed meanwhile, or a leader we know no endpoint for.
                log.info("claim at {server} failed: {error}", server=name, error=_describe(e))
                continue
            remaining = {x.lease_id for x in self._settle(name, answer["statuses"])}
            # A claim the leader could only defer goes on to the other members
            # too: the member that issued it may still honour it (it answered
            # NoQuorum for a moment around a change of leader, or was frozen
            # for less than its allocation lease) and then renews it.
            remaining |= {status[0] for status in answer["statuses"] if status[1] == commands.RETRY_AFTER}
            if not remaining:
                return
            claims = [c for c in claims if c[0] in remaining]

    def close(self) -> None:
        """Stop heartbeating and drop every connection (leases then expire on the servers).

        Final: a request still in flight must not open a new connection (its
        failover would otherwise reconnect and renew), so later calls fail
        with Unreachable.
        """
        self.closed = True
        if self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        for proto in list(self._connections.values()):
            if proto.transport is not None:
                proto.transport.loseConnection()
        self._connections.clear()


class _Connection(QuietAMP):
    """A connection to one member that tells the client when it goes."""

    def __init__(self, client: LicenseClient, name: str) -> None:
        super().__init__()
        self.client = client
        self.name = name

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 - Twisted API
        # Unregister first: AMP fails the outstanding requests here, and their
        # errbacks (failover, Locate) must open a new connection, not reuse this one.
        self.client._disconnected(self.name, self)
        super().connectionLost(reason)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no members"
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
