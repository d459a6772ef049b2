"""The chaos suite's applications: many ``LicenseClient`` objects in one process.

They run apart from the test process so that the nemesis (which blocks on
process starts and licensectl) can never stall their heartbeats, and so
that they reach the pool only through the proxy, like any application.
Each client loops: think, check a seat out, hold it while it heartbeats
(every second), check it in. What happens is written as one JSON object per
line to the events file, with wall-clock times the observer can put next to
the members' own lease expiry times:

``checkout`` / ``checkout_failed`` / ``released`` / ``lost`` / ``moved``
    one client's lease history (``moved``: heartbeats now go to another
    member, after a failover or a conversion);
``view``
    every half second, every lease the clients believe they hold;
``error``
    the client library logged an error or a failure (a bug);
``quiet`` / ``exit``
    the process stopped churning (SIGUSR1), or released everything and
    ended (SIGTERM).

Run: ``python tests/chaos/clients.py --config pool.ini --events events.jsonl
--clients 16 --seed 1 --features cad-pro=3,viewer=1``.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from typing import Any, TextIO


def main(argv: list[str]) -> None:
    """Run the clients until SIGTERM; see the module docstring."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--events", required=True)
    parser.add_argument("--log", default=None)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", default="cad-pro=1", help="name=weight,...")
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--think", type=float, nargs=2, default=(0.2, 2.0))
    parser.add_argument("--hold", type=float, nargs=2, default=(1.0, 12.0))
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredList
    from twisted.internet.task import LoopingCall, deferLater
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        formatEvent,
        globalLogBeginner,
        textFileLogObserver,
    )

    from licensing.client import Lease, LicenseClient
    from licensing.errors import LicensingError

    events: TextIO = open(args.events, "a", buffering=1)  # noqa: SIM115 - open until the process ends

    def emit(ev: str, **fields: Any) -> None:
        events.write(json.dumps({"t": round(time.time(), 4), "ev": ev, **fields}) + "\n")

    def watch_errors(event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None or event.get("log_level") in (LogLevel.error, LogLevel.critical):
            text = formatEvent(event)
            if failure is not None:
                text += "\n" + failure.getTraceback()
            emit("error", text=text[-4000:])

    observers: list[Any] = [watch_errors]
    if args.log:
        predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
        log_file = open(args.log, "a")  # noqa: SIM115 - open until the process ends
        observers.append(FilteringLogObserver(textFileLogObserver(log_file), [predicate]))
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)

    weights: list[tuple[str, int]] = []
    for part in args.features.split(","):
        name, _, weight = part.partition("=")
        weights.append((name, int(weight or 1)))
    choices = [name for name, weight in weights for _ in range(weight)]

    quiet = [False]
    stopping = [False]
    clients: list[LicenseClient] = []
    held: dict[int, Lease] = {}

    def sleep(seconds: float) -> Deferred[None]:
        return deferLater(reactor, seconds, lambda: None)

    def lease_event(i: int, lease: Lease) -> dict[str, Any]:
        return {"client": i, "lease_id": lease.lease_id, "feature": lease.feature, "count": lease.count,
                "server": lease.server}

    async def run_client(i: int) -> None:
        rng = random.Random(f"{args.seed}:{i}")
        client = LicenseClient.from_config(reactor, args.config, client_id=f"chaos-{i}",
                                           heartbeat=args.heartbeat, rng=rng)
        clients.append(client)
        while not stopping[0]:
            await sleep(rng.uniform(*args.think))
            if quiet[0] or stopping[0] or i in held:
                continue
            feature = rng.choice(choices)
            try:
                lease = await client.checkout(feature)
            except LicensingError as e:
                emit("checkout_failed", client=i, feature=feature, error=type(e).__name__, text=str(e)[:300])
                continue
            held[i] = lease
            emit("checkout", ttl=lease.ttl, **lease_event(i, lease))

            def on_lost(why: Any, i: int = i, lease: Lease = lease) -> None:
                held.pop(i, None)
                emit("lost", why=str(why)[:300], **lease_event(i, lease))

            lease.add_loss_callback(on_lost)
            hold_until = time.time() + rng.uniform(*args.hold)
            while lease.alive and not stopping[0] and (quiet[0] or time.time() < hold_until):
                await sleep(0.1)
            if lease.alive and not stopping[0]:
                held.pop(i, None)
                emit("released", **lease_event(i, lease))
                await lease.release()

    servers: dict[str, str] = {}

    def view() -> None:
        leases = []
        for i, lease in sorted(held.items()):
            if servers.get(lease.lease_id, lease.server) != lease.server:
                emit("moved", converted=lease.converted, **lease_event(i, lease))
            servers[lease.lease_id] = lease.server
            if lease.alive:
                leases.append({**lease_event(i, lease), "renewed_at": round(lease.renewed_at, 3),
                               "expires_at": round(lease.expires_at(), 3)})
        emit("view", quiet=quiet[0], held=leases)

    def go_quiet(*_: Any) -> None:
        quiet[0] = True
        reactor.callFromThread(emit, "quiet")

    async def release_all() -> None:
        stopping[0] = True
        leases = list(held.values())
        held.clear()
        for lease in leases:
            emit("released", client=-1, lease_id=lease.lease_id, feature=lease.feature, count=lease.count,
                 server=lease.server)
        await DeferredList([Deferred.fromCoroutine(lease.release()) for lease in leases])
        for client in clients:
            client.close()
        emit("exit")
        # The last checkin answer resumes us inside a TLS connection's
        # dataReceived; if shutdown went on from there, the reactor would
        # disconnect that very connection under TLSMemoryBIOProtocol's feet
        # (AttributeError on its cleared _tlsConnection). Go on from the loop.
        await sleep(0)

    def start() -> None:
        for i in range(args.clients):
            d = Deferred.fromCoroutine(run_client(i))
            d.addErrback(lambda f, i=i: emit("error", text=f"client {i} stopped: {f.getTraceback()}"[-4000:]))
        LoopingCall(view).start(0.5)

    signal.signal(signal.SIGUSR1, go_quiet)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: Deferred.fromCoroutine(release_all()))
    reactor.callWhenRunning(start)
    emit("start", clients=args.clients, seed=args.seed)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
