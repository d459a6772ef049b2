"""Tests for licensing.tls: mutual TLS between members and clients, and peer identity.

Most tests run real TLS handshakes in memory (TLSMemoryBIOFactory over
iosim pumps driven by one Clock); one test uses the real reactor on
127.0.0.1 to prove the options work with Twisted's SSL endpoints.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import VerificationError, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from licensing.errors import PKIError
from licensing.pki import init_ca, issue_certificate
from licensing.tls import (
    client_tls_options,
    load_trust_root,
    peer_is_server,
    peer_names,
    server_tls_options,
)

_ADDRESS = IPv4Address("TCP", "127.0.0.1", 0)


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """Records what one end of a connection saw; the server end echoes.

    The client end writes ``greeting`` once its handshake completes, the way
    a real client would send its first command.
    """

    def __init__(self, echo: bool = False, greeting: bytes = b"") -> None:
        self.echo = echo
        self.greeting = greeting
        self.handshake_done = False
        self.received = b""
        self.lost: Failure | None = None
        self.names_at_handshake: frozenset[str] | None = None
        self.done: defer.Deferred[None] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.names_at_handshake = peer_names(self.transport)
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.echo:
            self.transport.write(data)
        elif self.received == self.greeting:
            self.done.callback(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason
        self.closed.callback(None)


@dataclass
class Link:
    """Both ends of an in-memory TLS connection."""

    server: Recorder
    client: Recorder
    server_tls: TLSMemoryBIOProtocol
    client_tls: TLSMemoryBIOProtocol
    pump: iosim.IOPump


def connect_in_memory(server_options: object, client_options: object) -> Link:
    """Run a TLS handshake between the two option sets and pump until quiet."""
    clock = Clock()
    # Keep our own references: TLSMemoryBIOProtocol drops its wrapped
    # protocol when the connection is lost, which is what refusals do.
    server, client = Recorder(echo=True), Recorder(greeting=b"hello")
    server_factory = TLSMemoryBIOFactory(
        server_options, False, Factory.forProtocol(lambda: server), clock
    )
    client_factory = TLSMemoryBIOFactory(
        client_options, True, Factory.forProtocol(lambda: client), clock
    )
    server_tls = server_factory.buildProtocol(_ADDRESS)
    client_tls = client_factory.buildProtocol(_ADDRESS)
    pump = iosim.connect(
        server_tls,
        iosim.makeFakeServer(server_tls),
        client_tls,
        iosim.makeFakeClient(client_tls),
        greet=False,
        clock=clock,
    )
    for _ in range(20):
        pump.flush()
    return Link(server, client, server_tls, client_tls, pump)


@dataclass
class Pki:
    """A pool CA directory with two members and a client, plus a foreign CA."""

    root: Path
    other: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    def pair(self, name: str, directory: Path | None = None) -> tuple[Path, Path]:
        d = directory or self.root
        return d / f"{name}.pem", d / f"{name}.key"

    def server(self, name: str = "ls1") -> object:
        return server_tls_options(self.ca, *self.pair(name))

    def client(
        self, server_name: str = "ls1", name: str = "client", directory: Path | None = None
    ) -> object:
        return client_tls_options(server_name, self.ca, *self.pair(name, directory))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """Certificates for ls1, ls2 and a client from one CA, and an intruder from another."""
    root, other = tmp_path / "pool", tmp_path / "other"
    init_ca(root)
    issue_certificate(root, "ls1")
    issue_certificate(root, "ls2")
    issue_certificate(root, "client", client=True)
    init_ca(other, common_name="some other CA")
    issue_certificate(other, "client", client=True)
    return Pki(root, other)


@pytest.fixture
def no_deprecations() -> Iterator[None]:
    """Fail the test on any DeprecationWarning (pyOpenSSL object paths are deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


def test_client_with_ca_signed_certificate_exchanges_bytes(pki: Pki, no_deprecations: None) -> None:
    """A client with a certificate from the pool CA connects to ls1 and gets its echo back."""
    link = connect_in_memory(pki.server(), pki.client("ls1"))
    assert link.server.handshake_done and link.client.handshake_done
    assert link.server.received == b"hello"
    assert link.client.received == b"hello"
    assert link.server.lost is None and link.client.lost is None


def test_server_sees_client_identity(pki: Pki) -> None:
    """After the handshake the server reads the client's name from its certificate SANs."""
    link = connect_in_memory(pki.server(), pki.client("ls1"))
    assert link.server.names_at_handshake == {"client", "localhost"}
    assert peer_names(link.server.transport) == {"client", "localhost"}
    assert not peer_is_server(link.server.transport)


def test_server_sees_only_the_client_name_when_issued_without_hosts(pki: Pki) -> None:
    """A client certificate issued with no extra hosts is identified exactly as {'client'}."""
    issue_certificate(pki.root, "client", client=True, hosts=())
    link = connect_in_memory(pki.server(), pki.client("ls1"))
    assert peer_names(link.server.transport) == {"client"}


def test_member_to_member_identity(pki: Pki) -> None:
    """ls2 dialling ls1 is seen as a server certificate naming ls2, and vice versa."""
    link = connect_in_memory(pki.server("ls1"), pki.client("ls1", name="ls2"))
    assert link.server.received == b"hello"
    assert "ls2" in peer_names(link.server.transport)
    assert peer_is_server(link.server.transport)
    assert "ls1" in peer_names(link.client.transport)
    assert peer_is_server(link.client.transport)


def _assert_refused(link: Link) -> None:
    """Neither application saw data and the server never accepted the handshake."""
    assert not link.server.handshake_done
    assert link.server.received == b""
    assert link.client.received == b""
    assert link.server.lost is not None
    assert link.client.lost is not None


def test_client_certificate_from_other_ca_is_refused(pki: Pki) -> None:
    """A client certificate signed by a different CA fails the handshake; no data flows."""
    link = connect_in_memory(pki.server(), pki.client("ls1", directory=pki.other))
    _assert_refused(link)
    link.server.lost.trap(SSL.Error)


def test_client_without_certificate_is_refused(pki: Pki) -> None:
    """A client that presents no certificate at all is refused."""
    anonymous = optionsForClientTLS("ls1", trustRoot=load_trust_root(pki.ca))
    link = connect_in_memory(pki.server(), anonymous)
    _assert_refused(link)
    link.server.lost.trap(SSL.Error)


def test_client_refuses_server_with_wrong_name(pki: Pki) -> None:
    """A client that expects ls2 refuses a server whose certificate only names ls1."""
    link = connect_in_memory(pki.server("ls1"), pki.client("ls2"))
    assert not link.client.handshake_done
    _assert_refused(link)
    link.client.lost.trap(VerificationError)


def test_client_refuses_server_from_other_ca(pki: Pki) -> None:
    """A server whose certificate comes from another CA is refused by the client."""
    issue_certificate(pki.other, "ls1")
    rogue = server_tls_options(pki.other / "ca.pem", *pki.pair("ls1", pki.other))
    link = connect_in_memory(rogue, pki.client("ls1"))
    assert not link.client.handshake_done
    _assert_refused(link)
    link.client.lost.trap(SSL.Error)


def test_client_certificate_cannot_serve(pki: Pki) -> None:
    """A --client certificate (clientAuth only) cannot pose as a member's server certificate.

    OpenSSL checks the purpose: a server certificate needs serverAuth.
    """
    issue_certificate(pki.root, "ls1", client=True)
    link = connect_in_memory(pki.server("ls1"), pki.client("ls1"))
    assert not link.client.handshake_done
    _assert_refused(link)
    link.client.lost.trap(SSL.Error)


def test_peer_names_without_tls_is_empty() -> None:
    """A plain transport has no peer certificate: no names, not a server."""
    transport = StringTransport()
    assert peer_names(transport) == frozenset()
    assert not peer_is_server(transport)


def test_peer_names_before_handshake_is_empty(pki: Pki) -> None:
    """A TLS transport whose handshake has not run yet reports no names."""
    factory = TLSMemoryBIOFactory(pki.server(), False, Factory.forProtocol(Recorder), Clock())
    tls = factory.buildProtocol(_ADDRESS)
    tls.makeConnection(StringTransport())
    assert peer_names(tls) == frozenset()
    assert not peer_is_server(tls)


def test_load_trust_root_missing_file(tmp_path: Path) -> None:
    """A missing CA file is named, with how to create it."""
    with pytest.raises(PKIError, match=r"ca\.pem: no such file; create it with `licensectl pki"):
        load_trust_root(tmp_path / "ca.pem")


def test_load_trust_root_not_pem(tmp_path: Path) -> None:
    """A CA file that is not PEM is named and described."""
    path = tmp_path / "ca.pem"
    path.write_bytes(b"\x00\x01garbage")
    with pytest.raises(PKIError, match=r"ca\.pem: not a PEM certificate"):
        load_trust_root(path)


def test_load_trust_root_refuses_leaf_certificate(pki: Pki) -> None:
    """Configuring a member's certificate as the CA is caught at load time."""
    with pytest.raises(PKIError, match=r"ls1\.pem: .* is not a CA certificate"):
        load_trust_root(pki.root / "ls1.pem")


def test_trust_bundle_with_two_cas_accepts_both(pki: Pki) -> None:
    """A CA file holding old and new CA (rotation) admits clients of either."""
    bundle = pki.root / "bundle.pem"
    bundle.write_bytes(pki.ca.read_bytes() + (pki.other / "ca.pem").read_bytes())
    server = server_tls_options(bundle, *pki.pair("ls1"))
    for directory in (pki.root, pki.other):
        link = connect_in_memory(server, pki.client("ls1", directory=directory))
        assert link.server.received == b"hello", directory


def test_server_options_refuse_mismatched_key(pki: Pki) -> None:
    """A certificate configured with another member's key is refused, naming both files."""
    with pytest.raises(PKIError, match=r"ls2\.key: key does not match certificate .*ls1\.pem"):
        server_tls_options(pki.ca, pki.root / "ls1.pem", pki.root / "ls2.key")


def test_client_options_missing_certificate(pki: Pki) -> None:
    """A missing client certificate file is named, with how to create it."""
    with pytest.raises(
        PKIError, match=r"nobody\.pem: no such file; create it with `licensectl pki issue"
    ):
        client_tls_options("ls1", pki.ca, pki.root / "nobody.pem", pki.root / "nobody.key")


def test_readable_key_is_loaded_with_a_warning(pki: Pki) -> None:
    """A key other users can read still works, but the operator is told to chmod it."""
    key = pki.root / "ls1.key"
    key.chmod(0o644)
    with capturedLogs() as events:
        pki.server("ls1")
    warnings_ = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings_) == 1
    assert warnings_[0]["path"] == str(key)
    assert "chmod 600" in warnings_[0]["log_format"]


@pytest_twisted.ensureDeferred
async def test_real_reactor_mutual_tls(pki: Pki) -> None:
    """Over real sockets on 127.0.0.1 the options give an authenticated echo and identities."""
    from twisted.internet import reactor

    servers: list[Recorder] = []

    def make_server() -> Recorder:
        protocol = Recorder(echo=True)
        servers.append(protocol)
        return protocol

    port = await SSL4ServerEndpoint(reactor, 0, pki.server(), interface="127.0.0.1").listen(
        Factory.forProtocol(make_server)
    )
    client: Recorder | None = None
    try:
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, pki.client("ls1"))
        client = await endpoint.connect(Factory.forProtocol(lambda: Recorder(greeting=b"hello")))
        await client.done.addTimeout(5, reactor)
        assert client.received == b"hello"
        assert "ls1" in peer_names(client.transport)
        assert peer_is_server(client.transport)
        assert servers[0].names_at_handshake == {"client", "localhost"}
        assert not peer_is_server(servers[0].transport)
    finally:
        if client is not None:
            client.transport.loseConnection()
        for server in servers:
            server.transport.abortConnection()
        await port.stopListening()
        closing = [p.closed for p in servers] + ([client.closed] if client is not None else [])
        await defer.gatherResults(closing).addTimeout(5, reactor)
