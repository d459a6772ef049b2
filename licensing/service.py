"""Wires one member's service tree from injected parts.

``build_service`` is pure: the reactor, the store and the random source come
in, so tests can pass a ``MemoryReactorClock`` or a real reactor with a memory
store without patching anything.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.logger import Logger
from twisted.web.server import Site

from .config import Address, PoolSettings, ServerSettings
from .errors import LicensingError
from .interfaces import ILicenseStore, IPool
from .pool.solo import SoloPool
from .responders import ClientFactory
from .server import LicenseServer
from .tls import server_tls_options
from .vendor import load_public_key
from .web.status import status_resource

log = Logger()


def tls_server_endpoint(reactor: Any, address: Address, settings: PoolSettings,
                        member: ServerSettings) -> SSL4ServerEndpoint:
    """A mutual-TLS listening endpoint with this member's identity."""
    options = server_tls_options(settings.ca, member.cert, member.key)
    return SSL4ServerEndpoint(reactor, address.port, options, interface=address.host)


class LicenseService(MultiService):
    """Starts the license server (store, license, pool) beside its listeners.

    The listeners come up at once and answer NotServing until the server is
    ready, so a client never waits on a connect timeout during a restart.
    """

    def __init__(self, server: LicenseServer, pool: IPool, license_file: bytes | None,
                 reactor: Any) -> None:
        super().__init__()
        self.server = server
        self.pool = pool
        self.license_file = license_file
        self.reactor = reactor
        self.ready: Deferred[None] | None = None

    def startService(self) -> None:  # noqa: N802 - Twisted API
        super().startService()
        self.ready = Deferred.fromCoroutine(self.server.start(self.pool, self.license_file))
        self.ready.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        if failure.check(LicensingError):
            log.critical("license server cannot start: {error}", error=str(failure.value))
        else:
            log.failure("license server cannot start", failure)
        self.reactor.stop()

    def stopService(self) -> Deferred[None] | None:  # noqa: N802 - Twisted API
        self.server.stop()
        self.pool.stop()
        d = super().stopService()
        closed = self.server.store.close
        if d is None:
            return closed()
        return d.addCallback(lambda _: closed())


def build_service(
    settings: PoolSettings,
    reactor: Any,
    store: ILicenseStore | None = None,
    name: str | None = None,
    rng: random.Random | None = None,
) -> MultiService:
    """The whole service tree of member ``name`` of the pool in ``settings``."""
    from .store import open_store

    member = settings.server(name)
    rng = rng or random.SystemRandom()
    vendor_key = load_public_key(settings.vendor_key)
    if store is None:
        store = open_store(member.store, reactor)
    server = LicenseServer(member.name, store, reactor, rng, vendor_key,
                           client_heartbeat=settings.timings.client_heartbeat)
    pool, peer_factory = make_pool(settings, member, server, reactor, rng)
    license_file = settings.license.read_bytes() if settings.license else None
    root = LicenseService(server, pool, license_file, reactor)
    if peer_factory is not None:
        StreamServerEndpointService(
            tls_server_endpoint(reactor, member.peer_listen, settings, member), peer_factory
        ).setServiceParent(root)
    StreamServerEndpointService(
        tls_server_endpoint(reactor, member.client_listen, settings, member), ClientFactory(server)
    ).setServiceParent(root)
    if member.http is not None:
        StreamServerEndpointService(
            TCP4ServerEndpoint(reactor, member.http.port, interface=member.http.host),
            Site(status_resource(server)),
        ).setServiceParent(root)
    return root


def make_pool(settings: PoolSettings, member: ServerSettings, server: LicenseServer,
              reactor: Any, rng: random.Random) -> tuple[IPool, Any]:
    """The member's pool, and the factory for its peer listener (None in a pool of one)."""
    if len(settings.members) == 1:
        return SoloPool(server, member.client), None
    from .pool.peers import PeerNetwork
    from .pool.peer_codec import tagged_codec
    from .pool.replicated import ReplicatedPool
    from .tls import client_tls_options

    encode, decode = tagged_codec()
    peers = {name: s.peer for name, s in settings.servers.items() if name != member.name}

    def tls_for(name: str) -> Any:
        return client_tls_options(name, settings.ca, member.cert, member.key)

    def network_factory(deliver: Any) -> PeerNetwork:
        return PeerNetwork(member.name, peers, tls_for, reactor, encode, decode, deliver,
                           request_timeout=settings.timings.request_timeout)

    pool = ReplicatedPool(
        server,
        {name: s.client for name, s in settings.servers.items()},
        settings.timings,
        reactor,
        rng,
        network_factory,
        preference={name: s.preference for name, s in settings.servers.items()},
    )
    return pool, pool.network.listener_factory()
