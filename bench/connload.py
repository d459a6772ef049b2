"""A fleet of client connections, one logical client each, driven by commands on stdin.

Usage: ``python bench/connload.py --port P --server-name ls1 --ca CA --cert CERT
--key KEY --connections N``. The ``connections`` and ``storm`` scenarios run
several of these at once (one Python process handles a few thousand TLS
handshakes a second at most) and tell them, all at the same moment, what to do
next; each answers with one JSON line on stdout. The commands (JSON lines):

- ``{"cmd": "connect", "concurrency": 64}``: open every connection, at most
  ``concurrency`` TCP connects and TLS handshakes in flight at once (so the
  server's accept queue does not overflow and the figure is the handshake
  rate, not the kernel's SYN retry timer); answers ``connected`` with the
  first and last handshake times (``time.monotonic()``, the same clock as the
  harness's) and the failures;
- ``{"cmd": "checkout"}``: one lease (of one seat) per connection, under the
  connection's own client id; answers ``checked-out`` with the interval the
  server advised;
- ``{"cmd": "pace"}``: every connection heartbeats its lease once per
  advised interval (or ``interval``), the connections' turns spread evenly;
  answers ``pacing``. ``{"cmd": "stats"}`` answers ``stats`` with what the
  heartbeats did since the previous ``stats``;
- ``{"cmd": "check"}``: stop pacing and send one heartbeat on every
  connection; answers ``checked`` with how many came back renewed;
- ``{"cmd": "arm"}``: stop pacing, answer ``armed``, and wait for every
  connection to be lost (the harness kills the server); answers ``down``
  once all are;
- ``{"cmd": "reconnect"}``: every client at once (each after the 0.05-0.25 s
  jitter a ``LicenseClient`` waits after losing its server) reconnects and
  heartbeats its lease until it is renewed, with a ``LicenseClient``'s
  timings: 2 s (the default request timeout) for the TCP connect and 2 s for
  the heartbeat, TLS handshake included; another try 0.5 s after one that
  failed (also after NotServing or Busy); a lease the server does not know is
  checked out again; answers ``storm`` with handshake and served times;
- ``{"cmd": "quit"}``: close every connection and exit (answers ``bye``).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.stdio import StandardIO
from twisted.protocols import amp
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from licensing import commands
from licensing.errors import Busy, NotServing

CALL_TIMEOUT = 30.0
CONNECT_TIMEOUT = 30.0
REQUEST_TIMEOUT = 2.0
"""What a ``LicenseClient`` waits for a connect or an answer by default (``request_timeout``); a
client in a storm gives up on a connect or heartbeat after it, as a real one does, and tries again."""
JITTER = (0.05, 0.25)
"""Seconds (uniform) after losing its server that a ``LicenseClient`` starts its heartbeat round."""
RETRY = 0.5
"""Seconds a ``LicenseClient`` waits after a heartbeat round that renewed nothing (``FAILOVER_RETRY``)."""
SERVED = (commands.RENEWED, commands.CONVERTED)


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p99/max of seconds, in milliseconds."""
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, int(round(q * n + 0.5)) - 1))] * 1000.0

    return {"p50_ms": rank(0.5), "p99_ms": rank(0.99), "max_ms": ordered[-1] * 1000.0}


def _name(failure: Failure) -> str:
    return type(failure.value).__name__


@implementer(IHandshakeListener)
class Link(amp.AMP):
    """One connection: knows when its TLS handshake is done and tells its client when it is lost."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.handshake: defer.Deferred[float] = defer.Deferred()
        self.lost = False

    def handshakeCompleted(self) -> None:  # noqa: N802 - Twisted API
        self.handshake.callback(time.monotonic())

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted API
        self.lost = True
        if not self.handshake.called:
            self.handshake.errback(reason)
        super().connectionLost(reason)
        self.client.lost(self)


class Client:
    """A logical client: its connection, its lease, and what happened to it."""

    def __init__(self, fleet: Fleet, index: int) -> None:
        self.fleet = fleet
        self.client_id = f"{fleet.prefix}-{index}"
        self.link: Link | None = None
        self.lease_id: str | None = None
        self.busy = False
        self.served_at: float | None = None

    async def connect(self, timeout: float = CONNECT_TIMEOUT) -> float:
        """Open the connection; the moment its TLS handshake completed."""
        link = Link(self)
        d = connectProtocol(self.fleet.endpoint, link)
        deadline = time.monotonic() + timeout
        d.addTimeout(timeout, self.fleet.reactor)
        await d
        handshake = link.handshake
        handshake.addTimeout(max(0.0, deadline - time.monotonic()), self.fleet.reactor)
        try:
            at = await handshake
        except BaseException:
            if link.transport is not None:
                link.transport.abortConnection()
            raise
        self.link = link
        return at

    def call(self, command: type[amp.Command], timeout: float = CALL_TIMEOUT,
             **kwargs: Any) -> defer.Deferred[dict[str, Any]]:
        """One request on the current connection, failing at once if there is none."""
        if self.link is None or self.link.lost:
            return defer.fail(ConnectionError("not connected"))
        d = self.link.callRemote(command, **kwargs)
        d.addTimeout(timeout, self.fleet.reactor)
        return d

    async def checkout(self, timeout: float = CALL_TIMEOUT) -> float:
        """Check out one seat; the heartbeat interval the server advised."""
        answer = await self.call(commands.Checkout, timeout, feature=self.fleet.feature, version="",
                                 client_id=self.client_id, user="bench", host="connload", count=1)
        self.lease_id = answer["lease_id"]
        return float(answer["heartbeat"])

    async def heartbeat(self, timeout: float = CALL_TIMEOUT) -> str:
        """Heartbeat the lease; the status the server answered for it."""
        assert self.lease_id is not None
        answer = await self.call(commands.Heartbeat, timeout, client_id=self.client_id, leases=[self.lease_id])
        return str(answer["statuses"][0][1])

    def lost(self, link: Link) -> None:
        """``link`` closed: forget it if it is the current one."""
        if link is self.link:
            self.link = None
            self.fleet.client_lost(self)

    async def recover(self, stats: Counter[str], handshakes: list[float]) -> None:
        """Reconnect and heartbeat until the lease is renewed (or checked out again).

        As a ``LicenseClient`` of a one-member pool does: it starts after the
        jitter it waits once its server is gone; a TCP connect, and then the
        heartbeat (whose 2 s include the TLS handshake, since the request is
        sent once it completes), each get the default request timeout, and a
        heartbeat that timed out drops the connection; a round that did not
        renew the lease is followed by another 0.5 s later.
        """
        reactor = self.fleet.reactor
        await task.deferLater(reactor, self.fleet.rng.uniform(*JITTER), lambda: None)
        while self.served_at is None and not self.fleet.storm_over:
            if self.link is None:
                link = Link(self)
                d = connectProtocol(self.fleet.endpoint, link)
                d.addTimeout(REQUEST_TIMEOUT, reactor)
                try:
                    await d
                except defer.CancelledError:
                    raise
                except Exception:
                    stats["connect:" + _name(Failure())] += 1
                    await task.deferLater(reactor, RETRY, lambda: None)
                    continue
                self.link = link
                link.handshake.addCallbacks(handshakes.append, lambda _: None)
            try:
                status = await self.heartbeat(REQUEST_TIMEOUT)
                if status not in SERVED:
                    stats["heartbeat:" + status] += 1
                    await self.checkout(REQUEST_TIMEOUT)
                    stats["checked-out-again"] += 1
                self.served_at = time.monotonic()
            except defer.CancelledError:
                raise
            except Exception:
                failure = Failure()
                stats["call:" + _name(failure)] += 1
                link = self.link
                if not failure.check(NotServing, Busy) and link is not None and link.transport is not None:
                    link.transport.abortConnection()
                await task.deferLater(reactor, RETRY, lambda: None)


class Pacer:
    """Every client heartbeats once per interval, turns spread evenly (as in loadgen.py)."""

    TICK = 0.01

    def __init__(self, fleet: Fleet, interval: float) -> None:
        self.fleet = fleet
        self.interval = interval
        clients = fleet.clients
        start = time.monotonic()
        order = list(range(len(clients)))
        fleet.rng.shuffle(order)
        self.due = [(start + k * interval / len(clients), i) for k, i in enumerate(order)]
        self.loop = task.LoopingCall(self.tick)
        self.loop.clock = fleet.reactor
        self.since = start
        self.latencies: list[float] = []
        self.renewed = 0
        self.missed = 0
        self.errors: Counter[str] = Counter()

    def reset(self) -> dict[str, Any]:
        """What the heartbeats did since the last reset (or the start)."""
        now = time.monotonic()
        out = {"seconds": now - self.since, "calls": len(self.latencies), "renewed": self.renewed,
               "missed": self.missed, "errors": dict(self.errors), "interval": self.interval,
               **percentiles(self.latencies)}
        self.since = now
        self.latencies = []
        self.renewed = 0
        self.missed = 0
        self.errors = Counter()
        return out

    def tick(self) -> None:
        now = time.monotonic()
        due = self.due
        while due and due[0][0] <= now:
            at, i = heapq.heappop(due)
            heapq.heappush(due, (at + self.interval, i))
            client = self.fleet.clients[i]
            if client.busy or client.lease_id is None:
                self.missed += 1
                continue
            self.send(client)

    def send(self, client: Client) -> None:
        client.busy = True
        started = time.monotonic()

        def answered(status: str) -> None:
            self.latencies.append(time.monotonic() - started)
            if status == commands.RENEWED:
                self.renewed += 1
            else:
                self.errors[status] += 1

        def failed(failure: Failure) -> None:
            self.errors[_name(failure)] += 1

        def settled(_: Any) -> None:
            client.busy = False

        d = defer.Deferred.fromCoroutine(client.heartbeat())
        d.addCallbacks(answered, failed).addBoth(settled)

    async def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()
        while any(c.busy for c in self.fleet.clients):
            await task.deferLater(self.fleet.reactor, 0.02, lambda: None)


class Fleet(LineReceiver):
    """The process's clients, and the commands from the harness on stdin."""

    delimiter = b"\n"

    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        from licensing.tls import client_tls_options

        self.reactor = reactor
        self.feature = args.feature
        self.prefix = f"{args.client_prefix}{os.getpid()}"
        self.rng = random.Random(os.getpid())
        options = client_tls_options(args.server_name, args.ca, args.cert, args.key)
        self.endpoint = SSL4ClientEndpoint(reactor, args.host, args.port, options)
        self.clients = [Client(self, i) for i in range(args.connections)]
        self.pacer: Pacer | None = None
        self.advised: float | None = None
        self.armed: defer.Deferred[None] | None = None
        self.storm_over = False
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted API
        # stdin closed: the harness is gone.
        if not self.done.called:
            self.done.callback(None)

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 - Twisted API
        command = json.loads(line)
        d = defer.Deferred.fromCoroutine(self.run(command))
        d.addErrback(lambda f: emit({"event": "error", "cmd": command.get("cmd"), "error": f.getTraceback()}))

    async def run(self, command: dict[str, Any]) -> None:
        cmd = command["cmd"]
        handler = getattr(self, "do_" + cmd.replace("-", "_"), None)
        if handler is None:
            emit({"event": "error", "cmd": cmd, "error": "unknown command"})
            return
        await handler(command)

    async def do_connect(self, command: dict[str, Any]) -> None:
        cpu = cpu_seconds()
        started = time.monotonic()
        errors: Counter[str] = Counter()
        times: list[float] = []

        async def one(client: Client) -> None:
            for _ in range(3):
                try:
                    times.append(await client.connect())
                    return
                except Exception:
                    errors[_name(Failure())] += 1

        semaphore = defer.DeferredSemaphore(int(command.get("concurrency", 64)))
        await defer.DeferredList(
            [semaphore.run(lambda c=c: defer.Deferred.fromCoroutine(one(c))) for c in self.clients]
        )
        emit({"event": "connected", "ok": len(times), "failed": len(self.clients) - len(times),
              "errors": dict(errors), "start": started, "first": min(times, default=None),
              "last": max(times, default=None), "cpu": cpu_seconds() - cpu})

    async def do_checkout(self, command: dict[str, Any]) -> None:
        errors: Counter[str] = Counter()
        started = time.monotonic()
        advised: list[float] = []

        async def one(client: Client) -> None:
            try:
                advised.append(await client.checkout())
            except Exception:
                errors[_name(Failure())] += 1

        await defer.DeferredList([defer.Deferred.fromCoroutine(one(c)) for c in self.clients])
        self.advised = max(advised, default=None)
        emit({"event": "checked-out", "ok": len(advised), "errors": dict(errors), "advised": self.advised,
              "seconds": time.monotonic() - started})

    async def do_pace(self, command: dict[str, Any]) -> None:
        interval = float(command.get("interval") or self.advised or 10.0)
        self.pacer = Pacer(self, interval)
        self.pacer.loop.start(Pacer.TICK)
        emit({"event": "pacing", "interval": interval})

    async def do_stats(self, command: dict[str, Any]) -> None:
        emit({"event": "stats", **(self.pacer.reset() if self.pacer else {})})

    async def do_check(self, command: dict[str, Any]) -> None:
        if self.pacer is not None:
            await self.pacer.stop()
        statuses: Counter[str] = Counter()

        async def one(client: Client) -> None:
            try:
                statuses[await client.heartbeat()] += 1
            except Exception:
                statuses[_name(Failure())] += 1

        await defer.DeferredList([defer.Deferred.fromCoroutine(one(c)) for c in self.clients])
        emit({"event": "checked", "renewed": statuses.get(commands.RENEWED, 0), "statuses": dict(statuses)})

    async def do_arm(self, command: dict[str, Any]) -> None:
        if self.pacer is not None:
            await self.pacer.stop()
        for client in self.clients:
            client.served_at = None
        self.armed = defer.Deferred()
        emit({"event": "armed"})
        self.client_lost(None)
        await self.armed
        emit({"event": "down", "connections": len(self.clients), "at": time.monotonic()})

    def client_lost(self, client: Client | None) -> None:
        if self.armed is not None and not self.armed.called and all(c.link is None for c in self.clients):
            self.armed.callback(None)

    async def do_reconnect(self, command: dict[str, Any]) -> None:
        go = time.monotonic()
        cpu = cpu_seconds()
        stats: Counter[str] = Counter()
        handshakes: list[float] = []
        work = [defer.Deferred.fromCoroutine(c.recover(stats, handshakes)) for c in self.clients]
        deadline = float(command.get("deadline", 60.0))

        def give_up() -> None:
            self.storm_over = True
            for d in work:
                if not d.called:
                    d.cancel()

        self.storm_over = False
        timer = self.reactor.callLater(deadline, give_up)
        await defer.DeferredList(work)
        if timer.active():
            timer.cancel()
        served = [c.served_at - go for c in self.clients if c.served_at is not None]
        emit({"event": "storm", "go": go, "clients": len(self.clients), "served": len(served),
              "handshakes": len(handshakes), "first_handshake": min(handshakes, default=None),
              "last_handshake": max(handshakes, default=None),
              "last_served": max((c.served_at for c in self.clients if c.served_at), default=None),
              "served_after_go": percentiles(served), "failures": dict(stats), "cpu": cpu_seconds() - cpu})

    async def do_quit(self, command: dict[str, Any]) -> None:
        if self.pacer is not None:
            await self.pacer.stop()
        for client in self.clients:
            if client.link is not None and client.link.transport is not None:
                client.link.transport.loseConnection()
        emit({"event": "bye"})
        if not self.done.called:
            self.done.callback(None)


def raise_open_files() -> None:
    """Lift the soft limit on open files to the hard one: a fleet holds thousands of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main_async(reactor: Any, args: argparse.Namespace) -> None:
    fleet = Fleet(reactor, args)
    StandardIO(fleet, reactor=reactor)
    emit({"event": "ready", "pid": os.getpid(), "connections": args.connections})
    await fleet.done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-name", default="ls1")
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--client-prefix", default="conn-")
    parser.add_argument("--feature", default="bench")
    args = parser.parse_args(argv)
    raise_open_files()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main_async(reactor, args)))


if __name__ == "__main__":
    main()

