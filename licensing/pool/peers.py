"""The pool's peer transport: consensus messages over mutual-TLS AMP.

Every member keeps one outgoing link to each other member and accepts the
others' links on its peer listener, so a pair of members talks over two
connections, each carrying messages one way. That keeps the transport as
dumb as the consensus core needs it: ``send`` is fire and forget, a message
to a member without a live link is dropped, and whatever arrives is handed
to ``deliver`` with the sender's name. Raft retries on its own schedule, so
nothing here queues or resends.

Who sent a message is decided once per connection, after the TLS handshake,
from the certificate (:mod:`licensing.tls`): it must come from the pool CA,
carry serverAuth (members do, clients do not) and name exactly one pool
member other than us. Anything else is dropped before it can say a word.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from ..config import Address
from ..errors import BadRequest, NotPeer
from ..interfaces import IPeerNetwork
from ..tls import peer_is_server, peer_names
from .commands import PeerMessage

__all__ = ["PeerNetwork"]

log = Logger()

# First retry soon (a member that restarts is back within a fraction of a
# second), then back off to the caller's ceiling.
_RETRY_INITIAL = 0.05


@implementer(IPeerNetwork)
class PeerNetwork:
    """Links to the other pool members, and the listener side for theirs.

    ``peers`` maps member names to their peer-listener addresses; our own
    name may be in it and is skipped. ``tls_for(member)`` gives the client
    TLS options that present our certificate and verify that the server's
    names ``member``. ``encode``/``decode`` are the message codec (``decode``
    raises ``BadRequest`` on garbage); ``deliver(sender, message)`` receives
    every message that arrives from an identified member.

    ``stats`` counts messages ``sent`` (handed to a live link), ``dropped``
    (no live link), ``failed`` (sent but not acknowledged: timeout, lost
    connection, refused by the peer), ``received`` (delivered) and
    ``rejected`` (incoming connections refused and incoming messages refused).
    """

    def __init__(
        self,
        name: str,
        peers: Mapping[str, Address],
        tls_for: Callable[[str], IOpenSSLClientConnectionCreator],
        reactor: Any,
        encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any],
        deliver: Callable[[str, Any], None],
        request_timeout: float = 2.0,
        retry_max: float = 1.0,
    ) -> None:
        self.name = name
        self.stats = {"sent": 0, "dropped": 0, "failed": 0, "received": 0, "rejected": 0}
        self._members = frozenset(peers) | {name}
        self._peers = {member: address for member, address in peers.items() if member != name}
        self._tls_for = tls_for
        self._reactor = reactor
        self._encode = encode
        self._decode = decode
        self._deliver = deliver
        self._request_timeout = request_timeout
        self._retry_max = retry_max
        self._running = False
        self._stopped = False
        self._services: dict[str, ClientService] = {}
        self._outgoing: set[_OutgoingLink] = set()
        self._links: dict[str, _OutgoingLink] = {}
        self._incoming: set[_IncomingPeer] = set()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start dialling every other member; links come up as they answer."""
        if self._running:
            return
        self._running = True
        self._stopped = False
        for member, address in sorted(self._peers.items()):
            # ClientService wraps our protocol in a proxy that only provides
            # IProtocol, so with an SSL endpoint the TLS layer could not tell
            # the link that its handshake completed. Putting TLS inside the
            # factory instead makes our protocol the TLS layer's direct child.
            tls = TLSMemoryBIOFactory(
                self._tls_for(member), True, _OutgoingFactory(self, member), self._reactor
            )
            service = ClientService(
                _endpoint(self._reactor, address),
                tls,
                retryPolicy=backoffPolicy(initialDelay=_RETRY_INITIAL, maxDelay=self._retry_max),
                clock=self._reactor,
            )
            self._services[member] = service
            service.startService()

    def stop(self) -> Deferred[None]:
        """Stop dialling and close every link, ours and the peers'.

        Fires once every connection is closed. Connections are aborted, not
        closed politely: messages in flight are lost, which the consensus
        core tolerates, and a stalled peer cannot hold up a shutdown.
        """
        self._running = False
        self._stopped = True
        waits: list[Deferred[Any]] = [service.stopService() for service in self._services.values()]
        self._services.clear()
        waits.extend(incoming.closed for incoming in self._incoming)
        for connection in [*self._outgoing, *self._incoming]:
            connection.transport.abortConnection()
        return gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    # -- sending -----------------------------------------------------------------

    def send(self, to: str, message: object) -> None:
        """Send ``message`` to member ``to`` if its link is up; otherwise drop it.

        Never raises and never waits: the answer (or its absence) is only
        counted, because Raft learns about delivery from the reply messages.
        """
        link = self._links.get(to)
        if link is None:
            self.stats["dropped"] += 1
            return
        try:
            d = link.callRemote(PeerMessage, payload=self._encode(message))
        except Exception:
            # Our own message could not be encoded or is over the size
            # limit: a bug in the caller, not a network condition.
            self.stats["failed"] += 1
            log.failure("cannot send {kind} to {peer}", kind=type(message).__name__, peer=to)
            return
        self.stats["sent"] += 1
        d.addTimeout(self._request_timeout, self._reactor)
        d.addErrback(self._send_failed, to)

    def _send_failed(self, failure: Failure, to: str) -> None:
        self.stats["failed"] += 1
        log.debug("message to {peer} failed: {error}", peer=to, error=failure.getErrorMessage())

    def connected(self) -> set[str]:
        """Members whose outgoing link has completed its TLS handshake."""
        return set(self._links)

    # -- receiving ---------------------------------------------------------------

    def listener_factory(self) -> Factory:
        """The protocol factory for this member's peer listener (a TLS endpoint)."""
        return _ListenerFactory(self)

    def _identify(self, transport: Any) -> str | None:
        """The member a freshly handshaken incoming connection belongs to, or None.

        A certificate naming two members (or us and another) is refused as
        ambiguous rather than guessed at.
        """
        named = peer_names(transport) & self._members
        if len(named) == 1 and self.name not in named and peer_is_server(transport):
            return next(iter(named))
        return None

    # -- link bookkeeping (called by the protocols) ------------------------------

    def _link_up(self, member: str, link: _OutgoingLink) -> None:
        self._links[member] = link
        log.info("peer link to {peer} is up", peer=member)

    def _link_down(self, member: str, link: _OutgoingLink) -> None:
        self._outgoing.discard(link)
        if self._links.get(member) is link:
            del self._links[member]
            log.info("peer link to {peer} is down", peer=member)


def _endpoint(reactor: Any, address: Address) -> IStreamClientEndpoint:
    """A TCP endpoint for ``address``; IP literals skip the resolver thread."""
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return HostnameEndpoint(reactor, address.host, address.port)
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, address.host, address.port)
    return TCP4ClientEndpoint(reactor, address.host, address.port)


@implementer(IHandshakeListener)
class _OutgoingLink(amp.AMP):
    """Our connection to one member's peer listener. It only calls; it answers nothing."""

    def __init__(self, network: PeerNetwork, member: str) -> None:
        super().__init__()
        self._network = network
        self._member = member

    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        super().connectionMade()
        self._network._outgoing.add(self)

    def handshakeCompleted(self) -> None:  # noqa: N802 - Twisted API
        self._network._link_up(self._member, self)

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 - Twisted API
        super().connectionLost(reason)
        self._network._link_down(self._member, self)


class _OutgoingFactory(Factory):
    noisy = False

    def __init__(self, network: PeerNetwork, member: str) -> None:
        self._network = network
        self._member = member

    def buildProtocol(self, addr: Any) -> _OutgoingLink:  # noqa: N802 - Twisted API
        return _OutgoingLink(self._network, self._member)


@implementer(IHandshakeListener)
class _IncomingPeer(amp.AMP):
    """A member's link to our peer listener: serves ``PeerMessage`` and nothing else."""

    def __init__(self, network: PeerNetwork) -> None:
        super().__init__()
        self._network = network
        self.sender: str | None = None
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        super().connectionMade()
        if self._network._stopped:
            # After stop() nothing new may reach the consensus core. (The
            # factory cannot just return None: the TLS wrapper does not
            # expect that.)
            self.transport.abortConnection()
            return
        self._network._incoming.add(self)

    def handshakeCompleted(self) -> None:  # noqa: N802 - Twisted API
        network = self._network
        if network._stopped:
            return
        self.sender = network._identify(self.transport)
        if self.sender is None:
            network.stats["rejected"] += 1
            log.warn(
                "refused a peer connection from {address}: certificate names {names} "
                "(server certificate: {server}), expected exactly one of {members}",
                address=str(self.transport.getPeer()),
                names=sorted(peer_names(self.transport)),
                server=peer_is_server(self.transport),
                members=sorted(network._peers),
            )
            self.transport.abortConnection()

    @PeerMessage.responder
    def peer_message(self, payload: bytes) -> dict[str, Any]:
        network = self._network
        if self.sender is None:
            network.stats["rejected"] += 1
            raise NotPeer("this connection is not identified as a pool member")
        try:
            message = network._decode(payload)
        except BadRequest:
            network.stats["rejected"] += 1
            log.warn("undecodable message from {peer}", peer=self.sender)
            raise
        network.stats["received"] += 1
        network._deliver(self.sender, message)
        return {}

    def connectionLost(self, reason: Failure) -> None:  # noqa: N802 - Twisted API
        super().connectionLost(reason)
        self._network._incoming.discard(self)
        self.closed.callback(None)


class _ListenerFactory(Factory):
    noisy = False

    def __init__(self, network: PeerNetwork) -> None:
        self._network = network

    def buildProtocol(self, addr: Any) -> _IncomingPeer:  # noqa: N802 - Twisted API
        return _IncomingPeer(self._network)
