"""The observer: polls every member and the clients' events, and checks the invariants.

It trusts nobody's summary: seats are counted from the lease tables every
member lists (``/api/status?verbose=1``), straight from the HTTP listeners,
which the proxy does not touch, so a cut or frozen member is seen as it is.
Checked at every poll (DESIGN.md section 11):

seats
    For every feature, the leases some member would still honour (listed,
    not expired, and the member is ``acting`` on the feature) hold at most
    ``count`` seats. Members are polled in parallel but not at one instant,
    so a checkin at one member and a checkout at another can both show in
    one snapshot; a lease therefore counts only if it is honoured in two
    consecutive snapshots, which (the snapshots being further apart than
    the polls within one) means all such leases were honoured at one common
    instant.
leaders
    At most one leader per term, as any member reports it.
sequence
    No member's license sequence ever goes down.
allocations
    In every member's record, a feature's allocations add up to at most its count.
leases kept
    No lease of a majority-rule feature is lost while a majority of the pool
    was up for the whole TTL before the loss (the nemesis's timeline says).
client errors
    The client library logged no error or failure.

At the end (``Observer.settle``): all members converge on one record (same
term and leader, the highest license sequence handed out, the same
allocations, and the leader's merged lease counts equal to each member's
own), every lease a client holds is held by a member, and once the clients
have checked everything in, no seat stays in use.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from licensing.sandbox import Sandbox

from .nemesis import Timeline


@dataclass
class Violation:
    t: float
    check: str
    detail: str

    def __str__(self) -> str:
        return f"[{time.strftime('%H:%M:%S', time.localtime(self.t))}.{int(self.t % 1 * 1000):03d}] " \
               f"{self.check}: {self.detail}"


@dataclass
class Snapshot:
    """One parallel poll: each member's status document (None if it did not answer) and when."""

    docs: dict[str, dict[str, Any] | None]
    times: dict[str, float]

    def honoured(self) -> dict[str, dict[str, tuple[int, str]]]:
        """feature -> lease id -> (seats, member) for every lease a member would renew now."""
        out: dict[str, dict[str, tuple[int, str]]] = {}
        for name, doc in self.docs.items():
            if doc is None or not doc.get("serving"):
                continue
            acting = {f["name"] for f in doc["features"] if f.get("acting")}
            for lease in doc.get("leases", []):
                if lease["feature"] in acting and lease["expires_at"] > self.times[name]:
                    out.setdefault(lease["feature"], {})[lease["lease_id"]] = (lease["count"], name)
        return out


@dataclass
class Stats:
    polls: int = 0
    answered: int = 0
    max_honoured: dict[str, int] = field(default_factory=dict)
    max_believed: dict[str, int] = field(default_factory=dict)
    checkouts: int = 0
    checkout_failures: dict[str, int] = field(default_factory=dict)
    released: int = 0
    lost: int = 0
    lost_excused: int = 0
    moved: int = 0
    terms: int = 0
    highest_sequence: int = 0


class Observer:
    """Polls in a thread while the nemesis runs; ``settle`` does the end-of-run checks."""

    def __init__(self, box: Sandbox, events: Path, timeline: Timeline, *, interval: float = 0.25,
                 trace: Path | None = None, say: Callable[[str], None] = lambda text: None) -> None:
        self.box = box
        self.trace = open(trace, "a", buffering=1) if trace is not None else None  # noqa: SIM115 - closed in close()
        """One line per poll: what each member said, in short (for reading a failure afterwards)."""
        self.events = events
        self.timeline = timeline
        self.interval = interval
        self.say = say
        self.violations: list[Violation] = []
        self.stats = Stats()
        self.features: dict[str, dict[str, Any]] = {}
        self.leaders: dict[int, str] = {}
        self.sequences: dict[str, int] = {}
        self.ttl: dict[str, float] = {}
        self.client_view: list[dict[str, Any]] = []
        self.client_events: list[dict[str, Any]] = []
        self._previous: dict[str, dict[str, tuple[int, str]]] | None = None
        self._offset = 0
        self._partial = b""
        self._pool = ThreadPoolExecutor(max_workers=len(box.members))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- running -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chaos-observer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling in the background (``poll`` and the end checks still work)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def close(self) -> None:
        self.stop()
        self._pool.shutdown(wait=True)
        if self.trace is not None:
            self.trace.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - the observer must outlive anything odd it sees
                self.fail("observer", f"poll raised {type(e).__name__}: {e}")
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def fail(self, check: str, detail: str, t: float | None = None) -> None:
        v = Violation(t if t is not None else time.time(), check, detail)
        with self._lock:
            self.violations.append(v)
        self.say(f"VIOLATION {v}")

    # -- polling -------------------------------------------------------------------

    def _fetch(self, name: str) -> tuple[dict[str, Any] | None, float]:
        url = f"http://127.0.0.1:{self.box.ports[name]['http']}/api/status?verbose=1"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                doc = json.loads(response.read())
        except (OSError, urllib.error.URLError, ValueError):
            doc = None
        return doc, time.time()

    def snapshot(self) -> Snapshot:
        results = list(self._pool.map(self._fetch, self.box.members))
        return Snapshot({n: r[0] for n, r in zip(self.box.members, results)},
                        {n: r[1] for n, r in zip(self.box.members, results)})

    def poll(self) -> Snapshot:
        """One round: poll every member, read new client events, check the invariants."""
        snap = self.snapshot()
        self.stats.polls += 1
        self.read_events()
        for name, doc in snap.docs.items():
            if doc is None:
                continue
            self.stats.answered += 1
            self._check_member(name, doc)
        self._check_seats(snap)
        if self.trace is not None:
            self.trace.write(json.dumps({"t": round(time.time(), 3), **{
                n: None if d is None else [d["role"], d["term"], d["leader"],
                                           (d["license"] or {}).get("sequence"),
                                           {f["name"]: [f["acting"], f["members"]] for f in d["features"]},
                                           sorted(x["lease_id"][:8] for x in d.get("leases", []))]
                for n, d in snap.docs.items()}}) + "\n")
        return snap

    def _check_member(self, name: str, doc: dict[str, Any]) -> None:
        for f in doc["features"]:
            self.features[f["name"]] = {"count": f["count"], "majority_rule": f["majority_rule"],
                                        "lease_ttl": f["lease_ttl"]}
            allocated = sum(m["allocation"] for m in f["members"].values())
            if allocated > f["count"]:
                self.fail("allocations", f"{name}'s record allocates {allocated} seats of {f['name']} "
                                         f"(count {f['count']}): {f['members']}")
        claims = [(doc["term"], doc["leader"])] if doc["leader"] else []
        for term, leader in claims:
            known = self.leaders.setdefault(term, leader)
            if known != leader:
                self.fail("leaders", f"term {term} has two leaders: {known} and {leader} (as {name} says)")
        self.stats.terms = len(self.leaders)
        if doc["license"]:
            seq = doc["license"]["sequence"]
            before = self.sequences.get(name, 0)
            if seq < before:
                self.fail("sequence", f"{name} went from license sequence {before} back to {seq}")
            self.sequences[name] = max(seq, before)
            self.stats.highest_sequence = max(self.stats.highest_sequence, seq)

    def _check_seats(self, snap: Snapshot) -> None:
        honoured = snap.honoured()
        previous, self._previous = self._previous, honoured
        for feature, leases in honoured.items():
            info = self.features.get(feature)
            if info is None:
                continue
            self.stats.max_honoured[feature] = max(self.stats.max_honoured.get(feature, 0),
                                                   sum(c for c, _ in leases.values()))
            if previous is None:
                continue
            both = {k: v for k, v in leases.items() if k in previous.get(feature, {})}
            seats = sum(c for c, _ in both.values())
            if seats > info["count"]:
                where: dict[str, int] = {}
                for count, member in both.values():
                    where[member] = where.get(member, 0) + count
                self.fail("seats", f"{seats} seats of {feature} honoured at once (count {info['count']}); "
                                   f"by member: {where}; leases: {sorted(both)}")

    # -- client events -------------------------------------------------------------

    def read_events(self) -> None:
        """Read what the client process wrote since the last call and check it."""
        try:
            with open(self.events, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._client_event(json.loads(line))

    def _client_event(self, ev: dict[str, Any]) -> None:
        kind = ev["ev"]
        if kind == "view":
            self.client_view = ev["held"]
            believed: dict[str, int] = {}
            for lease in ev["held"]:
                believed[lease["feature"]] = believed.get(lease["feature"], 0) + lease["count"]
            for feature, seats in believed.items():
                self.stats.max_believed[feature] = max(self.stats.max_believed.get(feature, 0), seats)
            return
        self.client_events.append(ev)
        if kind == "checkout":
            self.stats.checkouts += 1
            self.ttl[ev["lease_id"]] = ev["ttl"]
        elif kind == "checkout_failed":
            self.stats.checkout_failures[ev["error"]] = self.stats.checkout_failures.get(ev["error"], 0) + 1
        elif kind == "released":
            self.stats.released += 1
        elif kind == "moved":
            self.stats.moved += 1
        elif kind == "error":
            self.fail("client errors", ev["text"], ev["t"])
        elif kind == "lost":
            self._lost(ev)

    def _lost(self, ev: dict[str, Any]) -> None:
        self.stats.lost += 1
        info = self.features.get(ev["feature"], {})
        ttl = self.ttl.get(ev["lease_id"], info.get("lease_ttl", 60.0))
        if not info.get("majority_rule", True):
            # A cut-off member keeps the seats of a feature without majority
            # rule (DESIGN section 5): its leases may not be convertible.
            self.stats.lost_excused += 1
            return
        t = ev["t"]
        if self.timeline.majority_up(t - ttl - 2.0, t):
            down = sorted({m for x in (t - ttl, t - ttl / 2, t) for m in self.timeline.down_at(x)})
            self.fail("leases kept", f"client {ev['client']} lost lease {ev['lease_id']} of {ev['feature']} "
                                     f"(last at {ev['server']}) while a majority was up "
                                     f"(down during the TTL: {down or 'none'}): {ev['why']}", t)
        else:
            self.stats.lost_excused += 1

    # -- the end of a run ------------------------------------------------------------

    def wait_converged(self, expected_sequence: int, timeout: float = 30.0) -> Snapshot | None:
        """Wait until every member agrees on one record; a violation if they never do."""
        deadline = time.monotonic() + timeout
        problem = "no poll yet"
        while time.monotonic() < deadline:
            snap = self.poll()
            problem = self.disagreement(snap, expected_sequence)
            if problem is None:
                return snap
            time.sleep(0.2)
        self.fail("convergence", f"members still disagree {timeout:.0f} s after healing: {problem}")
        return None

    def disagreement(self, snap: Snapshot, expected_sequence: int) -> str | None:
        """Why the members do not (yet) share one record, or None if they do."""
        docs = snap.docs
        missing = [n for n, d in docs.items() if d is None or not d["serving"]]
        if missing:
            return f"not answering or not serving: {missing}"
        views = {n: (d["term"], d["leader"]) for n, d in docs.items()}
        if len(set(views.values())) != 1 or None in {v[1] for v in views.values()}:
            return f"term/leader differ: {views}"
        leader = next(iter(views.values()))[1]
        if docs[leader]["role"] != "leader":
            return f"{leader} is named leader but says it is {docs[leader]['role']}"
        seqs = {n: (d["license"] or {}).get("sequence") for n, d in docs.items()}
        if set(seqs.values()) != {expected_sequence}:
            return f"license sequences {seqs}, expected {expected_sequence} everywhere"
        allocations = {n: {f["name"]: {m: u["allocation"] for m, u in f["members"].items()}
                           for f in d["features"]} for n, d in docs.items()}
        if len({json.dumps(a, sort_keys=True) for a in allocations.values()}) != 1:
            return f"allocations differ: {allocations}"
        merged = {f["name"]: {m: u["used"] for m, u in f["members"].items()} for f in docs[leader]["features"]}
        for n, d in docs.items():
            for f in d["features"]:
                own = f["members"][n]["used"]
                if merged.get(f["name"], {}).get(n) != own:
                    return (f"the leader's record says {n} uses {merged.get(f['name'], {}).get(n)} seats of "
                            f"{f['name']}, {n} says {own}")
        return None

    def check_client_view(self, snap: Snapshot) -> None:
        """Every lease a (quiet) client holds is honoured by some member."""
        honoured = snap.honoured()
        held = {lease_id for leases in honoured.values() for lease_id in leases}
        orphans = [x for x in self.client_view if x["lease_id"] not in held]
        if orphans:
            self.fail("client view", f"{len(orphans)} lease(s) clients hold are honoured by no member: "
                                     f"{orphans[:5]}")

    def wait_drained(self, timeout: float) -> None:
        """After every client checked in and left, no member may keep a seat in use."""
        deadline = time.monotonic() + timeout
        used: dict[str, Any] = {}
        while time.monotonic() < deadline:
            snap = self.snapshot()
            used = {}
            for n, d in snap.docs.items():
                if d is None:
                    used[n] = "no answer"
                    continue
                for f in d["features"]:
                    for m, u in f["members"].items():
                        if u["used"]:
                            used[f"{n}: {f['name']}@{m}"] = u["used"]
                if d.get("leases"):
                    used[f"{n}: leases"] = len(d["leases"])
            if not used:
                return
            time.sleep(0.25)
        self.fail("drained", f"seats still in use {timeout:.0f} s after every client left: {used}")
