"""The ``connections`` scenario: 10,000 concurrent mutual-TLS client connections to one member.

The connections come from a few ``connload.py`` processes (``fleet.py``), one
logical client each, at most 64 handshakes in flight per process. Then every
connection checks out one lease and heartbeats it at the interval the member
advised (10 s), the turns spread evenly, for one interval; last, every
connection sends one more heartbeat, which must come back renewed.

Measured on the member and, in the same run with the same fleet, on the
baseline server: the handshake rate while connecting (handshakes / seconds
from the first connect to the last handshake, over every process), the
server's CPU per handshake, its resident memory per connection (before any
lease) and with a lease each, its CPU while holding the connections with
only the heartbeats going, the heartbeat latency, and how many connections
were served at the end. The member's open-files limit is raised to its hard
limit first if it is below what the connections need.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from figures import Figure
from fleet import ConnFleet
from harness import Bench, Snapshot, Target, open_files_limit, raise_open_files, window


@dataclass
class ConnectionsSettings:
    """Knobs of the scenario; written to results.json with the figures' detail."""

    connections: int = 10_000
    baseline_connections: int = 2_000
    processes: int = 2
    concurrency: int = 16
    hold: float = 5.0
    warmup: float = 1.0

    @classmethod
    def quick(cls) -> ConnectionsSettings:
        return cls(connections=400, baseline_connections=400, hold=1.0, warmup=0.2)


def measure(bench: Bench, target: Target, s: ConnectionsSettings, connections: int,
            interval: float | None = None) -> dict[str, Any]:
    """Connect, check out, hold and check one fleet against ``target``; the phases and answers.

    ``interval`` overrides the heartbeat interval the target advises.
    """
    limit = raise_open_files(target.pid, connections + 1000)
    fleet = ConnFleet(bench, target, connections, s.processes, prefix=f"conn-{target.kind}-")
    out: dict[str, Any] = {"open_files_limit": limit, "processes": len(fleet.procs), "connections": connections}
    try:
        servers, gens = [target.pid], fleet.pids
        s0 = Snapshot.take(servers, gens)
        connected = fleet.ask({"cmd": "connect", "concurrency": s.concurrency}, "connected", 300.0)
        s1 = Snapshot.take(servers, gens)
        ok = sum(c["ok"] for c in connected)
        first = min(c["start"] for c in connected)
        last = max(c["last"] for c in connected if c["last"] is not None) if ok else first
        out["connect"] = window("connect", s0, s1, ok, answers=connected,
                                handshakes_per_s=ok / (last - first) if last > first else None,
                                handshake_seconds=last - first)
        checked_out = fleet.ask({"cmd": "checkout"}, "checked-out", 120.0)
        s2 = Snapshot.take(servers, gens)
        out["checkout"] = window("checkout", s1, s2, sum(c["ok"] for c in checked_out), answers=checked_out)
        fleet.ask({"cmd": "pace", "interval": interval}, "pacing")
        time.sleep(s.warmup)
        fleet.ask({"cmd": "stats"}, "stats")
        s3 = Snapshot.take(servers, gens)
        time.sleep(s.hold)
        stats = fleet.ask({"cmd": "stats"}, "stats")
        s4 = Snapshot.take(servers, gens)
        renewed = sum(x["renewed"] for x in stats)
        out["hold"] = window("hold", s3, s4, renewed, answers=stats,
                             interval=max(x["interval"] for x in stats),
                             p99_ms=max((x["p99_ms"] or 0) for x in stats),
                             p50_ms=sorted(x["p50_ms"] or 0 for x in stats)[len(stats) // 2],
                             errors=sum(sum(x["errors"].values()) for x in stats),
                             missed=sum(x["missed"] for x in stats))
        started = time.monotonic()
        out["check"] = fleet.ask({"cmd": "check"}, "checked", 120.0)
        out["check_seconds"] = time.monotonic() - started
        out["open_files_limit_after"] = open_files_limit(target.pid)
    finally:
        started = time.monotonic()
        fleet.close()
        out["close_seconds"] = time.monotonic() - started
    bench.runs.append({"scenario": bench.scenario, "targets": [target.kind], "connections": connections,
                       "result": {"phases": [out[k] for k in ("connect", "checkout", "hold") if k in out]}})
    return out


def run_connections(bench: Bench, settings: ConnectionsSettings) -> list[Figure]:
    """The member's fleet, then the baseline's; their figures side by side.

    The baseline gets the same fleet shape (processes, handshakes in flight)
    with fewer connections, each heartbeating proportionally more often so the
    heartbeats per second are the member's: its rates and its costs per
    handshake, connection and heartbeat do not depend on the count, and
    connecting 10,000 twice would double the scenario's time.
    """
    member = measure(bench, bench.member(), settings, settings.connections)
    # The same heartbeats per second as the member's fleet, from fewer
    # connections, so the CPU per heartbeat is compared at the same rate.
    interval = member["hold"]["interval"] * settings.baseline_connections / settings.connections
    base = measure(bench, bench.baseline(), settings, settings.baseline_connections, interval)
    return figures_of(settings, member, base)


def _per(value: float, count: float) -> float | None:
    return value / count if count else None


def figures_of(s: ConnectionsSettings, m: dict[str, Any], b: dict[str, Any]) -> list[Figure]:
    n = s.connections
    mc, bc = m["connect"], b["connect"]
    mh, bh = m["hold"], b["hold"]
    served = sum(c["renewed"] for c in m["check"])
    statuses: dict[str, int] = {}
    for c in m["check"]:
        for k, v in c["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    interval = mh.get("interval") or 10.0
    detail = {"settings": asdict(s), "member": m, "baseline": b}
    errors = {k: v for c in mc["answers"] for k, v in c["errors"].items()}
    base_n = f"baseline: {b['connections']:,} connections"
    return [
        Figure("connections", "connections.open", "client connections open at once", "connections",
               float(mc["items"]),
               note=f"of {n:,} over {m['processes']} load generator processes, {s.concurrency} handshakes in "
               f"flight each; connect errors {errors or 'none'}; member open-files limit "
               f"{m['open_files_limit']:,}; accept queue overflows {mc['listen_overflows']}",
               detail=detail),
        Figure("connections", "connections.handshake_rate", "TLS handshakes/s while connecting", "handshakes/s",
               mc["handshakes_per_s"], bc["handshakes_per_s"],
               note=f"{mc['handshake_seconds']:.1f} s for all ({base_n} in {bc['handshake_seconds']:.1f} s); "
               f"server CPU busy {mc['server_cpu_util']:.0%} (baseline {bc['server_cpu_util']:.0%}), "
               f"load generators {mc['loadgen_cpu']:.2f} cores"),
        Figure("connections", "connections.handshake_cpu", "server CPU per handshake", "us",
               mc["server_cpu_us_per_item"], bc["server_cpu_us_per_item"], better="lower"),
        Figure("connections", "connections.rss_per_connection", "server RSS per connection (no lease)", "B",
               _per(mc["server_rss_end"] - mc["server_rss_start"], mc["items"]),
               _per(bc["server_rss_end"] - bc["server_rss_start"], bc["items"]), better="lower",
               note=f"{mc['server_rss_start'] / 2**20:.0f} -> {mc['server_rss_end'] / 2**20:.0f} MiB; "
               f"with a lease each {m['checkout']['server_rss_end'] / 2**20:.0f} MiB"),
        Figure("connections", "connections.hold_cpu", "server CPU holding them (heartbeats only)", "% core",
               mh["server_cpu_util"] * 100, better="lower",
               note=f"{mh['items'] / mh['seconds']:,.0f} renewals/s (required {n / interval:,.0f}/s at "
               f"{interval:g} s); {mh['errors']} errors, {mh['missed']} turns missed"),
        Figure("connections", "connections.heartbeat_cpu", "server CPU per heartbeat while holding", "us",
               mh["server_cpu_us_per_item"], bh["server_cpu_us_per_item"], better="lower",
               note="the whole process's CPU in the window over the heartbeats answered: one lease a "
               f"call, as many connections as clients; {base_n} heartbeating every "
               f"{bh.get('interval') or 0:g} s, the same heartbeats/s"),
        Figure("connections", "connections.hold_p99", "heartbeat p99 latency while holding", "ms",
               mh["p99_ms"], bh["p99_ms"], better="lower"),
        Figure("connections", "connections.served", "connections served at the end (heartbeat renewed)",
               "connections", float(served), note=f"of {n:,}: {statuses if served < n else 'all'}"),
    ]
