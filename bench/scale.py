"""The ``scale`` scenario: 100,000 leases held across a 3-member pool at the default heartbeat.

Three real ``twistd`` members with the SQLite store and the default timings.
One load generator process (``loadgen.py``) stands in for 10,000 logical
clients of 10 leases each, multiplexed over 30 connections spread round
robin over the members, so each member issues a third of the leases from its
own allocation (the license splits the feature's 1,000,000 seats evenly).

1. a warm-up of checkouts and checkins, then 100,000 checkouts (``fill``);
2. the harness waits until every member's status counts all of them (the
   leases reach the record through the members' status reports);
3. every client heartbeats its 10 leases once per interval the pool advised
   in its Checkout answers (10 s by default), the clients' turns spread
   evenly over the interval (``hold``, 20 s: two rounds).

Per member: resident memory per lease (RSS holding minus RSS before the
fill, over the leases that member issued), server CPU per renewal in the
``hold`` window (everything the member did meanwhile, its share of the pool's
status reports and record included) and from it how many leases one core
keeps alive at that interval. For the pool: renewals per second achieved
against required (leases / interval), heartbeat latency, turns missed, errors,
and how long after the fill every member counted every lease.

The baseline (``baseline_server.py``) gets the same fleet: 10,000 clients of
10 made-up lease ids (it renews any id) on as many connections, paced the same
way, for a shorter window (one interval); its renewals/s, latency and CPU per
renewal are the ratios' denominators.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from figures import Figure
from harness import FEATURE, Bench, Target

MEMBERS = ("ls1", "ls2", "ls3")
MIB = 1024 * 1024


@dataclass
class ScaleSettings:
    """Knobs of the scenario; written to results.json with the figures' detail."""

    leases: int = 100_000
    clients: int = 10_000
    connections: int = 30
    outstanding: int = 8
    warmup_leases: int = 1500
    window: float = 15.0
    baseline_window: float = 5.0
    count_timeout: float = 90.0

    @classmethod
    def quick(cls) -> ScaleSettings:
        return cls(leases=3000, clients=300, connections=6, outstanding=4, warmup_leases=300, window=2.0,
                   baseline_window=2.0, count_timeout=30.0)


def counts(box: Any) -> dict[str, dict[str, Any] | None]:
    """Each member's view of the feature: leases in use pool-wide and per member (None: no answer)."""
    out: dict[str, dict[str, Any] | None] = {}
    for name in box.members:
        doc = box.status(name, timeout=5.0)
        feature = None
        if doc is not None:
            feature = next((f for f in doc["features"] if f["name"] == FEATURE), None)
        out[name] = None if feature is None else {
            "in_use": feature["in_use"],
            "count": feature["count"],
            "members": {m: u["used"] for m, u in feature["members"].items()},
        }
    return out


def run_scale(bench: Bench, settings: ScaleSettings) -> list[Figure]:
    """Fill the pool, wait until it counts every lease, heartbeat at the advised interval; figures."""
    s = settings
    box = bench.new_sandbox("scale", members=MEMBERS)
    members = bench.start_pool(box, acting=FEATURE)
    marks: dict[str, Any] = {}

    def on_event(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "window-end" and event.get("phase") == "fill":
            marks["filled"] = time.monotonic()
        elif kind == "await":
            marks["expected"] = event["leases_held"]
            deadline = time.monotonic() + s.count_timeout
            while True:
                seen = counts(box)
                held = [c["in_use"] if c else -1 for c in seen.values()]
                if min(held) >= marks.get("expected", s.leases) or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
            marks["counted"] = time.monotonic()
            marks["counts"] = seen
            bench.progress(f"  scale: members count {held} leases "
                           f"{marks['counted'] - marks['filled']:.1f} s after the fill")

    plan = [
        {"op": "checkout", "name": "warm-checkout", "count": s.warmup_leases, "retry": True},
        {"op": "checkin", "name": "warm-checkin"},
        {"op": "pause", "seconds": 1.0},
        {"op": "checkout", "name": "fill", "count": s.leases, "retry": True},
        {"op": "await", "name": "counted"},
        {"op": "heartbeat", "name": "hold", "paced": True, "duration": s.window, "warmup": 1.0},
    ]
    try:
        result = bench.load(members, s.connections, s.outstanding, plan, clients=s.clients, on_event=on_event,
                            profile="hold" if bench.settings.profile else None)
        after = counts(box)
    finally:
        # Stopping frees every lease at once; checking 100,000 in would take longer than filling.
        box.stop_all()
    phases = {p["name"]: p for p in result["phases"]}
    fill, hold = phases["fill"], phases["hold"]
    interval = hold.get("interval") or 10.0
    per_client = max(1, result["leases_held"] // s.clients)
    base_plan = [
        {"op": "fabricate", "per_client": per_client},
        {"op": "heartbeat", "name": "hold", "paced": True, "duration": s.baseline_window, "warmup": 1.0,
         "interval": interval},
    ]
    base = bench.load(bench.baseline(), s.connections, s.outstanding, base_plan, clients=s.clients)
    base_hold = next(p for p in base["phases"] if p["name"] == "hold")
    return figures_of(s, members, result, fill, hold, base_hold, marks, after)


def _per(value: float, count: float) -> float | None:
    return value / count if count else None


def figures_of(s: ScaleSettings, members: list[Target], result: dict[str, Any], fill: dict[str, Any],
               hold: dict[str, Any], base: dict[str, Any], marks: dict[str, Any],
               after: dict[str, dict[str, Any] | None]) -> list[Figure]:
    held = result["leases_held"]
    interval = hold.get("interval") or 10.0
    required = hold.get("required_per_s") or held / interval
    counted = [c["in_use"] if c else None for c in marks.get("counts", {}).values()]
    lag = marks["counted"] - marks["filled"] if "counted" in marks and "filled" in marks else None
    errors = sum(hold["errors"].values())
    detail = {
        "settings": asdict(s),
        "fill": {k: fill.get(k) for k in ("calls", "seconds", "calls_per_s", "errors", "items_by_target",
                                          "server_cpu_util", "loadgen_cpu", "other_cpu_util")},
        "hold": {k: hold.get(k) for k in ("calls", "items", "seconds", "errors", "missed", "items_by_target",
                                          "server_cpu_s_by_target", "server_cpu_util", "loadgen_cpu",
                                          "other_cpu_util", "pace_lag_p99_ms", "pace_lag_max_ms")},
        "baseline_hold": {k: base.get(k) for k in ("calls", "items", "seconds", "errors", "missed",
                                                   "server_cpu_util", "loadgen_cpu", "other_cpu_util")},
        "counted_after_fill": marks.get("counts"),
        "counted_at_end": after,
        "advised_heartbeat": result.get("advised_heartbeat"),
    }
    ok = all(c is not None and c >= held for c in counted)
    figures = [
        Figure("scale", "scale.leases", "leases held across 3 members", "leases", float(held),
               note=f"{s.clients:,} clients x {held // max(1, s.clients)} leases over {s.connections} "
               f"connections; per member {fill['items_by_target']}; fill at {fill['calls_per_s']:,.0f} "
               f"checkouts/s", detail=detail),
        Figure("scale", "scale.counted", "leases the pool counts (least of 3 statuses)", "leases",
               float(min(c for c in counted if c is not None)) if any(c is not None for c in counted) else None,
               note=("every member counts them all" if ok else f"NOT all counted: {counted}")
               + (f"; {lag:.1f} s after the last checkout" if lag is not None else "")),
        Figure("scale", "scale.count_lag", "every member counts every lease, after the fill", "s", lag,
               better="lower", note="leases reach the record through status reports"),
        Figure("scale", "scale.renewals", f"renewals/s at the {interval:g} s heartbeat", "renewals/s",
               hold["items_per_s"], base["items_per_s"],
               note=f"required {required:,.0f}/s ({held:,} leases / {interval:g} s): "
               f"{hold['items_per_s'] / required:.0%} achieved; {hold.get('missed', 0)} turns missed; "
               f"loadgen lag p99 {hold.get('pace_lag_p99_ms') or 0:.0f} ms"),
        Figure("scale", "scale.p50", "heartbeat p50 latency (10 leases)", "ms", hold["p50_ms"], base["p50_ms"],
               better="lower"),
        Figure("scale", "scale.p99", "heartbeat p99 latency (10 leases)", "ms", hold["p99_ms"], base["p99_ms"],
               better="lower"),
        Figure("scale", "scale.errors", "heartbeat errors and leases not renewed", "count", float(errors),
               better="lower", note=str(hold["errors"]) if errors else "none"),
    ]
    growth = [hold["server_rss_start_by_target"][i] - fill["server_rss_start_by_target"][i]
              for i in range(len(members))]
    worst = max(range(len(members)), key=lambda i: growth[i])
    figures.append(Figure(
        "scale", "scale.bytes_per_pool_lease", "resident memory per lease of the pool, worst member", "B",
        _per(growth[worst], held), better="lower",
        note=f"{members[worst].server_name}: {growth[worst] / MIB:.0f} MiB for the {held:,} leases the "
        f"pool holds (its record lists them all, its seat table its own third)"))
    base_cpu = base.get("server_cpu_us_per_item")
    for i, member in enumerate(members):
        name = member.server_name
        issued = fill["items_by_target"][i] if i < len(fill["items_by_target"]) else 0
        before = fill["server_rss_start_by_target"][i]
        holding = hold["server_rss_start_by_target"][i]
        cpu = hold["server_cpu_s_by_target"][i]
        renewed = hold["items_by_target"][i] if i < len(hold["items_by_target"]) else 0
        cpu_us = _per(cpu * 1e6, renewed)
        pool_bytes = _per(holding - before, held)
        figures += [
            Figure("scale", f"scale.{name}.bytes_per_lease", f"{name} resident memory per lease it issued",
                   "B", _per(holding - before, issued), better="lower",
                   note=f"{before / MIB:.0f} -> {holding / MIB:.0f} MiB for {issued:,} leases; "
                   f"{pool_bytes or 0:.0f} B per lease of the pool (the record lists all {held:,})"),
            Figure("scale", f"scale.{name}.cpu_per_renewal", f"{name} server CPU per renewal", "us", cpu_us,
                   base_cpu, better="lower",
                   note=f"{cpu / hold['seconds']:.0%} of a core for {renewed / hold['seconds']:,.0f} renewals/s"),
            Figure("scale", f"scale.{name}.leases_per_core", f"{name} leases one core sustains (est.)",
                   "leases", interval * 1e6 / cpu_us if cpu_us else None,
                   interval * 1e6 / base_cpu if base_cpu else None,
                   note=f"{interval:g} s heartbeat / CPU per renewal at {issued:,} leases"),
        ]
    return figures
