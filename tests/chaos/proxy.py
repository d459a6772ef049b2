"""A fault-injecting TCP proxy for the chaos suite, run as its own process.

It sits in front of every member's client and peer listener on 127.0.0.1
(``make_sandbox(..., proxied=True)`` makes the members listen on
``client_bind``/``peer_bind`` while pool.ini sends everyone to the proxy's
ports). It sees only TLS bytes, so it can disturb a connection but never
forge or read a message, exactly like a bad network.

Faults are *rules* added and removed over a control port (one JSON object
per line, one JSON answer per line). A rule names the route it applies to
(``peer:ls2``, ``client:ls1``, or a glob such as ``peer:*``), the source
(``*``, a member name, or ``client``) and one of these kinds:

``cut``
    New connections are accepted and at once aborted (the connecting side
    sees its connection reset) and every matching open connection is
    aborted: a crashed host, or a firewall that rejects.
``oneway``
    Bytes in one ``direction`` are silently discarded (``up``: from the
    connecting side to the listener, ``down``: back, ``both``: a black
    hole). Connections stay open; only timeouts notice.
``delay``
    Every chunk waits ``ms`` milliseconds more (order is kept).
``drop``
    Each new connection, and each chunk forwarded, aborts the connection
    with probability ``p``.
``slow``
    At most ``bps`` bytes per second in the given direction.

Which member opened a peer connection cannot be read from the (encrypted)
bytes, so the proxy asks the kernel: it finds the socket of the connecting
side in ``/proc/net/tcp`` and the process that owns it, and reads
``--name`` from that process's command line (Linux only). Members connect
out to every other member's peer listener and each connection carries
messages one way, so a rule on ``peer:B`` from source ``A`` stops what ``A``
says to ``B`` and nothing else: partitions can be pairwise and one-way.
Client connections are all from source ``client``.

Run: ``python tests/chaos/proxy.py SPEC.json``, where the spec is
``{"control": port, "seed": n, "routes": [{"name": "peer:ls1", "listen": p, "target": q}, ...]}``.
The process prints ``ready`` once every port listens. ``ProxyControl`` is the
blocking client the nemesis uses; ``start_proxy`` starts the process.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("cut", "oneway", "delay", "drop", "slow")
DIRECTIONS = ("up", "down", "both")


@dataclass
class Rule:
    """One fault: what it does, where (route glob), to whom (source glob), which direction."""

    kind: str
    route: str = "*"
    source: str = "*"
    direction: str = "both"
    ms: float = 0.0
    p: float = 0.0
    bps: float = 0.0
    id: int = 0

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Rule:
        """Validate a rule sent over the control port; ValueError says what is wrong."""
        unknown = set(doc) - {"kind", "route", "source", "direction", "ms", "p", "bps"}
        if unknown:
            raise ValueError(f"unknown rule keys {sorted(unknown)}")
        rule = cls(kind=str(doc.get("kind")), route=str(doc.get("route", "*")),
                   source=str(doc.get("source", "*")), direction=str(doc.get("direction", "both")),
                   ms=float(doc.get("ms", 0.0)), p=float(doc.get("p", 0.0)), bps=float(doc.get("bps", 0.0)))
        if rule.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        if rule.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}")
        if rule.kind == "slow" and rule.bps <= 0:
            raise ValueError("slow needs bps > 0")
        if not 0.0 <= rule.p <= 1.0:
            raise ValueError("p must be within [0, 1]")
        return rule

    def matches(self, route: str, source: str) -> bool:
        return fnmatch.fnmatchcase(route, self.route) and fnmatch.fnmatchcase(source, self.source)

    def covers(self, direction: str) -> bool:
        return self.direction in ("both", direction)

    def doc(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- who opened a connection (Linux /proc) -------------------------------------------


def _socket_inode(local_port: int, remote_port: int) -> str | None:
    """The inode of the 127.0.0.1:local_port -> 127.0.0.1:remote_port socket, if any."""
    want_local = f"0100007F:{local_port:04X}"
    want_remote = f"0100007F:{remote_port:04X}"
    try:
        with open("/proc/net/tcp") as table:
            next(table)
            for line in table:
                cols = line.split()
                if cols[1] == want_local and cols[2] == want_remote:
                    return cols[9]
    except OSError:
        return None
    return None


def _member_name(cmdline: bytes) -> str | None:
    args = cmdline.split(b"\0")
    if b"licensing" not in args or b"--name" not in args:
        return None
    i = args.index(b"--name")
    return args[i + 1].decode() if i + 1 < len(args) else None


def connection_owner(local_port: int, remote_port: int) -> str | None:
    """The ``--name`` of the twistd member whose socket is 127.0.0.1:local_port -> :remote_port."""
    inode = _socket_inode(local_port, remote_port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = _member_name(f.read())
            if name is None:
                continue
            fd_dir = f"/proc/{pid}/fd"
            for fd in os.listdir(fd_dir):
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return name
        except OSError:
            continue
    return None


# -- the proxy process (Twisted) ---------------------------------------------------------


def main(argv: list[str]) -> None:
    """Run the proxy described by the spec file ``argv[0]`` until SIGTERM."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
    from twisted.internet.protocol import Factory, Protocol
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )
    from twisted.protocols.basic import LineOnlyReceiver

    quiet = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(sys.stderr), [quiet])],
                                     redirectStandardIO=False)
    spec = json.loads(Path(argv[0]).read_text())
    rng = random.Random(spec.get("seed", 0))
    rules: list[Rule] = []
    next_id = [1]
    pipes: set[Pipe] = set()
    stats: dict[str, int] = {"accepted": 0, "refused": 0, "aborted": 0, "dropped_bytes": 0,
                             "unidentified": 0, "vanished": 0}

    def active(route: str, source: str, kind: str, direction: str | None = None) -> list[Rule]:
        return [r for r in rules if r.kind == kind and r.matches(route, source)
                and (direction is None or r.covers(direction))]

    class Lane:
        """One direction of a pipe: delays and bandwidth caps, order kept."""

        def __init__(self, pipe: Pipe, direction: str) -> None:
            self.pipe = pipe
            self.direction = direction
            self.queue: deque[tuple[float, bytes]] = deque()
            self.busy_until = 0.0
            self.timer: Any = None
            self.out: Any = None

        def push(self, data: bytes) -> None:
            pipe = self.pipe
            if active(pipe.route, pipe.source, "cut"):
                pipe.abort()
                return
            for rule in active(pipe.route, pipe.source, "drop", self.direction):
                if rng.random() < rule.p:
                    pipe.abort()
                    return
            if active(pipe.route, pipe.source, "oneway", self.direction):
                stats["dropped_bytes"] += len(data)
                return
            now = reactor.seconds()
            delay = sum(r.ms for r in active(pipe.route, pipe.source, "delay", self.direction)) / 1000
            caps = [r.bps for r in active(pipe.route, pipe.source, "slow", self.direction)]
            at = max(now + delay, self.queue[-1][0] if self.queue else now)
            if caps:
                start = max(at, self.busy_until)
                self.busy_until = start + len(data) / min(caps)
                at = self.busy_until
            if at <= now and not self.queue and self.out is not None:
                self.out.write(data)
                return
            self.queue.append((at, data))
            self._arm()

        def _arm(self) -> None:
            if self.timer is None and self.queue and self.out is not None:
                wait = max(0.0, self.queue[0][0] - reactor.seconds())
                self.timer = reactor.callLater(wait, self._flush)

        def _flush(self) -> None:
            self.timer = None
            now = reactor.seconds()
            while self.queue and self.queue[0][0] <= now and self.out is not None:
                self.out.write(self.queue.popleft()[1])
            self._arm()
            self.pipe.maybe_finish()

        def attach(self, transport: Any) -> None:
            self.out = transport
            self._arm()

        def cancel(self) -> None:
            if self.timer is not None and self.timer.active():
                self.timer.cancel()
            self.timer = None
            self.queue.clear()

    class Pipe:
        """One proxied connection: the accepted side and our connection to the real listener."""

        def __init__(self, route: str, source: str) -> None:
            self.route = route
            self.source = source
            self.up = Lane(self, "up")
            self.down = Lane(self, "down")
            self.front: Any = None
            self.back: Any = None
            self.closing = False
            self.done = False

        def abort(self) -> None:
            if self.done:
                return
            self.done = True
            stats["aborted"] += 1
            self.up.cancel()
            self.down.cancel()
            for transport in (self.front, self.back):
                if transport is not None:
                    transport.abortConnection()
            pipes.discard(self)

        def half_closed(self) -> None:
            """One side closed: close the other once what is queued for it has gone."""
            self.closing = True
            self.maybe_finish()

        def maybe_finish(self) -> None:
            if self.closing and not self.done and not self.up.queue and not self.down.queue:
                self.done = True
                pipes.discard(self)
                for transport in (self.front, self.back):
                    if transport is not None:
                        transport.loseConnection()

    class Front(Protocol):
        """The accepted connection (a member or a client connecting to a listener)."""

        def __init__(self, route: str, target: int) -> None:
            self.route = route
            self.target = target
            self.pipe: Pipe | None = None

        def connectionMade(self) -> None:
            stats["accepted"] += 1
            if self.route.startswith("peer:"):
                ports = (self.transport.getPeer().port, self.transport.getHost().port)
                source = connection_owner(*ports)
                if source is None:
                    # A socket closed by its side already (a member killed or
                    # giving up right after connecting) has no owner left to
                    # find: not a connection of unknown origin.
                    gone = _socket_inode(*ports) in (None, "0")
                    stats["vanished" if gone else "unidentified"] += 1
                    source = "?"
            else:
                source = "client"
            pipe = self.pipe = Pipe(self.route, source)
            pipe.front = self.transport
            pipe.down.attach(self.transport)
            refused = bool(active(self.route, source, "cut"))
            refused = refused or any(rng.random() < r.p for r in active(self.route, source, "drop"))
            if refused:
                stats["refused"] += 1
                pipe.done = True
                self.transport.abortConnection()
                return
            pipes.add(pipe)
            self.transport.pauseProducing()
            back = Back(pipe)
            d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.target, timeout=5), back)
            d.addCallback(lambda _: self.transport.resumeProducing())
            d.addErrback(lambda _: pipe.abort())

        def dataReceived(self, data: bytes) -> None:
            if self.pipe is not None and not self.pipe.done:
                self.pipe.up.push(data)

        def connectionLost(self, reason: Any) -> None:
            if self.pipe is not None:
                self.pipe.front = None
                self.pipe.down.cancel()
                self.pipe.half_closed()

    class Back(Protocol):
        """Our connection to the member's real listener."""

        def __init__(self, pipe: Pipe) -> None:
            self.pipe = pipe

        def connectionMade(self) -> None:
            if self.pipe.done:
                self.transport.abortConnection()
                return
            self.pipe.back = self.transport
            self.pipe.up.attach(self.transport)

        def dataReceived(self, data: bytes) -> None:
            if not self.pipe.done:
                self.pipe.down.push(data)

        def connectionLost(self, reason: Any) -> None:
            self.pipe.back = None
            self.pipe.up.cancel()
            self.pipe.half_closed()

    class RouteFactory(Factory):
        noisy = False

        def __init__(self, route: str, target: int) -> None:
            self.route = route
            self.target = target

        def buildProtocol(self, addr: Any) -> Front:
            return Front(self.route, self.target)

    def apply_cuts() -> None:
        for pipe in list(pipes):
            if active(pipe.route, pipe.source, "cut"):
                pipe.abort()

    def control(request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "add":
            rule = Rule.from_doc(request["rule"])
            rule.id = next_id[0]
            next_id[0] += 1
            rules.append(rule)
            apply_cuts()
            return {"ok": True, "id": rule.id}
        if op == "remove":
            ids = set(request["ids"])
            rules[:] = [r for r in rules if r.id not in ids]
            return {"ok": True}
        if op == "heal":
            rules.clear()
            return {"ok": True}
        if op == "rules":
            return {"ok": True, "rules": [r.doc() for r in rules]}
        if op == "stats":
            return {"ok": True, "stats": dict(stats), "open": len(pipes),
                    "sources": sorted({p.source for p in pipes})}
        if op == "ping":
            return {"ok": True}
        raise ValueError(f"unknown op {op!r}")

    class Control(LineOnlyReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            try:
                answer = control(json.loads(line))
            except (ValueError, KeyError, TypeError) as e:
                answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self.sendLine(json.dumps(answer).encode())

    listening = [TCP4ServerEndpoint(reactor, spec["control"], interface="127.0.0.1")
                 .listen(Factory.forProtocol(Control))]
    for route in spec["routes"]:
        endpoint = TCP4ServerEndpoint(reactor, route["listen"], interface="127.0.0.1")
        listening.append(endpoint.listen(RouteFactory(route["name"], route["target"])))

    from twisted.internet.defer import gatherResults

    def ready(_: Any) -> None:
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    def failed(failure: Any) -> None:
        sys.stderr.write(f"proxy cannot listen: {failure.getErrorMessage()}\n")
        reactor.stop()

    gatherResults(listening, consumeErrors=True).addCallbacks(ready, failed)
    reactor.run()


# -- the test side ----------------------------------------------------------------------


class ProxyControl:
    """Blocking client of the proxy's control port (one short connection per request)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout

    def request(self, **request: Any) -> dict[str, Any]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout) as sock:
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data)
        if not answer.get("ok"):
            raise ValueError(f"proxy refused {request}: {answer.get('error')}")
        return answer

    def add(self, kind: str, route: str = "*", source: str = "*", direction: str = "both",
            **params: float) -> int:
        """Add a fault rule; returns its id for ``remove``."""
        rule = {"kind": kind, "route": route, "source": source, "direction": direction, **params}
        return int(self.request(op="add", rule=rule)["id"])

    def remove(self, *ids: int) -> None:
        self.request(op="remove", ids=list(ids))

    def heal(self) -> None:
        """Remove every rule (connections already cut stay closed; new ones go through)."""
        self.request(op="heal")

    def rules(self) -> list[dict[str, Any]]:
        return self.request(op="rules")["rules"]

    def stats(self) -> dict[str, Any]:
        return self.request(op="stats")


@dataclass
class ProxyProcess:
    """A running proxy process and its control client."""

    process: subprocess.Popen
    control: ProxyControl
    routes: list[dict[str, Any]] = field(default_factory=list)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def routes_for(ports: Mapping[str, Mapping[str, int]]) -> list[dict[str, Any]]:
    """The proxy routes of a ``make_sandbox(..., proxied=True)`` pool: client and peer per member."""
    routes = []
    for name, p in ports.items():
        routes.append({"name": f"client:{name}", "listen": p["client"], "target": p["client_bind"]})
        routes.append({"name": f"peer:{name}", "listen": p["peer"], "target": p["peer_bind"]})
    return routes


def start_proxy(workdir: Path, routes: list[dict[str, Any]], seed: int = 0,
                control_port: int | None = None) -> ProxyProcess:
    """Start the proxy process for ``routes`` and wait until every port listens."""
    if control_port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            control_port = s.getsockname()[1]
    spec = workdir / "proxy.json"
    spec.write_text(json.dumps({"control": control_port, "seed": seed, "routes": routes}))
    with open(workdir / "proxy.log", "wb") as log:
        process = subprocess.Popen([sys.executable, str(Path(__file__)), str(spec)], stdout=subprocess.PIPE,
                                   stderr=log, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    handle = ProxyProcess(process, ProxyControl(control_port), routes)
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"ready":
        handle.stop()
        raise RuntimeError(f"proxy did not start: {(workdir / 'proxy.log').read_text()[-2000:]}")
    return handle


if __name__ == "__main__":
    main(sys.argv[1:])
