"""The benchmark scenarios, one function each, in a registry that ``run.py`` walks.

A scenario gets the run's ``Bench`` (targets, load generator, /proc samples,
settings) and returns its figures. Adding one (a 3-member pool, failover) is a
function with the ``@scenario`` decorator: start what it needs with
``bench.new_sandbox(tag, members=...)`` and ``bench.start_member(box, name)``,
drive it with ``bench.load([targets...], ...)``, and return ``Figure``s whose
``baseline`` comes from ``bench.baseline()`` under the same load shape.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from figures import Figure
from harness import EXPIRY_FEATURE, FEATURE, Bench, Target, cpu_seconds

HEARTBEAT_INTERVAL = 10.0
"""The default client heartbeat interval (``client_heartbeat`` in pool.ini)."""


ScenarioFn = Callable[[Bench], list[Figure]]


@dataclass(frozen=True)
class Scenario:
    """One named group of measurements."""

    name: str
    description: str
    run: ScenarioFn
    default: bool = True


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, description: str, default: bool = True) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register a scenario; ``default=False`` ones run only when named with ``--only``."""

    def register(fn: ScenarioFn) -> ScenarioFn:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} registered twice")
        SCENARIOS[name] = Scenario(name, description, fn, default)
        return fn

    return register


def phase(result: dict[str, Any], name: str) -> dict[str, Any]:
    for p in result["phases"]:
        if p["name"] == name:
            return p
    raise KeyError(f"no phase {name!r} in load generator result")


def against_baseline(
    bench: Bench,
    members: Target | list[Target],
    n: int,
    k: int,
    plan: list[dict[str, Any]],
    measured: str,
    profile: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The phase ``measured`` of the member(s) and of the baseline under the same load.

    With ``settings.repeat`` > 1 the two are run in turns and the run with
    the median rate of each side is kept (the others stay in results.json),
    so a burst of load from elsewhere on the machine skews one run, not the
    figure. Only the member's first run is profiled. The baseline's runs of
    a shape and measured phase are kept and reused if another scenario asks
    for the same (marked ``reused`` in the figure's detail).
    """
    rate = "items_per_s"
    ours: list[dict[str, Any]] = []
    # The baseline is one server whatever the members are: a shape and phase it
    # was measured under earlier in this run (checkout 1x1 and 50x4, for the
    # pool) is not measured again.
    key = json.dumps([n, k, next(p for p in plan if p.get("name") == measured), measured], sort_keys=True)
    known = bench.baseline_phases.get(key)
    theirs: list[dict[str, Any]] = []
    for i in range(max(1, bench.settings.repeat)):
        ours.append(phase(bench.load(members, n, k, plan, profile=profile if i == 0 else None), measured))
        if known is None:
            theirs.append(phase(bench.load(bench.baseline(), n, k, plan), measured))
    if known is None:
        bench.baseline_phases[key] = theirs
    else:
        theirs = [dict(p, reused=True) for p in known]
    ours.sort(key=lambda p: p[rate])
    theirs.sort(key=lambda p: p[rate])
    return ours[len(ours) // 2], theirs[len(theirs) // 2]


def _sides(m: dict[str, Any], b: dict[str, Any] | None) -> dict[str, Any]:
    """What goes beside a figure: who was busy, and any errors."""
    keys = ("calls", "items", "seconds", "server_cpu_util", "loadgen_cpu", "other_cpu_util", "errors", "reused")
    detail = {"member": {k: m.get(k) for k in keys}}
    if b is not None:
        detail["baseline"] = {k: b.get(k) for k in keys}
    return detail


def rate_and_latency(
    scenario_name: str,
    shape: str,
    unit: str,
    m: dict[str, Any],
    b: dict[str, Any] | None,
    items: bool = False,
) -> list[Figure]:
    """Rate, p50, p99 and server CPU per item of the member, each against the baseline."""
    rate_key = "items_per_s" if items else "calls_per_s"
    base = b or {}
    detail = _sides(m, b)
    return [
        Figure(
            scenario_name,
            f"{scenario_name}.{shape}.rate",
            f"{shape} rate",
            unit,
            m[rate_key],
            base.get(rate_key),
            detail=detail,
        ),
        Figure(
            scenario_name,
            f"{scenario_name}.{shape}.p50",
            f"{shape} p50 latency",
            "ms",
            m["p50_ms"],
            base.get("p50_ms"),
            better="lower",
        ),
        Figure(
            scenario_name,
            f"{scenario_name}.{shape}.p99",
            f"{shape} p99 latency",
            "ms",
            m["p99_ms"],
            base.get("p99_ms"),
            better="lower",
        ),
        Figure(
            scenario_name,
            f"{scenario_name}.{shape}.cpu",
            f"{shape} server CPU per {'item' if items else 'call'}",
            "us",
            m.get("server_cpu_us_per_item"),
            base.get("server_cpu_us_per_item"),
            better="lower",
            note=f"server CPU busy {m.get('server_cpu_util', 0):.0%} "
            f"(baseline {base.get('server_cpu_util', 0):.0%})",
        ),
    ]


@scenario("checkout", "checkout latency and throughput under four load shapes, against the baseline")
def checkout(bench: Bench) -> list[Figure]:
    s = bench.settings
    figures: list[Figure] = []
    for n, k in s.checkout_shapes:
        shape = f"{n}x{k}"
        plan = [
            {"op": "checkout", "name": "checkout", "duration": s.duration, "warmup": s.warmup},
            {"op": "checkin", "name": "release"},
        ]
        profile = "checkout" if s.profile and shape in ("1x1", "50x4") else None
        m, b = against_baseline(bench, bench.member(), n, k, plan, "checkout", profile)
        figures += rate_and_latency("checkout", shape, "calls/s", m, b)
    return figures


@scenario("heartbeat", "heartbeat renewals with 100 leases a call (and 1 a call), against the baseline")
def heartbeat(bench: Bench) -> list[Figure]:
    s = bench.settings
    figures: list[Figure] = []
    shapes = [(n, k, s.leases_per_heartbeat) for n, k in s.heartbeat_shapes] + [(50, 4, 1)]
    for n, k, per_call in shapes:
        shape = f"{n}x{k}" + ("" if per_call == s.leases_per_heartbeat else f"/{per_call}")
        plan = [
            {"op": "checkout", "name": "setup", "per_client": per_call},
            {
                "op": "heartbeat",
                "name": "heartbeat",
                "duration": s.duration,
                "warmup": s.warmup,
                "leases_per_call": per_call,
            },
            {"op": "checkin", "name": "release"},
        ]
        profile = "heartbeat" if s.profile and (n, k) == (10, 4) else None
        m, b = against_baseline(bench, bench.member(), n, k, plan, "heartbeat", profile)
        figures += rate_and_latency("heartbeat", shape, "renewals/s", m, b, items=True)
        figures.append(
            Figure(
                "heartbeat",
                f"heartbeat.{shape}.leases_per_core",
                f"{shape} leases one core keeps alive (est.)",
                "leases",
                HEARTBEAT_INTERVAL * 1e6 / cpu if (cpu := m.get("server_cpu_us_per_item")) else None,
                note=f"the default {HEARTBEAT_INTERVAL:g} s heartbeat interval / server CPU per renewal, "
                f"{per_call} lease(s) per client; measured {m['items_per_s'] * HEARTBEAT_INTERVAL:,.0f} "
                f"(renewals/s x {HEARTBEAT_INTERVAL:g} s) at {m.get('server_cpu_util', 0):.0%} server CPU",
            )
        )
    return figures


@scenario("checkin", "checkin throughput of leases checked out just before, against the baseline")
def checkin(bench: Bench) -> list[Figure]:
    s = bench.settings
    n, k = s.checkin_shape
    plan = [
        {"op": "checkout", "name": "setup", "count": s.checkin_leases},
        {"op": "checkin", "name": "checkin"},
    ]
    m, b = against_baseline(bench, bench.member(), n, k, plan, "checkin")
    return rate_and_latency("checkin", f"{n}x{k}", "calls/s", m, b)


@scenario("expiry", "leases left to expire: how fast the sweep frees them, and its CPU per lease")
def expiry(bench: Bench) -> list[Figure]:
    s = bench.settings
    target = bench.member()
    n_leases = s.expiry_leases
    marks: dict[str, float] = {}

    def mark(event: dict[str, Any]) -> None:
        if event.get("event") == "window-end" and event.get("phase") == "renew":
            marks["renewed"] = time.monotonic()

    # Check out, then renew them all in one quick round, so every lease
    # expires within a fraction of a second, one TTL later.
    plan = [
        {"op": "checkout", "name": "setup", "count": n_leases},
        {"op": "heartbeat", "name": "renew", "rounds": 1, "leases_per_call": 100},
    ]
    result = bench.load(target, 50, 4, plan, feature=EXPIRY_FEATURE, on_event=mark)
    renew = phase(result, "renew")
    held = renew["items"]
    expected = marks["renewed"] + s.expiry_ttl
    # A client checking out one lease at a time meanwhile shows how long the
    # sweep holds up the reactor.
    probe_plan = [
        {
            "op": "checkout",
            "name": "probe",
            "duration": max(1.0, expected - time.monotonic() + 3.0),
            "warmup": 0.0,
        },
        {"op": "checkin", "name": "release"},
    ]
    probe: dict[str, Any] = {}
    prober = threading.Thread(
        target=lambda: probe.update(phase(bench.load(target, 1, 1, probe_plan), "probe"))
    )
    prober.start()
    samples: list[tuple[float, int, float]] = []
    try:
        deadline = expected + 30.0
        while time.monotonic() < deadline:
            in_use = bench.feature_in_use(target, EXPIRY_FEATURE)
            samples.append((time.monotonic(), -1 if in_use is None else in_use, cpu_seconds(target.pid)))
            if in_use == 0:
                break
            time.sleep(0.02)
    finally:
        prober.join()
    dropping = [t for t in samples if 0 <= t[1] < held]
    done = [t for t in samples if t[1] == 0]
    if not dropping or not done:
        return [
            Figure(
                "expiry",
                "expiry.drain",
                "expiry: all freed",
                "s",
                None,
                note=f"{held} leases did not all expire within 30 s of their TTL",
            )
        ]
    first, last = dropping[0], done[0]
    before = [t for t in samples[: samples.index(first)] if t[1] >= held]
    idle_rate = 0.0
    if len(before) >= 2 and before[-1][0] > before[0][0]:
        idle_rate = (before[-1][2] - before[0][2]) / (before[-1][0] - before[0][0])
    start = before[-1] if before else first
    sweep_cpu = max(0.0, (last[2] - start[2]) - idle_rate * (last[0] - start[0]))
    per_lease_us = sweep_cpu / held * 1e6 if held else None
    drain = last[0] - first[0]
    return [
        Figure(
            "expiry",
            "expiry.leases",
            "leases left to expire",
            "leases",
            float(held),
            note=f"lease_ttl {s.expiry_ttl} s; {n_leases - held} not renewed in time",
        ),
        Figure(
            "expiry",
            "expiry.late",
            "last freed after its TTL",
            "s",
            last[0] - expected,
            better="lower",
            note="includes the 1 s sweep period and the status poll interval (20 ms)",
        ),
        Figure("expiry", "expiry.drain", "first to last freed", "s", drain, better="lower"),
        Figure(
            "expiry",
            "expiry.cpu",
            "server CPU per expired lease",
            "us",
            per_lease_us,
            better="lower",
            note=f"sweep CPU {sweep_cpu:.3f} s above idle",
        ),
        Figure(
            "expiry",
            "expiry.capacity",
            "expiry capacity (1 / CPU per lease)",
            "leases/s",
            1e6 / per_lease_us if per_lease_us else None,
        ),
        Figure(
            "expiry",
            "expiry.probe_max",
            "max checkout latency during the sweep",
            "ms",
            probe.get("max_ms"),
            better="lower",
            note=f"one client checking out in a loop; its p50 was {probe.get('p50_ms') or 0:.2f} ms",
        ),
    ]


@scenario("memory", "resident memory of a fresh member holding many leases; CPU per renewal at that size")
def memory(bench: Bench) -> list[Figure]:
    s = bench.settings
    box = bench.new_sandbox("memory")
    target = bench.start_member(box)
    n, k = s.memory_shape
    plan = [
        {"op": "checkout", "name": "warm-checkout", "count": 2000},
        {"op": "checkin", "name": "warm-checkin"},
        {"op": "pause", "seconds": 1.0},
        {"op": "checkout", "name": "hold", "count": s.memory_leases},
        {"op": "pause", "seconds": 1.0},
        {"op": "heartbeat", "name": "renew-all", "rounds": 1, "leases_per_call": 100},
    ]
    try:
        result = bench.load(target, n, k, plan, clients=s.memory_clients)
    finally:
        # Checking 100,000 leases in would take longer than filling; stopping frees them all.
        box.stop("ls1")
    hold, renew = phase(result, "hold"), phase(result, "renew-all")
    held = hold["items"]
    before, holding = hold["server_rss_start"], renew["server_rss_start"]
    per_lease = (holding - before) / held if held else None
    per_client = held // s.memory_clients if s.memory_clients else held
    db = box.root / "data" / "ls1.db"
    db_size = db.stat().st_size if db.exists() else None
    shape = f"{n}x{k}"
    mib = 1024 * 1024
    return [
        Figure(
            "memory",
            "memory.rss_before",
            "RSS before",
            "MiB",
            before / mib,
            better="lower",
            note="after a warm-up of 2,000 checkouts and checkins, connections open",
        ),
        Figure(
            "memory",
            "memory.rss_holding",
            f"RSS holding {held:,} leases",
            "MiB",
            holding / mib,
            better="lower",
        ),
        Figure(
            "memory",
            "memory.bytes_per_lease",
            "resident memory per lease",
            "B",
            per_lease,
            better="lower",
            note=f"{s.memory_clients:,} client ids over {n} connections",
        ),
        Figure(
            "memory",
            "memory.store_bytes_per_lease",
            "store file size per lease",
            "B",
            db_size / held if db_size and held else None,
            better="lower",
            note="SQLite file, WAL excluded",
        ),
        Figure(
            "memory",
            f"memory.{shape}.checkout_rate",
            f"checkout rate filling to {held:,}",
            "calls/s",
            hold["calls_per_s"],
            detail=_sides(hold, None),
        ),
        Figure(
            "memory",
            "memory.renew_rate",
            f"renewals/s at {held:,} leases ({per_client} a call)",
            "renewals/s",
            renew["items_per_s"],
            detail=_sides(renew, None),
        ),
        Figure(
            "memory",
            "memory.renew_cpu",
            "server CPU per renewal at that size",
            "us",
            renew.get("server_cpu_us_per_item"),
            better="lower",
        ),
    ]


@scenario("pool-checkout", "checkout spread over a 3-member pool: 1x1 (sequential, one member), 3x1, 50x4")
def pool_checkout(bench: Bench) -> list[Figure]:
    s = bench.settings
    box = bench.new_sandbox("pool", members=("ls1", "ls2", "ls3"))
    # Each member issues from its own allocation once the leader has confirmed it.
    members = bench.start_pool(box, acting=FEATURE)
    figures: list[Figure] = []
    try:
        for n, k in s.pool_checkout_shapes:
            shape = f"{n}x{k}"
            # No checkin phase: the leases stay (a few thousand of each member's
            # 333,333 seats) until the pool is stopped below.
            plan = [{"op": "checkout", "name": "checkout", "duration": s.duration, "warmup": s.warmup}]
            m, b = against_baseline(bench, members, n, k, plan, "checkout")
            shown = rate_and_latency("pool-checkout", shape, "calls/s", m, b)
            by_member = dict(zip([t.server_name for t in members], m.get("calls_by_target", []), strict=False))
            errors = {t.server_name: e for t, e in zip(members, m.get("errors_by_target", []), strict=False) if e}
            shown[0].note = (f"calls per member {by_member}; " if n > 1 else "") + (
                f"errors: {errors}" if m["errors"] else "no errors"
            )
            figures += shown
    finally:
        box.stop_all()
    return figures


@scenario(
    "failover",
    "kill -9 the leader of a 3-member pool whose seats 30 clients hold: 10 kills half full, 10 full",
)
def failover(bench: Bench) -> list[Figure]:
    from failover import FailoverSettings, run_failover

    # --quick (1 s points) makes it a smoke run: 3 kills per level.
    settings = FailoverSettings(repetitions=3 if bench.settings.duration <= 1.0 else 10)
    return run_failover(bench, settings)


@scenario(
    "scale",
    "100,000 leases across a 3-member pool at the advised 10 s heartbeat: memory and CPU per lease, per member",
)
def scale(bench: Bench) -> list[Figure]:
    from scale import ScaleSettings, run_scale

    return run_scale(bench, ScaleSettings.quick() if bench.settings.duration <= 1.0 else ScaleSettings())


@scenario(
    "connections",
    "10,000 concurrent mutual-TLS client connections to one member, each holding a lease, against the baseline",
)
def connections(bench: Bench) -> list[Figure]:
    from connections import ConnectionsSettings, run_connections

    quick = bench.settings.duration <= 1.0
    return run_connections(bench, ConnectionsSettings.quick() if quick else ConnectionsSettings())


@scenario(
    "storm",
    "reconnection storm: 1,000 clients reconnect at once after their member's kill -9 and restart, vs baseline",
)
def storm(bench: Bench) -> list[Figure]:
    from storm import StormSettings, run_storm

    return run_storm(bench, StormSettings.quick() if bench.settings.duration <= 1.0 else StormSettings())
