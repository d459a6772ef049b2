"""The load generator: N mutual-TLS AMP connections, K calls outstanding on each.

Usage: ``python bench/loadgen.py --port P --ca CA --cert CERT --key KEY
--connections N --outstanding K --plan '[...]'`` (``--port`` and
``--server-name`` take comma-separated lists to spread connections over the
members of a pool, round robin).

It speaks the client wire schema with raw ``callRemote`` (no ``LicenseClient``,
whose heartbeat loop and failover logic would add client work that is not
being measured) and runs a *plan*: a list of phases, each one operation, run
either for a duration (after a warm-up that is not recorded) or until a count
is done. Every worker (one per outstanding call slot) owns a few logical
client ids and the leases checked out under them, so a plan can check out,
heartbeat and check in the same leases, and one process can stand in for tens
of thousands of clients.

Phases (JSON objects in ``--plan``):

- ``{"op": "checkout", "duration": 3, "warmup": 0.5}``, ``{"op": "checkout", "count": N}``
  or ``{"op": "checkout", "per_client": 100}``;
- ``{"op": "heartbeat", "duration": 3, "leases_per_call": 100}`` or ``{"op": "heartbeat", "rounds": 1}``;
- ``{"op": "checkin"}``: every lease held, one call each;
- ``{"op": "pause", "seconds": 1}``.

Each may carry a ``"name"``. It prints one JSON object a line on stdout:
``{"event": "window-start", "phase": name}`` and ``{"event": "window-end", ...}``
around every recorded window (so the harness can sample the server's CPU at
the same moments), and last ``{"event": "result", ...}`` with every phase's
calls, items, errors, rate and latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols import amp
from zope.interface import implementer

from licensing import commands
from licensing.tls import client_tls_options

CALL_TIMEOUT = 30.0


def percentiles(values: list[float]) -> dict[str, float | None]:
    """Latency summary in milliseconds (nearest rank)."""
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, int(round(q * n + 0.5)) - 1))] * 1000.0

    return {
        "p50_ms": rank(0.50),
        "p90_ms": rank(0.90),
        "p99_ms": rank(0.99),
        "max_ms": ordered[-1] * 1000.0,
        "mean_ms": sum(ordered) / n * 1000.0,
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


class Phase:
    """One recorded run of one operation: its window, latencies and errors."""

    def __init__(self, name: str, op: str) -> None:
        self.name = name
        self.op = op
        self.window_start: float | None = None
        self.window_end: float | None = None
        self.latencies: list[float] = []
        self.items = 0
        self.errors: Counter[str] = Counter()
        self.cpu_start = 0.0
        self.cpu_end = 0.0
        self.issuing = True

    def open(self) -> None:
        self.window_start = time.perf_counter()
        self.cpu_start = cpu_seconds()
        emit({"event": "window-start", "phase": self.name})

    def close(self) -> None:
        if self.window_end is not None:
            return
        if self.window_start is None:
            # Every worker gave up before the warm-up ended: an empty window.
            self.open()
        self.window_end = time.perf_counter()
        self.cpu_end = cpu_seconds()
        emit({"event": "window-end", "phase": self.name})

    def record(self, started: float, ended: float, items: int) -> None:
        ws, we = self.window_start, self.window_end
        if ws is None or started < ws or (we is not None and ended > we):
            return
        self.latencies.append(ended - started)
        self.items += items

    def fail(self, failure: Any) -> None:
        self.errors[type(failure.value).__name__] += 1

    def summary(self) -> dict[str, Any]:
        elapsed = (self.window_end or time.perf_counter()) - (self.window_start or 0.0)
        calls = len(self.latencies)
        return {
            "op": self.op,
            "seconds": elapsed,
            "calls": calls,
            "items": self.items,
            "calls_per_s": calls / elapsed if elapsed > 0 else 0.0,
            "items_per_s": self.items / elapsed if elapsed > 0 else 0.0,
            "errors": dict(self.errors),
            "loadgen_cpu": (self.cpu_end - self.cpu_start) / elapsed if elapsed > 0 else 0.0,
            **percentiles(self.latencies),
        }


class Worker:
    """One call slot on one connection; owns its logical clients and their leases."""

    def __init__(self, proto: amp.AMP, clients: list[str], feature: str, clock: Any) -> None:
        self.proto = proto
        self.clients = clients
        self.leases: dict[str, list[str]] = {c: [] for c in clients}
        self.feature = feature
        self.clock = clock
        self.user = "bench"
        self.host = socket.gethostname()[:64]
        self._next_client = 0

    def _client(self) -> str:
        client = self.clients[self._next_client % len(self.clients)]
        self._next_client += 1
        return client

    def _call(self, command: type[amp.Command], **kwargs: Any) -> defer.Deferred:
        d = self.proto.callRemote(command, **kwargs)
        d.addTimeout(CALL_TIMEOUT, self.clock)
        return d

    async def checkout(self, phase: Phase, count: int | None) -> None:
        done = 0
        while phase.issuing and (count is None or done < count):
            client = self._client()
            started = time.perf_counter()
            try:
                answer = await self._call(
                    commands.Checkout,
                    feature=self.feature,
                    version="",
                    client_id=client,
                    user=self.user,
                    host=self.host,
                    count=1,
                )
            except Exception:
                phase.fail(_failure())
                if self._gone():
                    return
                continue
            finally:
                done += 1
            phase.record(started, time.perf_counter(), 1)
            self.leases[client].append(answer["lease_id"])

    def _chunks(self, per_call: int) -> list[tuple[str, list[str]]]:
        out = []
        for client in self.clients:
            held = self.leases[client]
            for i in range(0, len(held), per_call):
                out.append((client, held[i : i + per_call]))
        return out

    async def heartbeat(self, phase: Phase, per_call: int, rounds: int | None) -> None:
        chunks = self._chunks(per_call)
        if not chunks:
            return
        done = 0
        while phase.issuing and (rounds is None or done < rounds * len(chunks)):
            client, ids = chunks[done % len(chunks)]
            done += 1
            started = time.perf_counter()
            try:
                answer = await self._call(commands.Heartbeat, client_id=client, leases=ids)
            except Exception:
                phase.fail(_failure())
                if self._gone():
                    return
                continue
            renewed = sum(1 for row in answer["statuses"] if row[1] == commands.RENEWED)
            if renewed != len(ids):
                phase.errors["not-renewed"] += len(ids) - renewed
            phase.record(started, time.perf_counter(), renewed)

    async def checkin(self, phase: Phase) -> None:
        for client in self.clients:
            held, self.leases[client] = self.leases[client], []
            for lease_id in held:
                started = time.perf_counter()
                try:
                    answer = await self._call(commands.Checkin, lease_id=lease_id)
                except Exception:
                    phase.fail(_failure())
                    if self._gone():
                        return
                    continue
                if not answer["released"]:
                    phase.errors["not-released"] += 1
                phase.record(started, time.perf_counter(), 1)

    def _gone(self) -> bool:
        return self.proto.transport is None or getattr(self.proto, "_lost", False)


@implementer(IHandshakeListener)
class _Tracked(amp.AMP):
    """AMP that knows when its TLS handshake is done and when it lost its connection."""

    _lost = False

    def __init__(self) -> None:
        super().__init__()
        self.handshake: defer.Deferred[None] = defer.Deferred()

    def handshakeCompleted(self) -> None:  # noqa: N802 - Twisted API
        self.handshake.callback(None)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted API
        self._lost = True
        if not self.handshake.called:
            self.handshake.errback(reason)
        super().connectionLost(reason)


def _failure() -> Any:
    from twisted.python.failure import Failure

    return Failure()


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def run_phase(reactor: Any, workers: list[Worker], spec: dict[str, Any]) -> dict[str, Any] | None:
    op = spec["op"]
    name = spec.get("name", op)
    if op == "pause":
        await task.deferLater(reactor, float(spec.get("seconds", 1.0)), lambda: None)
        return None
    phase = Phase(name, op)
    duration = spec.get("duration")
    timers = []
    if duration is not None:
        warmup = float(spec.get("warmup", 0.5))

        def start() -> None:
            if phase.window_end is None:
                phase.open()

        def stop() -> None:
            phase.close()
            phase.issuing = False

        timers = [reactor.callLater(warmup, start), reactor.callLater(warmup + float(duration), stop)]
    else:
        phase.open()
    if op == "checkout":
        if duration is not None:
            counts: list[int | None] = [None] * len(workers)
        elif "per_client" in spec:
            counts = [int(spec["per_client"]) * len(w.clients) for w in workers]
        else:
            counts = list(_split(int(spec["count"]), len(workers)))
        runs = [w.checkout(phase, n) for w, n in zip(workers, counts, strict=True)]
    elif op == "heartbeat":
        per_call = int(spec.get("leases_per_call", 100))
        rounds = None if duration is not None else int(spec.get("rounds", 1))
        runs = [w.heartbeat(phase, per_call, rounds) for w in workers]
    elif op == "checkin":
        runs = [w.checkin(phase) for w in workers]
    else:
        raise SystemExit(f"unknown op {op!r}")
    await defer.gatherResults([defer.Deferred.fromCoroutine(r) for r in runs], consumeErrors=True)
    for timer in timers:
        if timer.active():
            timer.cancel()
    phase.close()
    return {"name": name, **phase.summary()}


async def run(reactor: Any, args: argparse.Namespace) -> None:
    plan = json.loads(args.plan)
    ports = [int(p) for p in args.port.split(",")]
    names = args.server_name.split(",")
    if len(names) != len(ports):
        raise SystemExit("--server-name needs one name per --port")
    endpoints = [
        SSL4ClientEndpoint(reactor, args.host, port, client_tls_options(name, args.ca, args.cert, args.key))
        for port, name in zip(ports, names, strict=True)
    ]
    started = time.perf_counter()
    protos = await defer.gatherResults(
        [connectProtocol(endpoints[i % len(endpoints)], _Tracked()) for i in range(args.connections)],
        consumeErrors=True,
    )
    # connectProtocol fires on the TCP connect; wait for every TLS handshake too.
    await defer.gatherResults([p.handshake for p in protos], consumeErrors=True)
    connect_seconds = time.perf_counter() - started
    emit({"event": "connected", "connections": len(protos), "seconds": connect_seconds})
    n_workers = args.connections * args.outstanding
    n_clients = max(args.clients or n_workers, n_workers)
    tag = f"{args.client_prefix}{os.getpid()}"
    workers = []
    for i in range(n_workers):
        clients = [f"{tag}-{c}" for c in range(i, n_clients, n_workers)]
        workers.append(Worker(protos[i % len(protos)], clients, args.feature, reactor))
    phases = []
    for spec in plan:
        summary = await run_phase(reactor, workers, spec)
        if summary is not None:
            phases.append(summary)
    for p in protos:
        if p.transport is not None:
            p.transport.loseConnection()
    emit(
        {
            "event": "result",
            "connections": args.connections,
            "outstanding": args.outstanding,
            "clients": n_clients,
            "connect_seconds": connect_seconds,
            "leases_held": sum(len(v) for w in workers for v in w.leases.values()),
            "phases": phases,
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", required=True, help="port, or comma-separated ports of several members")
    parser.add_argument(
        "--server-name",
        default="ls1",
        help="member name its certificate must carry (comma-separated, one per port)",
    )
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--outstanding", type=int, default=1)
    parser.add_argument("--clients", type=int, default=0, help="logical client ids (default: one per slot)")
    parser.add_argument("--client-prefix", default="bench-")
    parser.add_argument("--feature", default="bench")
    parser.add_argument("--plan", required=True, help="JSON list of phases")
    args = parser.parse_args(argv)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
