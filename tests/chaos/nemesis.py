"""The nemesis: faults picked at random from a seed, against real members and the proxy.

An *episode* takes some members (its victims), does something bad to them,
holds it for a while, undoes it, and waits until the victims are back in the
pool before it counts them as up again. Episodes may overlap, but the
victims of all running episodes are at most ``max_down`` members: by default
a minority, so a healthy majority (alive, not frozen, talking to each other
and to the clients) exists at every instant and invariant 4 (no lease lost)
must hold throughout. A larger ``max_down`` lets the pool lose its majority
too; the ``Timeline`` records when, so the observer excuses losses then.

Episode kinds (``KINDS``):

========== ================================================================
kill       ``kill -9``, then restart (sometimes after installing a license
           with a higher sequence into the stopped member's store: F9)
freeze     SIGSTOP, then SIGCONT: a member that wakes up with stale state
isolate    every peer link to and from the victim cut (resets)
deaf       nothing the others send reaches the victim (bytes discarded)
mute       nothing the victim sends reaches the others (bytes discarded)
pair       the links between the victim and one other member cut
clients    the victim's client listener cut: peers fine, clients turned away
blackhole  every byte to and from the victim discarded, connections open
delay      20-400 ms added to every byte to and from the victim
drop       connections to and from the victim aborted at random
slow       the victim's links capped at 2-50 KB/s
========== ================================================================

The schedule comes from ``random.Random(seed)``; the real timing of the
processes is not reproducible, but the sequence of faults is.
"""

from __future__ import annotations

import bisect
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from licensing.sandbox import Sandbox

from .proxy import ProxyControl

KINDS = ("kill", "freeze", "isolate", "deaf", "mute", "pair", "clients", "blackhole", "delay", "drop",
         "slow")
NETWORK_KINDS = KINDS[2:]


class Timeline:
    """When which members were down (faulted or not yet recovered); thread-safe."""

    def __init__(self, members: Sequence[str], start: float | None = None) -> None:
        self.members = tuple(members)
        self.minority = (len(self.members) - 1) // 2
        self._lock = threading.Lock()
        self._times = [start if start is not None else time.time()]
        self._down: list[frozenset[str]] = [frozenset()]

    def set_down(self, down: frozenset[str], at: float | None = None) -> None:
        with self._lock:
            if down != self._down[-1]:
                self._times.append(at if at is not None else time.time())
                self._down.append(down)

    def down_at(self, t: float) -> frozenset[str]:
        with self._lock:
            i = bisect.bisect_right(self._times, t) - 1
            return self._down[max(i, 0)]

    def majority_up(self, t0: float, t1: float) -> bool:
        """Whether at most a minority was down at every instant of [t0, t1]."""
        with self._lock:
            first = max(bisect.bisect_right(self._times, t0) - 1, 0)
            last = bisect.bisect_right(self._times, t1)
            return all(len(d) <= self.minority for d in self._down[first:last])

    def worst(self) -> int:
        with self._lock:
            return max(len(d) for d in self._down)


@dataclass
class Episode:
    kind: str
    victims: tuple[str, ...]
    until: float
    rules: list[int] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    healed: bool = False
    healed_at: float = 0.0
    recover_until: float = 0.0
    settle_until: float = 0.0


class Nemesis:
    """Runs episodes against ``box`` (members) and ``proxy`` (their links) for a while."""

    def __init__(
        self,
        box: Sandbox,
        proxy: ProxyControl,
        rng: random.Random,
        *,
        kinds: Sequence[str] = KINDS,
        max_down: int | None = None,
        hold: tuple[float, float] = (1.0, 8.0),
        gap: tuple[float, float] = (0.0, 2.0),
        license_bump: float = 0.3,
        features: Any = None,
        sequence: int = 1,
        say: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.box = box
        self.proxy = proxy
        self.rng = rng
        self.kinds = tuple(kinds)
        self.members = box.members
        self.timeline = Timeline(self.members)
        self.max_down = self.timeline.minority if max_down is None else max_down
        self.hold = hold
        self.gap = gap
        self.license_bump = license_bump
        self.features = features
        self.sequence = sequence
        """The highest license sequence handed to any member so far."""
        self.say = say
        self.episodes: list[Episode] = []
        self.history: list[dict[str, Any]] = []
        self.stuck: list[tuple[float, str]] = []
        """Victims that did not rejoin the pool within 30 s of healing (when, what)."""
        self._next_at = 0.0

    # -- the schedule --------------------------------------------------------------

    def run(self, duration: float, stop: threading.Event | None = None) -> None:
        """Start and end episodes for ``duration`` seconds, then heal everything."""
        end = time.monotonic() + duration
        self._next_at = time.monotonic() + self.rng.uniform(*self.gap)
        try:
            while time.monotonic() < end and not (stop and stop.is_set()):
                self.step()
                time.sleep(0.05)
        finally:
            self.heal()

    def step(self) -> None:
        """End what is due, move recovering victims on, maybe start a new episode."""
        now = time.monotonic()
        for ep in list(self.episodes):
            if not ep.healed and now >= ep.until:
                self._end(ep)
            elif ep.healed and self._recovered(ep, now):
                self.episodes.remove(ep)
                self._update_down()
                self._next_at = max(self._next_at, now + self.rng.uniform(*self.gap))
        if now >= self._next_at:
            self._maybe_start(now)

    def episode(self, kind: str, victim: str, hold: float) -> None:
        """Run one episode now and wait until its victim is back (scripted regression scenarios)."""
        ep = Episode(kind, (victim,), time.monotonic() + hold)
        self.episodes.append(ep)
        self._update_down()
        self._begin(ep)
        self._record("begin", ep)
        time.sleep(hold)
        self._end(ep)
        while not self._recovered(ep, time.monotonic()):
            time.sleep(0.1)
        self.episodes.remove(ep)
        self._update_down()

    def member(self, role: str) -> str:
        """The current leader (``role="leader"``) or a follower that holds leases, by the members' status."""
        docs = {m: self.box.status(m, verbose=True, timeout=1.0) for m in self.members}
        leaders = [m for m, d in docs.items() if d is not None and d["role"] == "leader"]
        if role == "leader":
            if not leaders:
                raise RuntimeError(f"no leader: {docs}")
            return leaders[0]
        followers = [m for m, d in docs.items() if d is not None and d["role"] == "follower"]
        followers.sort(key=lambda m: -len(docs[m].get("leases", [])))  # type: ignore[union-attr]
        return followers[0]

    def _busy(self) -> set[str]:
        return {v for ep in self.episodes for v in ep.victims}

    def _update_down(self) -> None:
        self.timeline.set_down(frozenset(self._busy()))

    def _maybe_start(self, now: float) -> None:
        busy = self._busy()
        free = [m for m in self.members if m not in busy]
        if len(busy) >= self.max_down or not free:
            return
        kind = self.rng.choice(self.kinds)
        victim = self.rng.choice(free)
        ep = Episode(kind, (victim,), now + self.rng.uniform(*self.hold))
        # Count the victim down before the fault exists, so the timeline never
        # shows a healthy member that is already being hurt.
        self.episodes.append(ep)
        self._update_down()
        self._begin(ep)
        self._record("begin", ep)

    def _record(self, what: str, ep: Episode) -> None:
        entry = {"t": round(time.time(), 3), "what": what, "kind": ep.kind, "victims": list(ep.victims),
                 **ep.detail}
        self.history.append(entry)
        self.say(f"nemesis {what} {ep.kind} {','.join(ep.victims)} {ep.detail or ''}")

    # -- faults --------------------------------------------------------------------

    def _links(self, v: str) -> list[tuple[str, str]]:
        """(route, source) pairs covering everything to and from member ``v``."""
        return [(f"peer:{v}", "*"), ("peer:*", v), (f"client:{v}", "*")]

    def _begin(self, ep: Episode) -> None:
        v = ep.victims[0]
        px = self.proxy
        rules = ep.rules
        if ep.kind == "kill":
            self.box.kill(v)
            if self.features is not None and self.rng.random() < self.license_bump:
                self._install_license(v, ep)
        elif ep.kind == "freeze":
            self.box.signal(v, signal.SIGSTOP)
        elif ep.kind == "isolate":
            rules += [px.add("cut", route=f"peer:{v}"), px.add("cut", route="peer:*", source=v)]
        elif ep.kind == "deaf":
            rules.append(px.add("oneway", route=f"peer:{v}", direction="up"))
        elif ep.kind == "mute":
            rules.append(px.add("oneway", route="peer:*", source=v, direction="up"))
        elif ep.kind == "pair":
            other = self.rng.choice([m for m in self.members if m != v])
            ep.detail["other"] = other
            rules += [px.add("cut", route=f"peer:{v}", source=other),
                      px.add("cut", route=f"peer:{other}", source=v)]
        elif ep.kind == "clients":
            rules.append(px.add("cut", route=f"client:{v}"))
        elif ep.kind == "blackhole":
            rules += [px.add("oneway", route=r, source=s) for r, s in self._links(v)]
        elif ep.kind == "delay":
            ms = round(self.rng.uniform(20, 400))
            ep.detail["ms"] = ms
            rules += [px.add("delay", route=r, source=s, ms=ms) for r, s in self._links(v)]
        elif ep.kind == "drop":
            p = round(self.rng.uniform(0.02, 0.2), 3)
            ep.detail["p"] = p
            rules += [px.add("drop", route=r, source=s, p=p) for r, s in self._links(v)]
        elif ep.kind == "slow":
            bps = round(self.rng.uniform(2_000, 50_000))
            ep.detail["bps"] = bps
            rules += [px.add("slow", route=r, source=s, bps=bps) for r, s in self._links(v)]
        else:
            raise ValueError(f"unknown episode kind {ep.kind!r}")

    def _install_license(self, v: str, ep: Episode) -> None:
        """F9: a stopped member gets a newer license file; it must spread when it is back."""
        sequence = self.sequence + 1
        path = self.box.sign(sequence, self.features)
        result = subprocess.run([sys.executable, "-m", "licensing.cli", "--config", str(self.box.ini),
                                 "license", "install", "--name", v, str(path)],
                                capture_output=True, text=True, timeout=60, cwd=self.box.root, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"licensectl license install failed: {result.stderr}")
        self.sequence = sequence
        ep.detail["sequence"] = sequence

    def _end(self, ep: Episode) -> None:
        v = ep.victims[0]
        if ep.rules:
            self.proxy.remove(*ep.rules)
        if ep.kind == "kill":
            self.box.start(v, wait=0)
        elif ep.kind == "freeze":
            self.box.signal(v, signal.SIGCONT)
        ep.healed = True
        ep.healed_at = time.monotonic()
        ep.recover_until = ep.healed_at + 30.0
        self._record("end", ep)

    def _recovered(self, ep: Episode, now: float) -> bool:
        """A healed victim counts as up once it follows the same leader as the others, plus a pause."""
        if ep.settle_until:
            return now >= ep.settle_until
        if now < ep.recover_until and not all(self._rejoined(v) for v in ep.victims):
            return False
        if now >= ep.recover_until:
            stuck = f"{','.join(ep.victims)} not back in the pool 30 s after {ep.kind} ended"
            self.stuck.append((time.time(), stuck))
            self.say(f"nemesis: {stuck}")
        ep.settle_until = now + self.rng.uniform(0.5, 1.5)
        return False

    def _rejoined(self, v: str) -> bool:
        doc = self.box.status(v, timeout=0.5)
        if doc is None or not doc["serving"] or doc["leader"] is None:
            return False
        others = [self.box.status(m, timeout=0.5) for m in self.members if m != v and m not in self._busy()]
        terms = {(d["term"], d["leader"]) for d in others if d is not None}
        return terms == {(doc["term"], doc["leader"])}

    def heal(self, timeout: float = 30.0) -> None:
        """End every episode now and wait (up to ``timeout``) until every victim is back.

        The killed are restarted, the frozen woken, every proxy rule removed;
        victims count as down on the timeline until they follow the pool's
        leader again.
        """
        for ep in self.episodes:
            if not ep.healed:
                self._end(ep)
        self.proxy.heal()
        for name in self.members:
            proc = self.box.processes.get(name)
            if proc is None or proc.poll() is not None:
                self.box.processes.pop(name, None)
                self.box.start(name, wait=0)
            else:
                self.box.signal(name, signal.SIGCONT)
        deadline = time.monotonic() + timeout
        while self.episodes and time.monotonic() < deadline:
            for ep in list(self.episodes):
                if self._recovered(ep, time.monotonic()):
                    self.episodes.remove(ep)
                    self._update_down()
            time.sleep(0.1)
        self.episodes.clear()
        self._update_down()
        self.history.append({"t": round(time.time(), 3), "what": "heal"})
