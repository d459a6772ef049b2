"""The ``storm`` scenario: every client reconnects at once after its member restarts.

A fresh single member with the SQLite store. 1,000 clients (one connection
and one lease each, from two ``connload.py`` processes) connect, check out
and heartbeat at the advised interval. The member gets SIGKILL and is started
again at once on the same store, so it comes back holding every lease (F6: a
client's server goes away and comes back). As soon as its status says it
serves, all clients reconnect at the same moment and heartbeat their lease
until it is renewed (NotServing, Busy, failed connects and handshakes are
retried after 0.1-0.3 s; a lease the member no longer knows would be checked
out again). The clients wait for the member to serve rather than retry on
their own while it is down, so the figure is the member's, not a client
retry timer's; a real ``LicenseClient`` of a one-member pool retries at its
next heartbeat. In a 3-member pool the same clients fail over to the leader
instead: that is the ``failover`` scenario.

The baseline server gets the same fleet and the same ``kill -9``, is started
again on the same port, and the clients reconnect as soon as it listens.

Figures: kill to serving again; from serving until every client is served
again (and the median client); handshakes per second during the storm (from
the first to the last handshake after the restart); failures (connects,
handshakes and calls that had to be retried, heartbeats not renewed); the
kernel's accept-queue overflows meanwhile (a listener's backlog is the
first thing a storm fills).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from figures import Figure
from fleet import ConnFleet
from harness import Bench, Snapshot, Target, raise_open_files, window


@dataclass
class StormSettings:
    """Knobs of the scenario; written to results.json with the figures' detail."""

    connections: int = 1000
    processes: int = 2
    concurrency: int = 16
    settle: float = 1.0
    deadline: float = 60.0
    baseline_options: tuple[str, ...] = ()
    """For trying what a server change would do, e.g. ``("--backlog", "1024")``; none by default."""

    @classmethod
    def quick(cls) -> StormSettings:
        return cls(connections=200, settle=0.2, deadline=30.0)


class Restartable:
    """A target that can be killed and started again on the same port, and told when it serves."""

    def __init__(self, bench: Bench, kind: str, options: tuple[str, ...] = ()) -> None:
        self.bench = bench
        self.kind = kind
        self.options = options
        if kind == "member":
            tag, n = "storm", 1
            while (bench.workdir / tag).exists():
                n += 1
                tag = f"storm-{n}"
            self.box = bench.new_sandbox(tag)
            self.target = bench.start_member(self.box)
        else:
            self.box = None
            self.target = bench.start_baseline(bench.member().pki, options=options)

    def kill(self) -> None:
        if self.box is not None:
            self.box.kill(self.target.server_name)
        else:
            self.bench.kill(self.target.pid)

    def start(self) -> Target:
        """Start again; returns once it serves (member: its status; baseline: it listens)."""
        if self.box is not None:
            self.target = self.bench.start_member(self.box, self.target.server_name, wait=False)
            while True:
                doc = self.box.status(self.target.server_name, timeout=0.5)
                if doc is not None and doc["serving"] and doc["license"]:
                    break
                proc = self.box.processes.get(self.target.server_name)
                if proc is None or proc.poll() is not None:
                    raise RuntimeError(f"the member exited while restarting: {self.box.log(self.target.server_name)[-2000:]}")
                time.sleep(0.01)
        else:
            self.target = self.bench.start_baseline(self.target.pki, self.target.port, self.options)
        return self.target


def measure(bench: Bench, kind: str, s: StormSettings) -> dict[str, Any]:
    """Connect a fleet to a new ``kind`` target, kill it, restart it, let the fleet storm back."""
    server = Restartable(bench, kind, s.baseline_options if kind == "baseline" else ())
    target = server.target
    raise_open_files(target.pid, s.connections + 1000)
    fleet = ConnFleet(bench, target, s.connections, s.processes, prefix=f"storm-{kind}-")
    out: dict[str, Any] = {}
    try:
        connected = fleet.ask({"cmd": "connect", "concurrency": s.concurrency}, "connected", 300.0)
        out["connected"] = sum(c["ok"] for c in connected)
        out["checked_out"] = sum(c["ok"] for c in fleet.ask({"cmd": "checkout"}, "checked-out", 120.0))
        fleet.ask({"cmd": "pace"}, "pacing")
        time.sleep(s.settle)
        fleet.ask({"cmd": "arm"}, "armed")
        killed = time.monotonic()
        server.kill()
        target = server.start()
        serving = time.monotonic()
        fleet.gather("down", 30.0)
        raise_open_files(target.pid, s.connections + 1000)
        before = Snapshot.take([target.pid], fleet.pids)
        storm = fleet.ask({"cmd": "reconnect", "deadline": s.deadline}, "storm", s.deadline + 30.0)
        after = Snapshot.take([target.pid], fleet.pids)
        served = sum(x["served"] for x in storm)
        handshakes = sum(x["handshakes"] for x in storm)
        first = min((x["first_handshake"] for x in storm if x["first_handshake"]), default=None)
        last = max((x["last_handshake"] for x in storm if x["last_handshake"]), default=None)
        last_served = max((x["last_served"] for x in storm if x["last_served"]), default=None)
        failures: dict[str, int] = {}
        for x in storm:
            for k, v in x["failures"].items():
                failures[k] = failures.get(k, 0) + v
        out["storm"] = window(
            "storm", before, after, served, answers=storm, killed=killed, serving=serving,
            restart_seconds=serving - killed,
            all_served=last_served - serving if last_served and served == s.connections else None,
            median_served_ms=sorted(x["served_after_go"]["p50_ms"] or 0 for x in storm)[len(storm) // 2],
            handshakes=handshakes,
            handshakes_per_s=handshakes / (last - first) if first and last and last > first else None,
            failures=failures,
        )
        out["check"] = fleet.ask({"cmd": "check"}, "checked", 120.0)
    finally:
        fleet.close()
        if server.box is not None:
            server.box.stop_all()
        else:
            bench.kill(server.target.pid)
    bench.runs.append({"scenario": bench.scenario, "targets": [kind], "connections": s.connections,
                       "result": {"phases": [out["storm"]] if "storm" in out else []}})
    return out


def run_storm(bench: Bench, settings: StormSettings) -> list[Figure]:
    member = measure(bench, "member", settings)
    base = measure(bench, "baseline", settings)
    return figures_of(settings, member, base)


def figures_of(s: StormSettings, m: dict[str, Any], b: dict[str, Any]) -> list[Figure]:
    ms, bs = m["storm"], b["storm"]
    renewed = sum(c["renewed"] for c in m["check"])
    fails = sum(ms["failures"].values())
    detail = {"settings": asdict(s), "member": m, "baseline": b}
    return [
        Figure("storm", "storm.clients", "clients reconnecting at once (a lease each)", "clients",
               float(ms["items"]),
               note=f"served again of {s.connections:,}; {renewed:,} renewed by a final heartbeat; "
               f"member kill -9 and restart on its SQLite store, {s.processes} load generator processes",
               detail=detail),
        Figure("storm", "storm.restart", "kill -9 to serving again", "s", ms["restart_seconds"],
               bs["restart_seconds"], better="lower",
               note="member: twistd start, store and license loaded, status serving; baseline: listening"),
        Figure("storm", "storm.all_served", "serving again to every client served", "s", ms["all_served"],
               bs["all_served"], better="lower",
               note=f"median client {ms['median_served_ms'] or 0:.0f} ms "
               f"(baseline {bs['median_served_ms'] or 0:.0f} ms)"),
        Figure("storm", "storm.handshake_rate", "handshakes/s during the storm", "handshakes/s",
               ms["handshakes_per_s"], bs["handshakes_per_s"],
               note=f"{ms['handshakes']:,} handshakes; server CPU busy {ms['server_cpu_util']:.0%} "
               f"(baseline {bs['server_cpu_util']:.0%}); accept queue overflows {ms['listen_overflows']} "
               f"(baseline {bs['listen_overflows']})"),
        Figure("storm", "storm.failures", "retried connects/calls and leases not renewed", "count",
               float(fails), float(sum(bs["failures"].values())), better="lower",
               note=str(ms["failures"]) if fails else "none"),
    ]
