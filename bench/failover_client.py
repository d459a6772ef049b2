"""The failover benchmark's applications: one process, one ``LicenseClient`` per logical client.

``bench/failover.py`` runs this next to a three-member pool. Each logical
client of the fleet is a ``LicenseClient`` of its own (its own connections,
heartbeat loop and failover), made with ``LicenseClient.from_config`` and
the heartbeat interval the pool advises (10 s by default). Beside them a few
*probe* clients check a seat of another feature out and in again in a loop,
the steady checkout load whose failures show when the pool stops issuing.

The process is driven by JSON commands, one a line on stdin, and answers
one JSON object a line on stdout:

``{"cmd": "place", "targets": {"ls1": 5, ...}, "deadline": 10}``
    make every member hold that many fleet leases: leases of members above
    their share are checked in, and clients without a lease check out at a
    member below its share (see ``place_at``). Answers ``placed``.
``{"cmd": "view"}``
    every fleet lease: client, lease id, server, ``renewed_at``, conversions.
``{"cmd": "report", "since": T, "attempts": true}``
    every fleet lease's renewals seen after wall-clock time ``T`` (when,
    where, converted or not), the probe's checkout attempts that ended
    after ``T`` (unless ``attempts`` is false), and every lease lost so far.
``{"cmd": "quit"}``
    check everything in, close every client and exit.

Renewals are seen by watching each ``Lease``'s ``renewed_at``, ``server``
and ``converted`` every 20 ms; the time recorded is ``renewed_at`` itself
(the reactor's wall clock when the answer arrived), so the polling adds no
error to the figures. A lease heartbeats at most every half second while it
fails over and every 10 s otherwise, so no renewal is missed.

Run: ``python bench/failover_client.py --config pool.ini --feature failover
--clients 30 --probe-feature failover-probe --probes 3``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from licensing.client import Lease, LicenseClient
from licensing.config import load_config
from licensing.errors import LicensingError

PLACE_RETRY = 0.2
"""Seconds between checkouts at a member that has no free seat yet (the pool is moving one there)."""

PROBE_PAUSE = 0.05
"""Seconds a probe client waits between one checkin and its next checkout."""

WATCH_INTERVAL = 0.02


class Output:
    """Where answers go: stdout, through the reactor once ``StandardIO`` has made it non-blocking."""

    transport: Any = None

    @classmethod
    def emit(cls, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode() + b"\n"
        if cls.transport is not None:
            cls.transport.write(data)
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()


emit = Output.emit


@dataclass
class Renewal:
    """One renewal or conversion of a fleet lease, as the client saw it."""

    at: float
    server: str
    converted: bool


@dataclass
class Slot:
    """One logical client of the fleet: its ``LicenseClient`` and the lease it holds, if any."""

    index: int
    home: str
    client: LicenseClient
    lease: Lease | None = None
    seen: tuple[float, str, int] = (0.0, "", 0)
    renewals: dict[str, list[Renewal]] = field(default_factory=dict)


class Fleet:
    """The fleet clients, the probe clients and what they saw."""

    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        self.slots: list[Slot] = []
        self.members: list[str] = []
        self.lost: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.probing = True
        self.probes: list[LicenseClient] = []

    def new_client(self, name: str, home: str | None) -> LicenseClient:
        # The pool advises the heartbeat interval (10 s by default): no heartbeat= here.
        return LicenseClient.from_config(self.reactor, self.args.config, home=home, client_id=name)

    def start(self) -> None:
        self.members = sorted(load_config(self.args.config).servers)
        for i in range(self.args.clients):
            home = self.members[i % len(self.members)]
            self.slots.append(Slot(i, home, self.new_client(f"failover-{i}", home)))
        self.probes = [self.new_client(f"failover-probe-{i}", self.members[i % len(self.members)])
                       for i in range(self.args.probes)]
        watch = task.LoopingCall(self.watch)
        watch.clock = self.reactor
        watch.start(WATCH_INTERVAL).addErrback(self.failed("watch"))
        for probe in self.probes:
            defer.Deferred.fromCoroutine(self.probe(probe)).addErrback(self.failed("probe"))

    def failed(self, what: str) -> Callable[[Failure], None]:
        def record(failure: Failure) -> None:
            self.errors.append(f"{what}: {failure.getTraceback()}"[-3000:])

        return record

    # -- what the clients see ------------------------------------------------

    def watch(self) -> None:
        """Record every fleet lease's renewals and conversions as they happen."""
        for slot in self.slots:
            lease = slot.lease
            if lease is None or not lease.alive:
                continue
            now = (lease.renewed_at, lease.server, lease.converted)
            if now != slot.seen:
                converted = lease.converted > slot.seen[2]
                if now[0] != slot.seen[0]:
                    slot.renewals.setdefault(lease.lease_id, []).append(
                        Renewal(lease.renewed_at, lease.server, converted))
                slot.seen = now

    def hold(self, slot: Slot, lease: Lease) -> None:
        slot.lease = lease
        slot.seen = (lease.renewed_at, lease.server, lease.converted)
        slot.renewals[lease.lease_id] = []

        def on_lost(why: Any) -> None:
            self.lost.append({"client": slot.index, "lease_id": lease.lease_id, "server": lease.server,
                              "at": time.time(), "why": str(why)[:300]})
            if slot.lease is lease:
                slot.lease = None

        lease.add_loss_callback(on_lost)

    def view(self) -> list[dict[str, Any]]:
        return [
            {"client": s.index, "home": s.home, "lease_id": s.lease.lease_id, "server": s.lease.server,
             "renewed_at": s.lease.renewed_at, "converted": s.lease.converted}
            for s in self.slots if s.lease is not None and s.lease.alive
        ]

    def report(self, since: float, attempts: bool = True) -> dict[str, Any]:
        renewals = {}
        for slot in self.slots:
            for lease_id, seen in slot.renewals.items():
                after = [{"at": r.at, "server": r.server, "converted": r.converted}
                         for r in seen if r.at > since]
                renewals[lease_id] = after
        tried = [a for a in self.attempts if a["end"] > since] if attempts else []
        return {"event": "report", "renewals": renewals, "attempts": tried, "lost": self.lost,
                "errors": self.errors, "leases": self.view()}

    # -- the steady checkout load ----------------------------------------------

    async def probe(self, client: LicenseClient) -> None:
        """Check a probe seat out and straight back in, again and again, recording each attempt."""
        while self.probing:
            start = time.time()
            try:
                lease = await client.checkout(self.args.probe_feature)
            except LicensingError as e:
                self.attempts.append({"start": start, "end": time.time(), "ok": False,
                                      "error": type(e).__name__, "client": client.client_id})
                await task.deferLater(self.reactor, PROBE_PAUSE, lambda: None)
                continue
            self.attempts.append({"start": start, "end": time.time(), "ok": True,
                                  "server": lease.server, "client": client.client_id})
            await lease.release()
            await task.deferLater(self.reactor, PROBE_PAUSE, lambda: None)

    # -- placing leases on members ----------------------------------------------

    async def place(self, targets: dict[str, int], deadline: float) -> dict[str, Any]:
        """Give every member ``targets[member]`` fleet leases; see the module docstring."""
        started = time.time()
        held: dict[str, list[Slot]] = {m: [] for m in self.members}
        free: list[Slot] = []
        for slot in self.slots:
            if slot.lease is not None and slot.lease.alive:
                held.setdefault(slot.lease.server, []).append(slot)
            else:
                free.append(slot)
        releases = []
        for member, slots in held.items():
            surplus = len(slots) - targets.get(member, 0)
            if surplus <= 0:
                continue
            # Give back first the leases of clients whose home is short of leases.
            slots.sort(key=lambda s: (len(held.get(s.home, [])) >= targets.get(s.home, 0), s.index))
            for slot in slots[:surplus]:
                lease, slot.lease = slot.lease, None
                assert lease is not None
                releases.append(defer.Deferred.fromCoroutine(lease.release()))
                free.append(slot)
            held[member] = slots[surplus:]
        await defer.DeferredList(releases, consumeErrors=True)
        wanted = []
        for member in self.members:
            for _ in range(max(0, targets.get(member, 0) - len(held[member]))):
                if not free:
                    break
                # Prefer clients homed there, so a client's home and its lease agree where they can.
                pick = min(free, key=lambda s, m=member: (s.home != m, s.index))
                free.remove(pick)
                wanted.append((pick, member))
        results = await defer.DeferredList(
            [defer.Deferred.fromCoroutine(self.place_at(slot, member, started + deadline))
             for slot, member in wanted], consumeErrors=True)
        fallbacks = sum(1 for ok, placed in results if ok and not placed)
        failures = [f.getErrorMessage() for ok, f in results if not ok]
        by_server: dict[str, int] = {}
        for slot in self.slots:
            if slot.lease is not None and slot.lease.alive:
                by_server[slot.lease.server] = by_server.get(slot.lease.server, 0) + 1
        return {"event": "placed", "by_server": by_server, "seconds": time.time() - started,
                "released": len(releases), "checked_out": len(wanted), "fallbacks": fallbacks,
                "failures": failures}

    async def place_at(self, slot: Slot, member: str, deadline: float) -> bool:
        """Check out a lease for ``slot`` at ``member``; True if it landed there.

        A fresh ``LicenseClient`` (same client id) is made for each new lease
        and shown only ``member`` while it checks out: a checkout that meets
        NoSeats at ``member`` would otherwise be served by another member
        with a free seat, and leases would never get back to a member whose
        allocation was reclaimed while it was down. The refused checkout
        asks the leader to move a seat there, so it succeeds after a few
        tries. The client then knows every member again, for failover. Past
        the deadline it checks out anywhere.
        """
        slot.client.close()
        slot.client = client = self.new_client(f"failover-{slot.index}", member)
        everyone = dict(client.endpoints)
        client.endpoints = {member: everyone[member]}
        try:
            while time.time() < deadline:
                try:
                    lease = await client.checkout(self.args.feature)
                except LicensingError:
                    await task.deferLater(self.reactor, PLACE_RETRY, lambda: None)
                    continue
                self.hold(slot, lease)
                return True
        finally:
            client.endpoints = everyone
        while True:
            try:
                lease = await client.checkout(self.args.feature)
            except LicensingError:
                if time.time() > deadline + 10:
                    raise
                await task.deferLater(self.reactor, PLACE_RETRY, lambda: None)
                continue
            self.hold(slot, lease)
            return False

    async def quit(self) -> None:
        self.probing = False
        leases = [s.lease for s in self.slots if s.lease is not None and s.lease.alive]
        await defer.DeferredList([defer.Deferred.fromCoroutine(lease.release()) for lease in leases],
                                 consumeErrors=True)
        for client in self.probes + [s.client for s in self.slots]:
            client.close()


class Commands(LineReceiver):
    """Reads the bench's JSON commands from stdin and answers on stdout, one at a time."""

    delimiter = b"\n"

    def __init__(self, fleet: Fleet, done: defer.Deferred[None]) -> None:
        self.fleet = fleet
        self.done = done
        self.queue: defer.Deferred[None] = defer.succeed(None)

    def connectionMade(self) -> None:  # noqa: N802 - Twisted API
        Output.transport = self.transport

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 - Twisted API
        command = json.loads(line)
        self.queue.addCallback(lambda _: defer.Deferred.fromCoroutine(self.run(command)))
        self.queue.addErrback(lambda f: emit({"event": "error", "text": f.getTraceback()[-3000:]}))

    async def run(self, command: dict[str, Any]) -> None:
        fleet = self.fleet
        cmd = command["cmd"]
        if cmd == "place":
            emit(await fleet.place(command["targets"], float(command.get("deadline", 10.0))))
        elif cmd == "view":
            emit({"event": "view", "leases": fleet.view(), "lost": fleet.lost, "errors": fleet.errors})
        elif cmd == "report":
            emit(fleet.report(float(command["since"]), bool(command.get("attempts", True))))
        elif cmd == "quit":
            await fleet.quit()
            emit({"event": "bye"})
            # Leave the TLS connection's dataReceived before the reactor stops.
            await task.deferLater(fleet.reactor, 0, lambda: None)
            if not self.done.called:
                self.done.callback(None)
        else:
            emit({"event": "error", "text": f"unknown command {cmd!r}"})

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802 - Twisted API
        # The bench went away (stdin closed): end, whatever was running.
        if not self.done.called:
            self.done.callback(None)


def watch_errors(fleet_errors: list[str]) -> Callable[[dict[str, Any]], None]:
    """A log observer keeping every error and failure the client library logs (bugs)."""

    def observe(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            text = formatEvent(event)
            if failure is not None:
                text += "\n" + failure.getTraceback()
            fleet_errors.append(text[-3000:])

    return observe


async def run(reactor: IReactorTime, args: argparse.Namespace) -> None:
    from twisted.internet import stdio

    fleet = Fleet(reactor, args)
    observers: list[Any] = [watch_errors(fleet.errors)]
    if args.log:
        log_file = open(args.log, "a")  # noqa: SIM115 - open until the process ends
        predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
        observers.append(FilteringLogObserver(textFileLogObserver(log_file), [predicate]))
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    fleet.start()
    done: defer.Deferred[None] = defer.Deferred()
    stdio.StandardIO(Commands(fleet, done), reactor=reactor)
    emit({"event": "ready", "members": fleet.members})
    await done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the pool's pool.ini (with a [client] section)")
    parser.add_argument("--feature", required=True)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--probe-feature", required=True)
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--log", default=None, help="append the client library's log (info and up) here")
    args = parser.parse_args(argv)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
