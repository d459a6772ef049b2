"""Tests for licensing.client: LicenseClient and Lease against in-process servers.

Most tests run real mutual TLS in memory: each client endpoint wraps the
client's AMP protocol and the server's ``ClientFactory`` in
``TLSMemoryBIOFactory`` and joins them with an iosim pump, all on the one
``Clock`` the servers use, so heartbeats, TTLs and request timeouts are
deterministic. One test runs the real service tree over real TLS on
127.0.0.1 with the real reactor.
"""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from licensing import commands
from licensing.client import LeaseLost, LicenseClient, Unreachable
from licensing.errors import BadRequest, LicenseExpired, NoQuorum, NoSeats, UnknownFeature
from licensing.responders import ClientFactory
from licensing.tls import client_tls_options, server_tls_options

from .conftest import FEATURES, PKI, Solo, resolve

_ADDRESS = IPv4Address("TCP", "127.0.0.1", 0)


@dataclass
class Network:
    """In-memory TLS connections between clients and servers, on one Clock."""

    clock: Clock
    pki: PKI
    servers: dict[str, Any] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    frozen: set[str] = field(default_factory=set)
    pumps: list[iosim.IOPump] = field(default_factory=list)
    links: dict[str, list[iosim.IOPump]] = field(default_factory=dict)

    def add(self, name: str, server: Any, cert: Any = None, key: Any = None) -> None:
        """Serve ``server`` as member ``name`` (with its own certificate)."""
        options = server_tls_options(self.pki.ca, cert or self.pki.server_cert,
                                     key or self.pki.server_key)
        self.servers[name] = (ClientFactory(server), options)

    def endpoint(self, name: str, expect: str | None = None, cert: Any = None, key: Any = None,
                 ca: Any = None) -> MemoryEndpoint:
        """An endpoint to member ``name``, checking the server is ``expect`` (default: name)."""
        options = client_tls_options(expect or name, ca or self.pki.ca,
                                     cert or self.pki.client_cert, key or self.pki.client_key)
        return MemoryEndpoint(self, name, options)

    def flush(self) -> None:
        """Move bytes on every connection until all are quiet."""
        for _ in range(100):
            if not [p.flush() for p in list(self.pumps)].count(True):
                return
        raise AssertionError("the network never went quiet")

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Let ``seconds`` pass in small steps, delivering everything in between."""
        self.flush()
        while seconds > 1e-9:
            delta = min(step, seconds)
            self.clock.advance(delta)
            self.flush()
            seconds -= delta

    def cut(self, name: str) -> None:
        """Member ``name`` goes away: its connections drop and new ones are refused."""
        self.down.add(name)
        for pump in self.links.get(name, []):
            pump.serverIO.loseConnection()
        self.flush()

    def freeze(self, name: str) -> None:
        """Member ``name`` stops (SIGSTOP) and its listen backlog is full: new
        connections to it hang in the TCP handshake until the client cancels
        them. Open connections drop, as the client aborts them at its first
        request timeout anyway."""
        self.frozen.add(name)
        for pump in self.links.get(name, []):
            pump.serverIO.loseConnection()
        self.flush()

    def run(self, work: Coroutine[Any, Any, Any] | Deferred[Any]) -> Any:
        """Start work, deliver everything, and return its result (or raise its error)."""
        d = Deferred.fromCoroutine(work) if not isinstance(work, Deferred) else work
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        self.flush()
        assert outcome, "the work did not complete once the network was quiet"
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Connects a client factory to a member over TLS in memory."""

    def __init__(self, net: Network, name: str, options: Any) -> None:
        self.net = net
        self.name = name
        self.options = options

    def connect(self, factory: Factory) -> Deferred[Any]:
        net = self.net
        if self.name in net.down or self.name not in net.servers:
            return fail(ConnectionRefusedError(self.name))
        if self.name in net.frozen:
            # What a TCP endpoint does when its connection attempt is cancelled.
            return Deferred(lambda d: d.errback(ConnectingCancelledError(_ADDRESS)))
        server_factory, server_options = net.servers[self.name]
        server_side = TLSMemoryBIOFactory(server_options, False, server_factory, net.clock)
        client_side = TLSMemoryBIOFactory(self.options, True, factory, net.clock)
        server_tls = server_side.buildProtocol(_ADDRESS)
        client_tls = client_side.buildProtocol(_ADDRESS)
        pump = iosim.connect(server_tls, iosim.makeFakeServer(server_tls), client_tls,
                             iosim.makeFakeClient(client_tls), greet=False, clock=net.clock)
        net.pumps.append(pump)
        net.links.setdefault(self.name, []).append(pump)
        return succeed(client_tls.wrappedProtocol)


@pytest.fixture
def net(solo: Solo, pki: PKI) -> Network:
    n = Network(solo.clock, pki)
    n.add("ls1", solo.server)
    return n


@pytest.fixture
def client(net: Network) -> LicenseClient:
    c = LicenseClient(net.clock, {"ls1": net.endpoint("ls1")}, client_id="app-1", user="alice",
                      host="ws1")
    yield c
    c.close()
    net.flush()


def test_checkout_gives_a_lease(net: Network, client: LicenseClient, solo: Solo) -> None:
    """A checkout returns a live Lease that the server holds for this client."""
    lease = net.run(client.checkout("cad-pro", "2.0"))
    assert lease.alive and lease.server == "ls1"
    assert (lease.ttl, lease.heartbeat) == (30.0, 10.0)
    held = solo.server.seats.get(lease.lease_id)
    assert (held.client_id, held.user, held.host, held.version) == ("app-1", "alice", "ws1", "2.0")
    assert client.leases == {lease.lease_id: lease}


@pytest.mark.parametrize(
    ("feature", "version", "count", "error"),
    [("cam", "", 1, UnknownFeature), ("cad-pro", "3.0", 1, UnknownFeature),
     ("old", "", 1, LicenseExpired), ("cad-pro", "", 0, BadRequest),
     ("cad-pro", "", 4, NoSeats)],
)
def test_checkout_errors_are_typed(net: Network, client: LicenseClient, feature: str,
                                   version: str, count: int, error: type) -> None:
    """What the server refuses reaches the application as the server's error type."""
    with pytest.raises(error):
        net.run(client.checkout(feature, version, count))
    assert client.leases == {}


def test_full_pool_with_a_member_down_says_no_seats(net: Network, solo: Solo) -> None:
    """Members that answered NoSeats outrank one that is down: the pool is full.

    Regression: when the member tried last was unreachable, the checkout
    raised Unreachable ("no member of the pool answered") although the
    others had answered that every seat was taken.
    """
    c = LicenseClient(net.clock, {"ls1": net.endpoint("ls1"), "ls2": net.endpoint("ls2")},
                      client_id="app-1", home="ls1")
    net.run(c.checkout("cad-pro", count=3))
    with pytest.raises(NoSeats):
        net.run(c.checkout("cad-pro"))
    c.close()
    net.flush()


def test_heartbeats_renew(net: Network, client: LicenseClient, solo: Solo) -> None:
    """A held lease is renewed every heartbeat and outlives its TTL many times over."""
    lease = net.run(client.checkout("cad-pro"))
    net.advance(10 * lease.ttl)
    assert lease.alive and not lease.lost.called
    assert lease.renewed_at >= net.clock.seconds() - lease.heartbeat
    held = solo.server.seats.get(lease.lease_id)
    assert held is not None and held.expires_at > net.clock.seconds()


def test_loss_fires_when_the_server_forgets_and_cannot_convert(
        net: Network, client: LicenseClient, solo: Solo) -> None:
    """A lease the server forgot while its seats went to others is lost, and the app is told."""
    lease = net.run(client.checkout("cad-pro"))
    told: list[LeaseLost] = []
    lease.add_loss_callback(told.append)
    solo.server.seats.release(lease.lease_id)
    for n in range(3):
        resolve(solo.server.checkout("cad-pro", "", f"other-{n}", "u", "h", 1))
    net.advance(lease.heartbeat + 1)
    assert lease.lost.called and not lease.alive
    assert len(told) == 1 and isinstance(told[0], LeaseLost)
    assert lease.lease_id in str(told[0])
    assert client.leases == {}
    assert not client._loop.running


def test_loss_fires_when_the_feature_leaves_the_license(
        net: Network, client: LicenseClient, solo: Solo, make_license) -> None:
    """A new license without the feature ends the lease at the next heartbeat."""
    lease = net.run(client.checkout("viewer"))
    resolve(solo.pool.offer_license(make_license(2, {"cad-pro": FEATURES["cad-pro"]})))
    net.advance(lease.heartbeat + 1)
    assert lease.lost.called
    assert "lost" in str(lease.lost.result)


def test_forgotten_lease_is_converted_when_seats_are_free(
        net: Network, client: LicenseClient, solo: Solo) -> None:
    """The leader re-issues a lease it forgot (F8) under the same id; the app sees nothing."""
    lease = net.run(client.checkout("cad-pro"))
    solo.server.seats.release(lease.lease_id)
    net.advance(lease.heartbeat + 1)
    assert lease.alive and lease.converted == 1
    assert solo.server.seats.get(lease.lease_id).client_id == "app-1"


def test_release_checks_in(net: Network, client: LicenseClient, solo: Solo) -> None:
    """release() frees the seat on the server, never fires loss, and stops heartbeating."""
    lease = net.run(client.checkout("cad-pro"))
    net.run(lease.release())
    assert solo.server.seats.get(lease.lease_id) is None
    assert lease.released and not lease.alive and not lease.lost.called
    assert not client._loop.running
    net.run(lease.release())
    net.advance(100)
    assert not lease.lost.called


def test_checkin_by_id(net: Network, client: LicenseClient, solo: Solo) -> None:
    """A tool that kept only the id can check the lease in; an unknown id answers False."""
    lease = net.run(client.checkout("cad-pro"))
    client._forget(lease)
    assert net.run(client.checkin(lease.lease_id)) is True
    assert net.run(client.checkin(lease.lease_id)) is False


def test_status_and_push(net: Network, client: LicenseClient, make_license) -> None:
    """status() and push_license() reach the server."""
    net.run(client.checkout("cad-pro", count=2))
    doc = net.run(client.status(verbose=True))
    assert [f["in_use"] for f in doc["features"] if f["name"] == "cad-pro"] == [2]
    assert [x["count"] for x in doc["leases"]] == [2]
    assert net.run(client.push_license(make_license(2))) == 2


def test_connection_lost_mid_heartbeat_reconnects_in_the_same_round(
        net: Network, client: LicenseClient, solo: Solo) -> None:
    """A connection that dies under an outstanding heartbeat is not reused for the failover.

    Regression: the dead connection was unregistered only after AMP had failed
    its requests, so the Locate of the failover went to it too and the lease
    was not renewed until the next round.
    """
    lease = net.run(client.checkout("cad-pro"))
    net.clock.advance(5.0)
    (pump,) = net.pumps
    pump.serverIO.getOutBuffer = lambda: b""  # the server's answer never arrives
    d = Deferred.fromCoroutine(client.heartbeat_now())
    net.flush()
    pump.serverIO.loseConnection()
    net.flush()
    assert d.called
    assert lease.renewed_at == net.clock.seconds() and lease.converted == 0
    assert len(net.pumps) == 2


def test_close_is_final_even_for_a_request_in_flight(
        net: Network, client: LicenseClient) -> None:
    """After close() no connection is opened again, not even by an in-flight failover.

    Regression: a heartbeat outstanding at close() failed over, reconnected
    and renewed the lease, leaving the closed client with an open connection.
    """
    lease = net.run(client.checkout("cad-pro"))
    net.clock.advance(5.0)
    (pump,) = net.pumps
    pump.serverIO.getOutBuffer = lambda: b""  # the server's answer never arrives
    d = Deferred.fromCoroutine(client.heartbeat_now())
    net.flush()
    client.close()
    net.flush()
    assert d.called
    assert len(net.pumps) == 1 and client._connections == {}
    assert lease.renewed_at < net.clock.seconds()
    with pytest.raises(Unreachable, match="closed"):
        net.run(client.checkout("cad-pro"))


def test_close_between_locate_and_claim_ends_the_round_quietly(
        net: Network, client: LicenseClient, solo: Solo) -> None:
    """A client closed while it fails over ends that heartbeat round without an error.

    Regression: the claim after a successful Locate raised Unreachable ("the
    client is closed"), which escaped the round and was logged as a failure
    ("heartbeat round failed") by every closed client with a failover in flight.
    """
    lease = net.run(client.checkout("cad-pro"))
    solo.server.serving = False
    locate = client.locate

    async def locate_then_close():
        found = await locate()
        client.close()
        return found

    client.locate = locate_then_close
    net.run(client.heartbeat_now())
    assert lease.alive and client.closed


def test_lease_lost_when_no_server_answers_within_the_ttl(
        net: Network, client: LicenseClient) -> None:
    """With its only server gone, the lease is lost once its TTL has run out, not before."""
    lease = net.run(client.checkout("cad-pro"))
    net.cut("ls1")
    net.advance(lease.ttl - 1)
    assert lease.alive
    net.advance(lease.heartbeat + 1)
    assert lease.lost.called
    assert "no server renewed it" in str(lease.lost.result)


def test_no_member_reachable(net: Network, client: LicenseClient) -> None:
    """A checkout when nothing answers raises Unreachable, naming the cause."""
    net.cut("ls1")
    with pytest.raises(Unreachable, match="ConnectionRefusedError"):
        net.run(client.checkout("cad-pro"))


def two_members(make_solo, pki: PKI) -> tuple[Solo, Solo, Network, LicenseClient]:
    """Members ls1 and ls2 on one network, and a client homed on ls1 that knows both."""
    first = make_solo(name="ls1")
    second = make_solo(name="ls2")
    n = Network(first.clock, pki)
    n.add("ls1", first.server)
    n.add("ls2", second.server, pki.ls2_cert, pki.ls2_key)
    c = LicenseClient(n.clock, {"ls1": n.endpoint("ls1"), "ls2": n.endpoint("ls2")},
                      client_id="app-1", home="ls1")
    return first, second, n, c


def test_failover_converts_at_the_other_member(make_solo, pki: PKI) -> None:
    """When its server fails, the client claims the lease at the member that answers Locate."""
    _, second, n, c = two_members(make_solo, pki)
    lease = n.run(c.checkout("cad-pro"))
    assert lease.server == "ls1"
    n.cut("ls1")
    n.advance(lease.heartbeat + 1)
    assert lease.alive and lease.server == "ls2" and lease.converted == 1
    assert second.server.seats.get(lease.lease_id).client_id == "app-1"
    n.advance(3 * lease.ttl)
    assert lease.alive
    c.close()
    n.flush()


def test_failover_from_a_frozen_leader_whose_connections_hang(make_solo, pki: PKI) -> None:
    """A frozen member (SIGSTOP) that was the leader: the client's new connections to
    it hang and are cancelled, and the lease is still converted at the other member.

    Regression (integration test of a frozen leader): the cancelled connection
    attempt failed with ConnectingCancelledError, which was not a failover
    error, so Locate gave up at the frozen leader on every round and the
    lease was never claimed elsewhere.
    """
    _, _, n, c = two_members(make_solo, pki)
    lease = n.run(c.checkout("cad-pro"))
    assert lease.server == "ls1"
    c.leader = "ls1"
    n.freeze("ls1")
    n.advance(lease.heartbeat + 3 * c.request_timeout + 1)
    assert lease.alive and lease.server == "ls2" and lease.converted == 1
    c.close()
    n.flush()


def test_full_pool_with_a_member_without_quorum_says_no_seats(make_solo, pki: PKI) -> None:
    """NoSeats from one member outranks NoQuorum from another, whatever the order.

    Regression (pool integration test, under load): a follower that could not
    act for a moment around a change of leader was asked last, and a checkout
    from a full pool raised NoQuorum instead of NoSeats.
    """
    _, second, n, c = two_members(make_solo, pki)

    def no_quorum(feature: Any) -> None:
        raise NoQuorum("server ls2 cannot see a majority")

    second.pool.check_issue = no_quorum
    n.run(c.checkout("cad-pro", count=3))
    with pytest.raises(NoSeats):
        n.run(c.checkout("cad-pro"))
    c.close()
    n.flush()


def test_client_refuses_a_server_with_another_name(net: Network) -> None:
    """A client expecting member ls2 does not talk to a server whose certificate says ls1.

    The TLS failure counts as an unreachable member (regression: it escaped
    as a raw VerificationError, so the client never tried the other members).
    """
    c = LicenseClient(net.clock, {"ls2": net.endpoint("ls1", expect="ls2")})
    with pytest.raises(Unreachable, match="VerificationError"):
        net.run(c.checkout("cad-pro"))
    c.close()


def test_server_refuses_a_client_of_another_ca(net: Network, pki: PKI, solo: Solo) -> None:
    """A client certificate from a foreign CA gets no seat."""
    endpoint = net.endpoint("ls1", cert=pki.foreign_client_cert, key=pki.foreign_client_key)
    c = LicenseClient(net.clock, {"ls1": endpoint})
    with pytest.raises(Unreachable):
        net.run(c.checkout("cad-pro"))
    assert len(solo.server.seats) == 0
    c.close()


def test_connections_over_the_limit_are_refused_cleanly_behind_tls(
        net: Network, solo: Solo) -> None:
    """Behind TLS a connection over the limit is closed without a logged traceback.

    Regression: the factory returned None, which the TLS wrapper wrapped and
    then failed on in makeConnection.
    """
    net.servers["ls1"] = (ClientFactory(solo.server, max_connections=1), net.servers["ls1"][1])
    first = LicenseClient(net.clock, {"ls1": net.endpoint("ls1")})
    second = LicenseClient(net.clock, {"ls1": net.endpoint("ls1")})
    lease = net.run(first.checkout("cad-pro"))
    with pytest.raises(Unreachable):
        net.run(second.checkout("cad-pro"))
    net.run(lease.release())
    first.close()
    net.flush()
    assert net.run(second.checkout("cad-pro")).alive
    second.close()


def test_a_silent_server_times_out(net: Network, client: LicenseClient) -> None:
    """A server that accepts but never answers is given up after the request timeout."""
    net.run(client.call("ls1", commands.Locate))
    for pump in net.pumps:
        pump.serverIO.getOutBuffer = lambda: b""  # the server's replies never leave
    d = Deferred.fromCoroutine(client.checkout("cad-pro"))
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    net.advance(client.request_timeout + 0.5)
    assert outcome and outcome[0].check(Unreachable)


# -- the real thing: service tree, real TLS, real reactor --------------------------------


@pytest_twisted.ensureDeferred
async def test_real_tls_on_loopback(tmp_path) -> None:
    """The service built from pool.ini serves LicenseClient.from_config over real TLS.

    The heartbeat loop runs on the real reactor with a 1.5 s TTL: after more
    than a TTL the lease is still held, then release() frees it.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from licensing.config import load_config
    from licensing.sandbox import make_sandbox
    from licensing.service import build_service

    from .conftest import DurableMemoryStore

    features = {"cad-pro": {**FEATURES["cad-pro"], "lease_ttl": 1.5}}
    box = make_sandbox(tmp_path, ("ls1",), features=features, store="memory")
    service = build_service(load_config(box.ini), reactor, store=DurableMemoryStore())
    service.startService()
    client = LicenseClient.from_config(reactor, box.ini, user="carol")
    try:
        await service.ready
        lease = await client.checkout("cad-pro", "2.0")
        assert lease.heartbeat == pytest.approx(0.5)
        await deferLater(reactor, 2.0, lambda: None)
        assert lease.alive
        doc = await client.status(verbose=True)
        assert [x["lease_id"] for x in doc["leases"]] == [lease.lease_id]
        assert doc["leases"][0]["expires_at"] > reactor.seconds()
        await lease.release()
        doc = await client.status()
        assert doc["features"][0]["in_use"] == 0
    finally:
        client.close()
        await service.stopService()


def test_lease_released_while_a_heartbeat_round_waits_leaves_the_loop_clean() -> None:
    """Chaos soak seed 101069: the heartbeat loop was stopped (last lease gone) while it
    waited on a round's Deferred, started and stopped again; when the round ended,
    LoopingCall failed an internal assertion and logged an unhandled error. The round is now not the loop's to wait on."""
    import gc

    from twisted.internet import defer
    from twisted.internet.error import ConnectError
    from twisted.internet.task import Clock

    from licensing.client import Lease, LicenseClient

    pending: list[defer.Deferred] = []

    class Endpoint:
        def connect(self, factory):
            if not pending:
                d: defer.Deferred = defer.Deferred()
                pending.append(d)
                return d
            return defer.fail(ConnectError("down"))

    clock = Clock()
    client = LicenseClient(clock, {"ls1": Endpoint()}, heartbeat=1.0, user="u", host="h")
    lease = Lease(client, "a" * 32, "cad-pro", "", 1, "ls1", 60.0, 1.0)
    client.leases[lease.lease_id] = lease
    client._schedule()
    clock.advance(1.0)
    assert pending, "the round should be waiting on the connection"
    lease.released = True
    client._forget(lease)
    again = Lease(client, "b" * 32, "cad-pro", "", 1, "ls1", 60.0, 1.0)
    client.leases[again.lease_id] = again
    client._schedule()
    again.released = True
    client._forget(again)
    pending[0].errback(ConnectError("down"))
    clock.advance(5)
    gc.collect()
    assert not client._loop.running
    client.close()
