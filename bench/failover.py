"""The ``failover`` scenario: ``kill -9`` the leader of a 3-member pool whose seats clients hold.

Three real ``twistd`` members with the default timings (election timeout
1 s, allocation lease 2 s, clock drift 5%) and the SQLite store. The
applications run in their own process (``failover_client.py``): one
``LicenseClient`` per logical client, homed round robin on the members and
heartbeating at the interval the pool advises (10 s), plus a few probe
clients that check a seat of another feature out and in without pause, the
steady checkout load. An observer thread here polls every member's verbose
status about every 100 ms.

Each repetition: place the fleet's leases evenly on the members (``level``
leases in all, a third on each); wait for a steady pool (one leader for
1.5 s, every member caught up and acting on the feature, the leader's
allocations of the feature unchanged for 2 s); ``kill -9`` the
leader; measure; restart the killed member. What is measured, from the kill:

- ``leader``: until both survivors name the same new leader, which says it leads;
- ``renewed``: until every lease the killed leader held is renewed or
  converted by a surviving member (per lease: the first renewal after the
  kill that the client saw, at ``Lease.renewed_at``). Leases on the two
  survivors need nothing: they are renewed at their next heartbeat, up to
  10 s later, by their own member (``others``, reported apart);
- ``honoured``: until every lease the clients hold is again in the lease
  list of a member that acts on the feature (the observer's view: the
  survivors stop acting for a moment if the election outlasts their
  allocation lease);
- ``checkout``: until a probe checkout that started after the kill, and
  after the last one that failed, succeeded;
- over-issued seats: at every observer round, the seats in the leases of
  the members acting on the feature, added up, above the count;
- lost leases: ``Lease.lost`` fired in the client process.

Half the repetitions run with the pool half full (``count / 2`` leases),
then the fleet checks out the rest and the other half run with it full.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from figures import Figure
from harness import BENCH, REPO, Bench, child_env

from licensing.sandbox import Sandbox, make_sandbox

MEMBERS = ("ls1", "ls2", "ls3")
FEATURE = "failover"
PROBE_FEATURE = "failover-probe"


@dataclass
class FailoverSettings:
    """Knobs of the scenario; written to results.json with every figure's detail."""

    count: int = 30
    clients: int = 30
    probes: int = 3
    probe_count: int = 300
    repetitions: int = 10
    steady_for: float = 1.5
    seats_steady_for: float = 2.0
    """Before a kill, the leader's allocations of ``FEATURE`` must not have changed for this
    long (two status reports): a kill while seats are moving is the reclaim path, which the
    full pool measures; a pool left alone is steady within a few seconds."""
    observer_interval: float = 0.1
    window: float = 20.0
    grace: float = 0.5
    place_deadline: float = 10.0

    def features(self) -> dict[str, dict[str, Any]]:
        # lease_ttl left out: the license default (60 s), so the pool advises
        # its default 10 s heartbeat (the smaller of client_heartbeat and TTL / 3).
        common = {"version": "1.0", "expires": "never", "majority_rule": "yes"}
        return {FEATURE: {**common, "count": self.count},
                PROBE_FEATURE: {**common, "count": self.probe_count}}


# -- members' status -----------------------------------------------------------


def fetch(box: Sandbox, name: str, verbose: bool = False, timeout: float = 0.3) -> dict[str, Any] | None:
    url = f"http://127.0.0.1:{box.ports[name]['http']}/api/status" + ("?verbose=1" if verbose else "")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def agreed_leader(docs: dict[str, dict[str, Any] | None]) -> str | None:
    """The leader every member in ``docs`` names (same term), if it is one of them and leads."""
    if not docs or any(doc is None for doc in docs.values()):
        return None
    views = {(doc["leader"], doc["term"]) for doc in docs.values() if doc is not None}
    if len(views) != 1:
        return None
    leader = views.pop()[0]
    doc = docs.get(leader)
    return leader if doc is not None and doc["role"] == "leader" else None


def acting(doc: dict[str, Any] | None, feature: str = FEATURE) -> bool:
    return doc is not None and any(f["name"] == feature and f["acting"] for f in doc["features"])


def seats_of(doc: dict[str, Any] | None, feature: str = FEATURE) -> dict[str, dict[str, int]]:
    """member -> {"allocation", "used"} of ``feature`` in a member's status; empty if it has none."""
    for f in (doc or {}).get("features", []):
        if f["name"] == feature:
            return {m: {"allocation": u["allocation"], "used": u["used"]} for m, u in f["members"].items()}
    return {}


# -- the observer ----------------------------------------------------------------


@dataclass
class Round:
    """One observer poll: the seats and lease ids of ``FEATURE`` that acting members honour."""

    at: float
    seats: int
    honoured: frozenset[str]
    acting: tuple[str, ...]
    doubled: int
    """Lease ids listed by two acting members at once (a move caught half way, or a stale copy)."""


class Observer(threading.Thread):
    """Polls every member's verbose status about every ``interval`` seconds, in parallel.

    A member that does not answer (killed, restarting) honours nothing; one
    that answers but does not act on the feature (no allocation lease, not
    caught up) honours nothing either, whatever it lists. The polls of one
    round are not atomic: a seat checked in at one member and issued at
    another in between could be counted twice (a false excess, never a
    hidden one); the fleet's feature sees no such churn here, only moves.
    """

    def __init__(self, box: Sandbox, count: int, interval: float) -> None:
        super().__init__(daemon=True, name="failover-observer")
        self.box = box
        self.count = count
        self.interval = interval
        self.rounds: list[Round] = []
        self.excess: list[dict[str, Any]] = []
        self.doubles: list[dict[str, Any]] = []
        self._stop_event = threading.Event()
        self._pool = ThreadPoolExecutor(len(box.members), thread_name_prefix="observer")

    def run(self) -> None:
        names = self.box.members
        while not self._stop_event.is_set():
            at = time.time()
            docs = dict(zip(names, self._pool.map(lambda n: fetch(self.box, n, True, 0.2), names),
                            strict=True))
            seats = doubled = 0
            honoured: set[str] = set()
            by_member = {}
            for name, doc in docs.items():
                if not acting(doc):
                    continue
                assert doc is not None
                mine = [x for x in doc.get("leases", []) if x["feature"] == FEATURE]
                by_member[name] = sum(x["count"] for x in mine)
                seats += by_member[name]
                ids = {x["lease_id"] for x in mine}
                twice = ids & honoured
                if twice:
                    doubled += len(twice)
                    self.doubles.append({"at": at, "member": name, "lease_ids": sorted(twice)})
                honoured |= ids
            self.rounds.append(Round(at, seats, frozenset(honoured), tuple(sorted(by_member)), doubled))
            if seats > self.count:
                self.excess.append({"at": at, "seats": seats, "by_member": by_member})
            self._stop_event.wait(max(0.0, self.interval - (time.time() - at)))

    def between(self, start: float, end: float) -> list[Round]:
        return [r for r in list(self.rounds) if start <= r.at <= end]

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self._pool.shutdown()


# -- the client process -----------------------------------------------------------


class ClientProcess:
    """``failover_client.py`` in its own process group, spoken to with JSON lines."""

    def __init__(self, box: Sandbox, settings: FailoverSettings, log_dir: Any) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")
        argv = [sys.executable, str(BENCH / "failover_client.py"), "--config", str(box.ini),
                "--feature", FEATURE, "--clients", str(settings.clients),
                "--probe-feature", PROBE_FEATURE, "--probes", str(settings.probes),
                "--log", str(log_dir / "clients.log")]
        self.proc = subprocess.Popen(argv, env=child_env(), cwd=REPO, start_new_session=True, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="failover-client-reader").start()
        self.expect("ready", 30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        try:
            doc = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"the client process did not answer {event!r} within {timeout} s") from None
        if doc is None or doc.get("event") != event:
            self.stderr.seek(0)
            raise RuntimeError(f"the client process answered {doc} instead of {event!r}: "
                               f"{self.stderr.read()[-3000:]}")
        return doc

    def ask(self, command: dict[str, Any], answer: str, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self.expect(answer, timeout)

    def close(self) -> None:
        """Check every lease in and exit; killed (the whole group) if it does not within 15 s."""
        try:
            if self.proc.poll() is None:
                self.ask({"cmd": "quit"}, "bye", 15)
                self.proc.wait(5)
        except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired, ValueError):
            pass
        finally:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
            self.stderr.close()


# -- one repetition ------------------------------------------------------------------


@dataclass
class Repetition:
    """What one leader kill measured (seconds from the kill; None where it did not happen)."""

    level: str
    held: int
    killed: str
    placed: dict[str, int]
    place_seconds: float
    on_killed: int
    leader: str | None = None
    leader_s: float | None = None
    final_leader: str | None = None
    final_leader_s: float | None = None
    leaders: list[tuple[str, float]] = field(default_factory=list)
    renewed_s: float | None = None
    converted: int = 0
    honoured_s: float | None = None
    checkout_s: float | None = None
    checkout_failures: int = 0
    checkout_attempts: int = 0
    checkout_max_ms: float | None = None
    excess: int = 0
    lost: int = 0
    settled: bool = False
    window_s: float = 0.0
    load_average: float = 0.0
    at: float = 0.0
    survivors_leases: dict[str, str] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)
    seats_at_kill: dict[str, dict[str, int]] = field(default_factory=dict)
    """The killed leader's view of ``FEATURE`` just before the kill: member -> allocation and used.
    Where the free seats were decides whether the claims can be served before the reclaim."""


class Failover:
    """The pool, the client process, the observer, and the repetitions."""

    def __init__(self, bench: Bench, settings: FailoverSettings) -> None:
        self.bench = bench
        self.settings = settings
        self.box = make_sandbox(bench.workdir / "failover", MEMBERS, features=settings.features(),
                                store="sqlite")
        self.reps: list[Repetition] = []
        self.observer: Observer | None = None
        self.clients: ClientProcess | None = None
        self._status = ThreadPoolExecutor(len(MEMBERS), thread_name_prefix="status")

    def statuses(self, names: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any] | None]:
        return dict(zip(names, self._status.map(lambda n: fetch(self.box, n), names), strict=True))

    def steady(self, timeout: float = 30.0) -> str:
        """The leader, once every member names it for ``steady_for`` s, all caught up and acting,
        and its allocations of ``FEATURE`` have stayed as they are for ``seats_steady_for`` s."""
        deadline = time.monotonic() + timeout
        seen, since = None, time.monotonic()
        seats, seats_since = None, time.monotonic()
        while time.monotonic() < deadline:
            docs = self.statuses(MEMBERS)
            leader = agreed_leader(docs)
            shares = {m: u["allocation"] for m, u in seats_of(docs.get(leader) if leader else None).items()}
            if shares != seats:
                seats, seats_since = shares, time.monotonic()
            if leader != seen:
                seen, since = leader, time.monotonic()
            elif (leader is not None and time.monotonic() - since >= self.settings.steady_for
                  and time.monotonic() - seats_since >= self.settings.seats_steady_for):
                own = {(next(m for m in doc["members"] if m["name"] == name)["commit_index"])
                       for name, doc in docs.items() if doc is not None}
                if len(own) == 1 and all(acting(doc) for doc in docs.values()):
                    return leader
            time.sleep(0.05)
        raise TimeoutError(f"no steady pool within {timeout} s (leader seen: {seen})")

    def start(self) -> None:
        self.bench.start_pool(self.box)
        self.steady()
        self.observer = Observer(self.box, self.settings.count, self.settings.observer_interval)
        self.observer.start()
        self.clients = ClientProcess(self.box, self.settings, self.box.root / "logs")

    def close(self) -> None:
        if self.clients is not None:
            self.clients.close()
        if self.observer is not None:
            self.observer.stop()
        self.box.stop_all()
        self._status.shutdown()

    def place(self, held: int) -> dict[str, Any]:
        """Spread ``held`` fleet leases evenly over the members; raises if some could not be had."""
        assert self.clients is not None
        n = len(MEMBERS)
        targets = {m: held // n + (1 if i < held % n else 0) for i, m in enumerate(MEMBERS)}
        placed = self.clients.ask({"cmd": "place", "targets": targets,
                                   "deadline": self.settings.place_deadline}, "placed", 60)
        if placed["failures"]:
            raise RuntimeError(f"checkouts of the fleet failed: {placed['failures'][:3]}")
        return placed

    def repetition(self, level: str, held: int) -> Repetition:
        assert self.clients is not None and self.observer is not None
        # The killed member was restarted at the end of the last repetition:
        # its seats went to the new leader, so leases go back to it now (the
        # pool moves seats there as its clients ask), then the pool settles.
        began = time.monotonic()
        phases = {}
        placed = self.place(held)
        phases["place"] = time.monotonic() - began
        leader = self.steady()
        phases["steady"] = time.monotonic() - began - phases["place"]
        view = self.clients.ask({"cmd": "view"}, "view")
        leases = {x["lease_id"]: x["server"] for x in view["leases"]}
        lost_before = len(view["lost"])
        moving = {lid for lid, server in leases.items() if server == leader}
        survivors = tuple(m for m in MEMBERS if m != leader)
        rep = Repetition(level, len(leases), leader, placed["by_server"], placed["seconds"], len(moving),
                         load_average=os.getloadavg()[0],
                         survivors_leases={k: v for k, v in leases.items() if v != leader},
                         phases=phases)

        rep.seats_at_kill = seats_of(fetch(self.box, leader))
        killed_at = time.time()
        rep.at = killed_at
        self.box.kill(leader)
        deadline = killed_at + self.settings.window
        done_at: float | None = None
        next_report = next_status = 0.0
        report: dict[str, Any] = {}
        while time.time() < deadline:
            now = time.time()
            if now >= next_status:
                # Every 20 ms until a leader is found, then every 50 ms: a
                # leader elected by chance may hand over to a preferred one.
                next_status = now + (0.05 if rep.leader else 0.0)
                new = agreed_leader(self.statuses(survivors))
                if new is not None and new != rep.final_leader:
                    rep.final_leader, rep.final_leader_s = new, time.time() - killed_at
                    rep.leaders.append((new, rep.final_leader_s))
                    if rep.leader is None:
                        rep.leader, rep.leader_s = new, rep.final_leader_s
            if now >= next_report:
                next_report = now + 0.1
                report = self.clients.ask({"cmd": "report", "since": killed_at}, "report")
                rep.renewed_s, rep.converted = self._renewed(report, moving, leader, killed_at)
                rep.honoured_s = self._honoured(report, killed_at, time.time())
            # Done once the leader has stayed put for steady_for seconds and
            # every lease is renewed and honoured again.
            ready = (rep.final_leader_s is not None
                     and time.time() - killed_at - rep.final_leader_s >= self.settings.steady_for
                     and rep.renewed_s is not None and rep.honoured_s is not None)
            if ready and done_at is None:
                done_at = time.time()
            if done_at is not None and time.time() - done_at >= self.settings.grace:
                rep.settled = True
                break
            time.sleep(0.02)
        end = time.time()
        rep.window_s = end - killed_at
        report = self.clients.ask({"cmd": "report", "since": killed_at}, "report")
        rep.renewed_s, rep.converted = self._renewed(report, moving, leader, killed_at)
        rep.honoured_s = self._honoured(report, killed_at, end)
        self._checkouts(rep, report["attempts"], killed_at, end)
        rep.excess = max((r.seats - self.settings.count for r in self.observer.between(killed_at, end)),
                         default=0)
        rep.excess = max(0, rep.excess)
        rep.lost = len(report["lost"]) - lost_before
        if report["errors"]:
            self.bench.progress(f"  client library errors: {report['errors'][-1][:500]}")
        self.reps.append(rep)
        self.bench.progress(
            f"  {level} #{sum(1 for r in self.reps if r.level == level)}: killed {leader} "
            f"({rep.on_killed} of {rep.held} leases there), leader "
            f"{' then '.join(f'{n} after {_s(t)}' for n, t in rep.leaders) or 'none'}, "
            f"its leases renewed/converted after {_s(rep.renewed_s)} ({rep.converted} converted), "
            f"all honoured after {_s(rep.honoured_s)}, checkouts after {_s(rep.checkout_s)} "
            f"({rep.checkout_failures} failed), excess {rep.excess}, lost {rep.lost}; "
            f"place {phases['place']:.1f} s, steady {phases['steady']:.1f} s; free seats at the kill: "
            + ", ".join(f"{m} {u['allocation'] - u['used']}" for m, u in sorted(rep.seats_at_kill.items())))
        restarting = time.monotonic()
        self.bench.start_member(self.box, leader, wait=True)
        phases["restart"] = time.monotonic() - restarting
        phases["window"] = rep.window_s
        return rep

    @staticmethod
    def _renewed(report: dict[str, Any], moving: set[str], killed: str,
                 killed_at: float) -> tuple[float | None, int]:
        """When the last lease of the killed member was renewed or converted elsewhere."""
        lost = {x["lease_id"] for x in report["lost"]}
        last = 0.0
        converted = 0
        for lease_id in moving - lost:
            first = next((r for r in report["renewals"].get(lease_id, []) if r["server"] != killed), None)
            if first is None:
                return None, converted
            converted += first["converted"]
            last = max(last, first["at"] - killed_at)
        return last, converted

    def _honoured(self, report: dict[str, Any], start: float, end: float) -> float | None:
        """When every lease the clients hold was last seen back in an acting member's list."""
        assert self.observer is not None
        wanted = {x["lease_id"] for x in report["leases"]}
        rounds = self.observer.between(start, end)
        uncovered = [r for r in rounds if not wanted <= r.honoured]
        if not rounds or (uncovered and uncovered[-1] is rounds[-1]):
            return None
        after = [r for r in rounds if not uncovered or r.at > uncovered[-1].at]
        return after[0].at - start

    @staticmethod
    def _checkouts(rep: Repetition, attempts: list[dict[str, Any]], start: float, end: float) -> None:
        window = [a for a in attempts if a["end"] > start and a["start"] < end]
        failed = [a for a in window if not a["ok"]]
        rep.checkout_failures = len(failed)
        rep.checkout_attempts = len(window)
        rep.checkout_max_ms = max(((a["end"] - a["start"]) * 1000 for a in window), default=None)
        after = max([start] + [a["end"] for a in failed])
        ok = [a["end"] for a in window if a["ok"] and a["start"] >= after]
        rep.checkout_s = min(ok) - start if ok else None

    def others(self, report: dict[str, Any]) -> dict[str, Any]:
        """The leases on the survivors at each kill: renewed at their next heartbeat by whom, when."""
        same = moved = unseen = 0
        latest = 0.0
        for rep in self.reps:
            for lease_id, server in rep.survivors_leases.items():
                first = next((r for r in report["renewals"].get(lease_id, []) if r["at"] > rep.at), None)
                if first is None:
                    unseen += 1
                elif first["server"] == server and not first["converted"]:
                    same += 1
                    latest = max(latest, first["at"] - rep.at)
                else:
                    moved += 1
        return {"same_member": same, "moved": moved, "not_renewed_before_release": unseen,
                "latest_s": latest}


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _spread(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Median and max of the values that were measured, and how many were not."""
    have = [v for v in values if v is not None]
    missing = len(values) - len(have)
    if not have:
        return None, None, missing
    return statistics.median(have), max(have), missing


def _placed_in_time(run: Failover, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each event with the kill it followed (level, number, seconds after the kill)."""
    out = []
    for event in events[:20]:
        before = [(i, r) for i, r in enumerate(run.reps) if r.at <= event["at"]]
        if before:
            i, rep = before[-1]
            event = {**event, "after_kill": i + 1, "level": rep.level, "seconds": event["at"] - rep.at}
        out.append(event)
    return out


def figures_of(run: Failover) -> list[Figure]:
    out: list[Figure] = []
    s = run.settings
    settings = asdict(s)
    for level in ("half", "full"):
        reps = [r for r in run.reps if r.level == level]
        if not reps:
            continue
        held = reps[0].held
        detail = {"settings": settings, "repetitions": [asdict(r) for r in reps]}
        measured: list[tuple[str, str, Callable[[Repetition], float | None], str]] = [
            ("leader", "new leader", lambda r: r.leader_s,
             "both survivors name the same new leader, which says it leads"),
            ("final_leader", "leader that stays", lambda r: r.final_leader_s,
             "the same, for the leader still in place at the end of the window (a member elected "
             "by chance hands over to a preferred one)"),
            ("renewed", "killed leader's clients renewed/converted", lambda r: r.renewed_s,
             "every lease the killed leader held, first renewal or conversion by a survivor "
             "(Lease.renewed_at in the client process)"),
            ("honoured", "every lease honoured again", lambda r: r.honoured_s,
             "observer: every lease the clients hold is in the list of a member acting on the feature"),
            ("checkout", "new checkouts succeed", lambda r: r.checkout_s,
             "a probe checkout started after the kill and after the last failed one succeeded"),
        ]
        for key, label, get, meaning in measured:
            median, worst, missing = _spread([get(r) for r in reps])
            note = f"{meaning}; {len(reps)} kills, pool {level} ({held} of {s.count} seats)"
            if missing:
                note += f"; {missing} kill(s) did not get there within {s.window:g} s"
            if key == "final_leader":
                note += f"; {sum(1 for r in reps if len(r.leaders) > 1)} kill(s) saw a handover"
            if key == "renewed":
                moved = [r.on_killed for r in reps]
                note += (f"; {min(moved)}-{max(moved)} leases on the killed leader, "
                         f"{sum(r.converted for r in reps)} conversions in all")
            if key == "checkout":
                rate = sum(r.checkout_attempts for r in reps) / sum(r.window_s for r in reps)
                note += (f"; {sum(r.checkout_failures for r in reps)} failed attempts in all, slowest "
                         f"{max((r.checkout_max_ms or 0) for r in reps):.0f} ms, "
                         f"{rate:.0f} attempts/s")
            out.append(Figure("failover", f"failover.{level}.{key}.median", f"{level}: {label}, median",
                              "s", median, better="lower", note=note,
                              detail=detail if key == "leader" else {}))
            out.append(Figure("failover", f"failover.{level}.{key}.max", f"{level}: {label}, max", "s",
                              None if missing else worst, better="lower"))
    excess = max((r.excess for r in run.reps), default=0)
    assert run.observer is not None
    out.append(Figure("failover", "failover.over_issued", "over-issued seats (max at any poll)", "seats",
                      float(max(excess, max((e["seats"] - s.count for e in run.observer.excess), default=0))),
                      better="lower",
                      note=f"{len(run.observer.rounds)} observer rounds over the whole scenario, "
                           f"{len(run.observer.excess)} above the count; "
                           f"{sum(1 for r in run.observer.rounds if r.doubled)} round(s) saw a lease "
                           f"listed by two acting members",
                      detail={"excess": _placed_in_time(run, run.observer.excess),
                              "doubles": _placed_in_time(run, run.observer.doubles)}))
    out.append(Figure("failover", "failover.lost", "leases lost", "leases",
                      float(sum(r.lost for r in run.reps)), better="lower"))
    return out


def run_failover(bench: Bench, settings: FailoverSettings | None = None) -> list[Figure]:
    """Run every repetition (half full, then full) and return the figures."""
    s = settings or FailoverSettings()
    run = Failover(bench, s)
    try:
        run.start()
        for level, held in (("half", s.count // 2), ("full", s.count)):
            for _ in range(s.repetitions):
                run.repetition(level, held)
        assert run.clients is not None
        report = run.clients.ask({"cmd": "report", "since": run.reps[0].at, "attempts": False}, "report")
        others = run.others(report)
        figures = figures_of(run)
        figures.append(Figure(
            "failover", "failover.survivors_renewed", "leases on survivors renewed by their own member",
            "leases", float(others["same_member"]),
            note=f"at their next heartbeat (10 s interval), at most {others['latest_s']:.1f} s after the "
                 f"kill; {others['moved']} moved to another member instead, "
                 f"{others['not_renewed_before_release']} checked in before their next heartbeat",
            detail=others))
        if report["errors"]:
            figures[-1].note += f"; the client library logged {len(report['errors'])} error(s)"
            figures[-1].detail["errors"] = report["errors"][:5]
        return figures
    finally:
        run.close()
