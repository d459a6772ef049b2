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
  or ``{"op": "checkout", "per_client": 100}``; with ``"retry": true`` a checkout
  refused with NoQuorum, NotServing or Busy is tried again 50 ms later (and
  still counted in ``errors``), so a count is reached on a busy pool;
- ``{"op": "heartbeat", "duration": 3, "leases_per_call": 100}`` or ``{"op": "heartbeat", "rounds": 1}``;
- ``{"op": "heartbeat", "paced": true, "duration": 20}``: every logical client
  heartbeats all its leases (``leases_per_call`` at most a call) once per
  ``interval`` (default: the interval the server advised in its Checkout
  answers), the clients' turns spread evenly over the interval, as a fleet
  of independent clients would; a client whose previous heartbeat has not
  come back skips its turn (counted as ``missed``);
- ``{"op": "checkin"}``: every lease held, one call each;
- ``{"op": "fabricate", "per_client": 10}``: make up lease ids without a call
  (for the baseline, which renews any id), so a heartbeat phase has the same
  payload as against a member holding real leases;
- ``{"op": "await"}``: print ``{"event": "await"}`` and wait for a line on
  stdin (the harness waits for something outside, e.g. a pool's record);
- ``{"op": "pause", "seconds": 1}``.

Every phase also counts calls and items per target (``calls_by_target``,
``items_by_target``, in ``--port`` order), so a pool's members can be told apart.

Each may carry a ``"name"``. It prints one JSON object a line on stdout:
``{"event": "window-start", "phase": name}`` and ``{"event": "window-end", ...}``
around every recorded window (so the harness can sample the server's CPU at
the same moments), and last ``{"event": "result", ...}`` with every phase's
calls, items, errors, rate and latency percentiles.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import resource
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import defer, task, threads
from twisted.internet.endpoints import SSL4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols import amp
from zope.interface import implementer

from licensing import commands
from licensing.errors import Busy, NoQuorum, NotServing
from licensing.tls import client_tls_options

CALL_TIMEOUT = 30.0
RETRY_DELAY = 0.05
"""Seconds before a checkout refused with NoQuorum, NotServing or Busy is tried again (``retry``)."""


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

    def __init__(self, name: str, op: str, targets: int = 1) -> None:
        self.name = name
        self.op = op
        self.calls_by_target = [0] * targets
        self.items_by_target = [0] * targets
        self.errors_by_target: list[Counter[str]] = [Counter() for _ in range(targets)]
        self.extra: dict[str, Any] = {}
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

    def record(self, started: float, ended: float, items: int, target: int = 0) -> None:
        ws, we = self.window_start, self.window_end
        if ws is None or started < ws or (we is not None and ended > we):
            return
        self.latencies.append(ended - started)
        self.items += items
        self.calls_by_target[target] += 1
        self.items_by_target[target] += items

    def fail(self, failure: Any, target: int = 0) -> None:
        self.errors[type(failure.value).__name__] += 1
        self.errors_by_target[target][type(failure.value).__name__] += 1

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
            "calls_by_target": self.calls_by_target,
            "items_by_target": self.items_by_target,
            "errors_by_target": [dict(c) for c in self.errors_by_target],
            **percentiles(self.latencies),
            **self.extra,
        }


class Worker:
    """One call slot on one connection; owns its logical clients and their leases."""

    def __init__(self, proto: amp.AMP, clients: list[str], feature: str, clock: Any, target: int = 0) -> None:
        self.proto = proto
        self.target = target
        self.advised: float | None = None
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

    async def checkout(self, phase: Phase, count: int | None, retry: bool = False) -> None:
        """Check out ``count`` leases (or until the phase ends); with ``retry``, a
        refusal that says "not now" (NoQuorum, NotServing, Busy) is counted and tried
        again after a moment instead of counting towards ``count``."""
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
                failure = _failure()
                phase.fail(failure, self.target)
                if self._gone():
                    return
                if retry and failure.check(NoQuorum, NotServing, Busy):
                    await task.deferLater(self.clock, RETRY_DELAY, lambda: None)
                else:
                    done += 1
                continue
            done += 1
            phase.record(started, time.perf_counter(), 1, self.target)
            self.leases[client].append(answer["lease_id"])
            self.advised = answer["heartbeat"]

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
                phase.fail(_failure(), self.target)
                if self._gone():
                    return
                continue
            renewed = sum(1 for row in answer["statuses"] if row[1] == commands.RENEWED)
            if renewed != len(ids):
                phase.errors["not-renewed"] += len(ids) - renewed
            phase.record(started, time.perf_counter(), renewed, self.target)

    async def checkin(self, phase: Phase) -> None:
        for client in self.clients:
            held, self.leases[client] = self.leases[client], []
            for lease_id in held:
                started = time.perf_counter()
                try:
                    answer = await self._call(commands.Checkin, lease_id=lease_id)
                except Exception:
                    phase.fail(_failure(), self.target)
                    if self._gone():
                        return
                    continue
                if not answer["released"]:
                    phase.errors["not-released"] += 1
                phase.record(started, time.perf_counter(), 1, self.target)

    def fabricate(self, per_client: int) -> None:
        """Made-up lease ids, for a target that renews any id (the baseline)."""
        for client in self.clients:
            self.leases[client] += [os.urandom(16).hex() for _ in range(per_client)]

    def _gone(self) -> bool:
        return self.proto.transport is None or getattr(self.proto, "_lost", False)


class Pacer:
    """Heartbeats of a fleet of logical clients, each once per interval, turns spread evenly.

    A real fleet does not heartbeat as fast as it can: each client sends one
    heartbeat (all its leases) per interval the server advised. This sends
    every client's heartbeat at its own moment of the interval (a shuffled,
    even spread, mixing the targets), so the server sees the steady load that
    many leases at the default interval make, and the figures say whether it
    keeps up: renewals/s achieved against required, and turns missed because
    the client's previous heartbeat had not come back yet.
    """

    TICK = 0.01

    def __init__(self, reactor: Any, workers: list[Worker], phase: Phase, per_call: int, interval: float) -> None:
        self.reactor = reactor
        self.phase = phase
        self.interval = interval
        self.chunks = [(w, client, ids) for w in workers for client, ids in w._chunks(per_call)]
        random.Random(0).shuffle(self.chunks)
        n = len(self.chunks)
        start = time.perf_counter()
        # Sorted by due time already, hence a valid heap.
        self.due = [(start + i * interval / n, i) for i in range(n)] if n else []
        self.busy = [False] * n
        self.in_flight = 0
        self.missed = 0
        self.lags: list[float] = []
        self.done: defer.Deferred[None] = defer.Deferred()
        self.loop = task.LoopingCall(self._tick)
        self.loop.clock = reactor
        phase.extra.update(
            interval=interval,
            paced_clients=n,
            paced_leases=sum(len(c[2]) for c in self.chunks),
            required_per_s=sum(len(c[2]) for c in self.chunks) / interval if interval else None,
        )

    def _in_window(self) -> bool:
        return self.phase.window_start is not None and self.phase.window_end is None

    def run(self) -> defer.Deferred[None]:
        if not self.chunks:
            return defer.succeed(None)
        self.loop.start(self.TICK)
        return self.done

    def _tick(self) -> None:
        if not self.phase.issuing:
            self.loop.stop()
            self._finish()
            return
        now = time.perf_counter()
        due = self.due
        while due and due[0][0] <= now:
            at, i = heapq.heappop(due)
            heapq.heappush(due, (at + self.interval, i))
            if self.busy[i]:
                if self._in_window():
                    self.missed += 1
                continue
            if self._in_window():
                self.lags.append(now - at)
            self._send(i)

    def _send(self, i: int) -> None:
        worker, client, ids = self.chunks[i]
        self.busy[i] = True
        self.in_flight += 1
        started = time.perf_counter()
        d = worker._call(commands.Heartbeat, client_id=client, leases=ids)

        def answered(answer: dict[str, Any]) -> None:
            renewed = sum(1 for row in answer["statuses"] if row[1] == commands.RENEWED)
            if renewed != len(ids) and self._in_window():
                self.phase.errors["not-renewed"] += len(ids) - renewed
            self.phase.record(started, time.perf_counter(), renewed, worker.target)

        def failed(failure: Any) -> None:
            if self._in_window():
                self.phase.fail(failure, worker.target)

        def settled(_: Any) -> None:
            self.busy[i] = False
            self.in_flight -= 1
            if not self.phase.issuing:
                self._finish()

        d.addCallbacks(answered, failed).addBoth(settled)

    def _finish(self) -> None:
        if self.in_flight == 0 and not self.done.called:
            lags = percentiles(self.lags)
            self.phase.extra.update(
                missed=self.missed, pace_lag_p99_ms=lags["p99_ms"], pace_lag_max_ms=lags["max_ms"]
            )
            self.done.callback(None)


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
    if op == "fabricate":
        for w in workers:
            w.fabricate(int(spec.get("per_client", 1)))
        return None
    if op == "await":
        held = sum(len(v) for w in workers for v in w.leases.values())
        emit({"event": "await", "phase": name, "leases_held": held})
        await threads.deferToThread(sys.stdin.readline)
        return None
    targets = max(w.target for w in workers) + 1 if workers else 1
    phase = Phase(name, op, targets)
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
    runs: list[Any]
    if op == "checkout":
        if duration is not None:
            counts: list[int | None] = [None] * len(workers)
        elif "per_client" in spec:
            counts = [int(spec["per_client"]) * len(w.clients) for w in workers]
        else:
            counts = list(_split(int(spec["count"]), len(workers)))
        retry = bool(spec.get("retry"))
        runs = [w.checkout(phase, n, retry) for w, n in zip(workers, counts, strict=True)]
    elif op == "heartbeat" and spec.get("paced"):
        if duration is None:
            raise SystemExit("a paced heartbeat phase needs a duration")
        advised = [w.advised for w in workers if w.advised]
        interval = float(spec.get("interval") or (max(advised) if advised else 10.0))
        pacer = Pacer(reactor, workers, phase, int(spec.get("leases_per_call", 2000)), interval)
        runs = [pacer.run()]
    elif op == "heartbeat":
        per_call = int(spec.get("leases_per_call", 100))
        rounds = None if duration is not None else int(spec.get("rounds", 1))
        runs = [w.heartbeat(phase, per_call, rounds) for w in workers]
    elif op == "checkin":
        runs = [w.checkin(phase) for w in workers]
    else:
        raise SystemExit(f"unknown op {op!r}")
    await defer.gatherResults(
        [r if isinstance(r, defer.Deferred) else defer.Deferred.fromCoroutine(r) for r in runs],
        consumeErrors=True,
    )
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
        # Connection c dialled endpoint c % len(endpoints).
        workers.append(Worker(protos[i % len(protos)], clients, args.feature, reactor,
                              (i % len(protos)) % len(endpoints)))
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
            "advised_heartbeat": max((w.advised for w in workers if w.advised), default=None),
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
