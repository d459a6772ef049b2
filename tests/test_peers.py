"""Tests for licensing.pool.peers: the peer transport over real mutual TLS.

Everything runs on the real reactor on 127.0.0.1 with OS-picked ports,
because what matters here is the interplay of Twisted's ClientService,
TLS handshakes and AMP on real sockets. The codec is a trivial stand-in
(messages are bytes, tagged with a prefix) so these tests do not depend on
the Raft message codec.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from OpenSSL import SSL
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.protocols import amp
from twisted.test import iosim
from zope.interface.verify import verifyObject

from licensing.config import Address
from licensing.errors import BadRequest, NotPeer
from licensing.interfaces import IPeerNetwork
from licensing.pki import init_ca, issue_certificate
from licensing.pool.commands import PeerMessage
from licensing.pool.peers import PeerNetwork
from licensing.responders import ClientLocator
from licensing.tls import client_tls_options, server_tls_options

RETRY_MAX = 0.2

# How a refused peer's request fails: the listener aborts the connection
# right after the handshake; if the request was already in the same TLS
# flight, the listener answers it with NOT_PEER first.
REFUSED = (NotPeer, ConnectionLost, ConnectionDone)


def encode(message: bytes) -> bytes:
    """The stand-in codec: a tag byte, then the message."""
    return b"M" + message


def decode(data: bytes) -> bytes:
    """Undo ``encode``; anything without the tag is garbage."""
    if not data.startswith(b"M"):
        raise BadRequest("not a test message")
    return data[1:]


@dataclass
class Pki:
    """A pool CA with members ls1-ls3 and a client, and a foreign CA with its own ls2."""

    root: Path
    other: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    def pair(self, name: str, directory: Path | None = None) -> tuple[Path, Path]:
        d = directory or self.root
        return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """Real certificates for the whole cast, written with licensing.pki."""
    root, other = tmp_path / "pool", tmp_path / "other"
    init_ca(root)
    for name in ("ls1", "ls2", "ls3"):
        issue_certificate(root, name)
    issue_certificate(root, "client", client=True)
    init_ca(other, common_name="some other CA")
    issue_certificate(other, "ls2")
    return Pki(root, other)


class _Slot(Factory):
    """A listener factory whose target is set later.

    Members need each other's ports before their networks exist, so the
    listeners are bound first and pointed at the networks afterwards.
    """

    noisy = False
    target: Factory | None = None

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted API
        return self.target.buildProtocol(addr) if self.target is not None else None


@dataclass
class Member:
    """One pool member under test: its network, listener and received messages."""

    name: str
    port: IListeningPort
    slot: _Slot
    network: PeerNetwork | None = None
    inbox: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port.getHost().port)

    @property
    def net(self) -> PeerNetwork:
        assert self.network is not None
        return self.network


class Cluster:
    """Members on real sockets, and everything that must be closed afterwards."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.members: list[Member] = []
        self.probes: list[Probe] = []

    async def listen(self, name: str, port: int = 0) -> Member:
        """Bind ``name``'s peer listener (TLS with its certificate) on 127.0.0.1."""
        slot = _Slot()
        options = server_tls_options(self.pki.ca, *self.pki.pair(name))
        listening = await SSL4ServerEndpoint(reactor, port, options, interface="127.0.0.1").listen(
            slot
        )
        member = Member(name, listening, slot)
        self.members.append(member)
        return member

    def start(self, member: Member, peers: dict[str, Address]) -> PeerNetwork:
        """Give ``member`` a started PeerNetwork that dials ``peers``."""
        pki = self.pki

        def tls_for(peer: str) -> Any:
            return client_tls_options(peer, pki.ca, *pki.pair(member.name))

        member.network = PeerNetwork(
            member.name,
            peers,
            tls_for,
            reactor,
            encode,
            decode,
            lambda sender, message: member.inbox.append((sender, message)),
            retry_max=RETRY_MAX,
        )
        member.slot.target = member.network.listener_factory()
        member.network.start()
        return member.network

    async def pair(self) -> tuple[Member, Member]:
        """ls1 and ls2, each listing the other, with both links up."""
        a, b = await self.listen("ls1"), await self.listen("ls2")
        self.start(a, {"ls1": a.address, "ls2": b.address})
        self.start(b, {"ls1": a.address, "ls2": b.address})
        await eventually(lambda: a.net.connected() == {"ls2"} and b.net.connected() == {"ls1"})
        return a, b

    async def stop(self, member: Member) -> None:
        """Stop ``member``'s network and close its listener."""
        if member.network is not None:
            await member.network.stop()
        await member.port.stopListening()

    async def probe(self, port: int, cert: str, directory: Path | None = None) -> Probe:
        """A bare AMP connection to ``port`` presenting ``cert`` (expecting to reach ls1)."""
        options = client_tls_options("ls1", self.pki.ca, *self.pki.pair(cert, directory))
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port, options)
        probe = await connectProtocol(endpoint, Probe())
        self.probes.append(probe)
        return probe

    async def close(self) -> None:
        """Stop every network and listener, and close every probe connection."""
        for probe in self.probes:
            if probe.transport is not None and not probe.closed.called:
                probe.transport.abortConnection()
        await defer.gatherResults([p.closed for p in self.probes])
        for member in self.members:
            if member.port.connected:
                await self.stop(member)
            elif member.network is not None:
                await member.network.stop()


class Probe(amp.AMP):
    """A raw AMP client, to talk to a peer listener the way an intruder would."""

    def __init__(self) -> None:
        super().__init__()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted API
        super().connectionLost(reason)
        self.closed.callback(None)


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Let the reactor run until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.async_yield_fixture
async def cluster(pki: Pki) -> AsyncIterator[Cluster]:
    """A Cluster that is closed after the test, whatever happened."""
    c = Cluster(pki)
    try:
        yield c
    finally:
        await c.close()


@pytest_twisted.ensureDeferred
async def test_messages_flow_both_ways(cluster: Cluster) -> None:
    """Two members deliver each other's messages, named by the sender's certificate."""
    a, b = await cluster.pair()
    a.net.send("ls2", b"vote for me")
    b.net.send("ls1", b"granted")
    await eventually(lambda: bool(a.inbox and b.inbox))
    assert b.inbox == [("ls1", b"vote for me")]
    assert a.inbox == [("ls2", b"granted")]
    await eventually(lambda: a.net.stats["sent"] == 1 and b.net.stats["received"] == 1)
    assert a.net.stats["dropped"] == a.net.stats["failed"] == a.net.stats["rejected"] == 0


@pytest_twisted.ensureDeferred
async def test_messages_arrive_in_order(cluster: Cluster) -> None:
    """Messages on one link arrive in the order they were sent."""
    a, b = await cluster.pair()
    for i in range(50):
        a.net.send("ls2", str(i).encode())
    await eventually(lambda: len(b.inbox) == 50)
    assert [m for _, m in b.inbox] == [str(i).encode() for i in range(50)]


@pytest_twisted.ensureDeferred
async def test_large_payload_arrives_intact(cluster: Cluster) -> None:
    """A 3 MB message (a snapshot) crosses the 64 KiB AMP value limit in chunks."""
    a, b = await cluster.pair()
    snapshot = os.urandom(3 * 1024 * 1024)
    a.net.send("ls2", snapshot)
    await eventually(lambda: bool(b.inbox), timeout=5.0)
    assert b.inbox == [("ls1", snapshot)]
    await eventually(lambda: a.net.stats["sent"] == 1 and a.net.stats["failed"] == 0)


def test_send_without_a_link_drops() -> None:
    """The network provides IPeerNetwork; sending without a live link drops and counts."""
    network = PeerNetwork(
        "ls1",
        {"ls2": Address("127.0.0.1", 9)},
        lambda peer: None,  # type: ignore[arg-type, return-value]
        reactor,
        encode,
        decode,
        lambda sender, message: None,
    )
    assert verifyObject(IPeerNetwork, network)
    network.send("ls2", b"hello")
    network.send("nobody", b"hello")
    assert network.stats["dropped"] == 2
    assert network.stats["sent"] == 0
    assert network.connected() == set()


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_unencodable_message_is_logged_not_raised(
    cluster: Cluster, logged_errors: list[dict[str, Any]]
) -> None:
    """A message the codec cannot encode is a bug: logged as a failure, never raised."""
    a, b = await cluster.pair()
    a.net.send("ls2", "not bytes")  # type: ignore[arg-type]
    assert a.net.stats["failed"] == 1
    assert [e["log_failure"].type for e in logged_errors] == [TypeError]
    a.net.send("ls2", b"still works")
    await eventually(lambda: bool(b.inbox))
    assert b.inbox == [("ls1", b"still works")]


@pytest_twisted.ensureDeferred
async def test_garbage_payload_is_refused_and_connection_survives(cluster: Cluster) -> None:
    """An identified member's undecodable message gets BAD_REQUEST; good ones still flow."""
    a = await cluster.listen("ls1")
    cluster.start(a, {"ls2": Address("127.0.0.1", 9)})
    probe = await cluster.probe(a.port.getHost().port, "ls2")
    with pytest.raises(BadRequest):
        await probe.callRemote(PeerMessage, payload=b"garbage").addTimeout(3, reactor)
    assert a.inbox == []
    await probe.callRemote(PeerMessage, payload=b"Mfine").addTimeout(3, reactor)
    assert a.inbox == [("ls2", b"fine")]
    assert a.net.stats["rejected"] == 1


async def _assert_refused(
    member: Member, probe: Probe, errors: tuple[type[Exception], ...] = REFUSED
) -> None:
    """The probe's message is not delivered and its connection is closed by the listener."""
    with pytest.raises(errors):
        await probe.callRemote(PeerMessage, payload=b"Mlet me in").addTimeout(3, reactor)
    await probe.closed.addTimeout(3, reactor)
    await eventually(lambda: not member.net._incoming)
    assert member.inbox == []
    assert member.net.stats["received"] == 0


@pytest_twisted.ensureDeferred
async def test_client_certificate_is_refused(cluster: Cluster) -> None:
    """A client certificate (clientAuth only) from the pool CA cannot speak as a member."""
    a = await cluster.listen("ls1")
    cluster.start(a, {"ls2": Address("127.0.0.1", 9)})
    with capturedLogs() as events:
        probe = await cluster.probe(a.port.getHost().port, "client")
        await _assert_refused(a, probe)
    assert a.net.stats["rejected"] >= 1
    assert any("refused a peer connection" in e["log_format"] for e in events)


@pytest_twisted.ensureDeferred
async def test_member_not_in_peers_is_refused(cluster: Cluster) -> None:
    """A valid member certificate for a name ls1 was not configured with is refused."""
    a = await cluster.listen("ls1")
    cluster.start(a, {"ls2": Address("127.0.0.1", 9)})
    probe = await cluster.probe(a.port.getHost().port, "ls3")
    await _assert_refused(a, probe)
    assert a.net.stats["rejected"] >= 1


@pytest_twisted.ensureDeferred
async def test_own_name_is_refused(cluster: Cluster) -> None:
    """A connection presenting our own certificate is not a peer."""
    a = await cluster.listen("ls1")
    cluster.start(a, {"ls2": Address("127.0.0.1", 9)})
    probe = await cluster.probe(a.port.getHost().port, "ls1")
    await _assert_refused(a, probe)


@pytest_twisted.ensureDeferred
async def test_foreign_ca_cannot_connect(cluster: Cluster) -> None:
    """A certificate naming a real member but signed by another CA fails the handshake."""
    a = await cluster.listen("ls1")
    cluster.start(a, {"ls2": Address("127.0.0.1", 9)})
    probe = await cluster.probe(a.port.getHost().port, "ls2", cluster.pki.other)
    await _assert_refused(a, probe, (SSL.Error,))
    assert a.net.stats["rejected"] == 0


@pytest_twisted.ensureDeferred
async def test_link_to_impostor_never_comes_up(cluster: Cluster) -> None:
    """A listener at ls2's address presenting ls3's certificate is not ls2: no link, drops."""
    a, impostor = await cluster.listen("ls1"), await cluster.listen("ls3")
    cluster.start(a, {"ls2": impostor.address})
    cluster.start(impostor, {"ls1": a.address})
    await deferLater(reactor, 3 * RETRY_MAX, lambda: None)
    assert a.net.connected() == set()
    a.net.send("ls2", b"secret")
    assert a.net.stats["dropped"] == 1
    assert impostor.inbox == []


@pytest_twisted.ensureDeferred
async def test_stop_leaves_nothing_behind(cluster: Cluster) -> None:
    """After stop() and closing the listeners: no links, sockets or delayed calls of ours."""
    calls_before = set(reactor.getDelayedCalls())
    readers_before = set(reactor.getReaders())
    writers_before = set(reactor.getWriters())
    a, b = await cluster.pair()
    # Requests in flight hold timeouts; stop must cancel them too.
    a.net.send("ls2", os.urandom(1024 * 1024))
    b.net.send("ls1", b"hello")
    await cluster.stop(a)
    await cluster.stop(b)
    assert a.net.connected() == set() and b.net.connected() == set()
    assert not a.net._incoming and not b.net._incoming and not a.net._outgoing
    # Let callLater(0) bookkeeping from closing sockets run.
    await eventually(
        lambda: not (set(reactor.getDelayedCalls()) - calls_before)
        and set(reactor.getReaders()) <= readers_before
        and set(reactor.getWriters()) <= writers_before,
        timeout=2.0,
    )


@pytest_twisted.ensureDeferred
async def test_stopped_network_refuses_new_connections(cluster: Cluster) -> None:
    """A listener still bound after stop() hands nothing to a stopped network."""
    a = await cluster.listen("ls1")
    network = cluster.start(a, {"ls2": Address("127.0.0.1", 9)})
    await network.stop()
    endpoint = SSL4ClientEndpoint(
        reactor,
        "127.0.0.1",
        a.port.getHost().port,
        client_tls_options("ls1", cluster.pki.ca, *cluster.pki.pair("ls2")),
    )
    with pytest.raises((ConnectionLost, ConnectionDone, SSL.Error)):
        probe = await connectProtocol(endpoint, Probe())
        cluster.probes.append(probe)
        await probe.callRemote(PeerMessage, payload=b"Mhello").addTimeout(3, reactor)
    assert a.inbox == []


@pytest_twisted.ensureDeferred
async def test_reconnects_after_peer_restart(cluster: Cluster) -> None:
    """When ls2 restarts on the same port, ls1's link comes back and messages flow again."""
    a, b = await cluster.pair()
    port = b.port.getHost().port
    await cluster.stop(b)
    await eventually(lambda: a.net.connected() == set())
    a.net.send("ls2", b"into the void")
    assert a.net.stats["dropped"] == 1

    b2 = await cluster.listen("ls2", port)
    cluster.start(b2, {"ls1": a.address})
    await eventually(lambda: a.net.connected() == {"ls2"} and b2.net.connected() == {"ls1"})
    a.net.send("ls2", b"welcome back")
    b2.net.send("ls1", b"thanks")
    await eventually(lambda: bool(b2.inbox) and len(a.inbox) == 1)
    assert b2.inbox == [("ls1", b"welcome back")]
    assert a.inbox == [("ls2", b"thanks")]
    assert b.inbox == []


def test_client_listener_does_not_serve_peer_commands() -> None:
    """The client listener's locator has no responder for peer commands."""
    locator = ClientLocator(None, None)  # type: ignore[arg-type]
    assert locator.locateResponder(PeerMessage.commandName) is None


def test_unidentified_connection_gets_not_peer() -> None:
    """A message on a connection whose handshake never identified a member gets NOT_PEER.

    In memory and without TLS, so the handshake (and identification) never
    happens: this is the responder's own guard, not the abort after a bad
    certificate.
    """
    inbox: list[tuple[str, object]] = []
    network = PeerNetwork(
        "ls1",
        {"ls2": Address("127.0.0.1", 9)},
        lambda peer: None,  # type: ignore[arg-type, return-value]
        Clock(),
        encode,
        decode,
        lambda sender, message: inbox.append((sender, message)),
    )
    factory = network.listener_factory()
    client, _server, pump = iosim.connectedServerAndClient(
        lambda: factory.buildProtocol(None), amp.AMP
    )
    failure: list[Any] = []
    client.callRemote(PeerMessage, payload=b"Mhello").addErrback(failure.append)
    pump.flush()
    assert failure and failure[0].check(NotPeer)
    assert inbox == []
    assert network.stats["rejected"] == 1
