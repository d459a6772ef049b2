"""The seat simulation: real license servers, pools and clients on one simulated clock.

Each member is a real ``LicenseServer`` over a real ``ReplicatedPool``, on its
own drifting clock, with a durable in-memory store that outlives its crashes;
the members talk over a ``SimNetwork`` that encodes every message with the
production codec. The clients are real ``LicenseClient`` objects whose only
simulated part is the request itself: it reaches the member's real AMP
responders after a small delay, or fails as a dead or frozen server would make
it fail. A seeded nemesis crashes, restarts, freezes and partitions members
and spikes loss and delay, while the clients check out, heartbeat, fail over,
convert and check in. docs/simulation.md describes the invariants checked
after every delivered message and every step.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import itertools
import random
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import AlreadyCalled, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from licensing import commands
from licensing.client import Lease as ClientLease
from licensing.client import LeaseLost, LicenseClient, Unreachable
from licensing.config import Address, Timings
from licensing.errors import LicensingError
from licensing.interfaces import IPeerNetwork
from licensing.license import Feature, License, sign_license, verify_license
from licensing.pool.peer_codec import tagged_codec
from licensing.pool.replicated import ReplicatedPool
from licensing.responders import ClientLocator
from licensing.sandbox import license_text
from licensing.server import LicenseServer
from licensing.store.memory import MemoryStore

from .clock import DriftingClock, SimClock
from .cluster import SimulationFailure
from .network import SimNetwork

DRIFT = 0.05
"""Clock rates are drawn from 1 +/- DRIFT, the bound ``Timings.clock_drift`` promises."""

MAJORITY = "cad"
"""The feature with ``majority_rule = yes``."""

FREE = "viewer"
"""The feature with ``majority_rule = no``: cut-off members keep serving it."""

EPOCH = datetime.datetime(2030, 6, 15, 12, 0, tzinfo=datetime.UTC).timestamp()
"""Every clock reads a date near this, so license dates behave as in production."""

CLIENT_DELAY = (0.001, 0.02)
"""One-way delay of a client request or answer (clients reach every live member)."""

LEASE_TTLS = {"minority": (15, 20), "any": (10, 15, 20)}
"""Lease TTLs per mode: in minority mode a failover must fit in one (docs/simulation.md)."""

NORMAL_DELAY = (0.001, 0.02)
"""One-way delay of a message between members."""

SPIKE_DELAYS = {"minority": (NORMAL_DELAY, (0.01, 0.3)),
                "any": (NORMAL_DELAY, (0.01, 0.3), (0.2, 1.5), (0.5, 3.0))}
"""Delay spikes per mode: a leader whose messages take seconds keeps leading while it cannot
confirm allocation leases in time, a gray failure Raft does not detect (docs/simulation.md)."""

STEP_LENGTHS = (0.05, 0.2, 0.5, 1.0, 2.0, 3.0, 5.0)

_RESPONDERS = {
    commands.Checkout: "checkout",
    commands.Heartbeat: "heartbeat",
    commands.Checkin: "checkin",
    commands.Locate: "locate",
    commands.Status: "status",
}


# -- configuration -----------------------------------------------------------------


@dataclass(frozen=True)
class SeatProfile:
    """How long and how rough a run is."""

    steps: int
    mode: str
    """"minority": at every instant a majority of the members is untouched by faults, and the
    pool gets a lease TTL after every change of the faults, so every heartbeating client must
    keep its lease; "any": no such promise (docs/simulation.md, "Modes")."""
    recovery_seconds: float = 90.0


CI = SeatProfile(steps=8, mode="minority")
CI_ANY = SeatProfile(steps=24, mode="any")
SOAK = SeatProfile(steps=16, mode="minority")
SOAK_ANY = SeatProfile(steps=48, mode="any")


@dataclass(frozen=True)
class SeatConfig:
    """Everything that shapes one run besides the nemesis's own choices."""

    seed: int
    nodes: int
    mode: str
    clients: int
    lease_ttl: int
    majority_count: int
    free_count: int
    snapshot_every: int
    preference: dict[str, int] | None

    @property
    def timings(self) -> Timings:
        return Timings(snapshot_every=self.snapshot_every)


def make_seat_config(seed: int, nodes: int, mode: str, lease_ttl: int | None = None) -> SeatConfig:
    """The per-seed shape of a run: client count, counts, TTL, snapshots, preferences."""
    rng = random.Random(f"seats-config-{seed}-{nodes}-{mode}")
    names = member_names(nodes)
    preference = None
    if rng.random() < 0.3:
        ranks = list(range(1, nodes + 1))
        rng.shuffle(ranks)
        preference = dict(zip(names, ranks))
    return SeatConfig(
        seed=seed, nodes=nodes, mode=mode,
        clients=rng.randint(5, 15),
        lease_ttl=rng.choice(LEASE_TTLS[mode]) if lease_ttl is None else lease_ttl,
        majority_count=rng.randint(6, 8),
        free_count=4,
        snapshot_every=rng.choice((15, 60, 1000)),
        preference=preference,
    )


def member_names(nodes: int) -> list[str]:
    return [f"ls{number}" for number in range(1, nodes + 1)]


@lru_cache(maxsize=1)
def vendor_key() -> Ed25519PrivateKey:
    """A fixed vendor key, so a seed replays byte for byte."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"seat simulation vendor").digest())


@lru_cache(maxsize=64)
def signed_license(majority_count: int, free_count: int, lease_ttl: int) -> bytes:
    """The license every member is configured with: one feature of each kind."""
    features = {
        MAJORITY: {"version": "2.0", "count": majority_count, "expires": "never",
                   "majority_rule": "yes", "lease_ttl": lease_ttl},
        FREE: {"version": "1.0", "count": free_count, "expires": "never",
               "majority_rule": "no", "lease_ttl": lease_ttl},
    }
    return sign_license(license_text(1, features, "Simulation Corp"), vendor_key())


# -- time, store and network --------------------------------------------------------


def _due(call: DelayedCall) -> float:
    return call.getTime()


class SeatClock(SimClock):
    """SimClock that keeps its calls sorted by insertion instead of sorting all of them at every call.

    ``Clock`` re-sorts its whole list on every ``callLater`` and after every
    call it runs; with a few hundred timers and messages pending that was a
    third of a run. Calls are inserted in order (after any due at the same
    time, as the stable sort put them); the list is sorted again only when a
    call was moved, which nothing in the simulation does.
    """

    def __init__(self) -> None:
        super().__init__()
        self._moved = False

    def callLater(self, delay: float, callable: Callable[..., object],
                  *args: object, **kw: object) -> DelayedCall:
        call = DelayedCall(self.seconds() + delay, callable, args, kw, self.calls.remove,
                           self._reset, self.seconds)
        bisect.insort(self.calls, call, key=_due)
        return call

    def _reset(self, call: DelayedCall) -> None:
        self._moved = True

    def _sortCalls(self) -> None:
        # A postponed call changes its time without telling the clock.
        if self._moved or (self.calls and self.calls[0].delayed_time):
            self._moved = False
            self.calls.sort(key=_due)


@implementer(IDelayedCall)
class _PausableCall:
    """A call on a PausableClock; one that falls due while the machine is frozen waits."""

    def __init__(self, clock: PausableClock, action: Callable[[], object]) -> None:
        self._clock = clock
        self._action = action
        self.state = "scheduled"
        self.inner: IDelayedCall | None = None

    def due(self) -> None:
        if self._clock.paused:
            self.state = "held"
            self._clock.held.append(self)
        else:
            self.run()

    def run(self) -> None:
        if self.state in ("scheduled", "held"):
            self.state = "called"
            self._action()

    def getTime(self) -> float:
        assert self.inner is not None
        return self._clock.local(self.inner.getTime())

    def cancel(self) -> None:
        if self.state == "scheduled":
            assert self.inner is not None
            self.inner.cancel()
        elif self.state != "held":
            raise AlreadyCalled()
        self.state = "cancelled"

    def delay(self, secondsLater: float) -> None:
        assert self.inner is not None
        self.inner.delay(secondsLater / self._clock.rate)

    def reset(self, secondsFromNow: float) -> None:
        assert self.inner is not None
        self.inner.reset(secondsFromNow / self._clock.rate)

    def active(self) -> bool:
        return self.state in ("scheduled", "held")


class PausableClock(DriftingClock):
    """A member machine's clock, which can also be frozen like a process under SIGSTOP.

    Time keeps passing while frozen; timers that fall due wait, and run in
    order when the machine resumes, as a real reactor runs its overdue
    timers. Messages and requests that reach a frozen member wait in the
    same queue (``hold``).
    """

    def __init__(self, base: SimClock, rate: float, offset: float) -> None:
        super().__init__(base, rate, offset)
        self.paused = False
        self.held: list[_PausableCall] = []

    def callLater(self, delay: float, callable: Callable[..., object],
                  *args: object, **kw: object) -> IDelayedCall:
        call = _PausableCall(self, lambda: callable(*args, **kw))
        call.inner = self._base.callLater(max(0.0, delay) / self.rate, call.due)
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        return []

    def hold(self, action: Callable[[], object]) -> None:
        """Run ``action`` now, or once the machine resumes."""
        call = _PausableCall(self, action)
        call.due()

    def resume(self) -> None:
        self.paused = False
        held, self.held = self.held, []
        for call in held:
            call.run()

    def discard(self) -> None:
        """The process was killed: what waited for it never runs."""
        self.paused = False
        for call in self.held:
            call.state = "cancelled"
        self.held = []


class DurableStore(MemoryStore):
    """A memory store that outlives crashes and says so: what a SQLite store guarantees."""

    durable = True


@implementer(IPeerNetwork)
class MemberLink:
    """One member incarnation's peer transport; silent once stopped (the process is gone)."""

    def __init__(self, network: SeatNetwork, name: str) -> None:
        self._network = network
        self._name = name
        self.stopped = False

    def start(self) -> None:
        """Links need no setup in the simulation."""

    def stop(self) -> None:
        self.stopped = True

    def send(self, to: str, message: object) -> None:
        if not self.stopped:
            self._network.send(self._name, to, message)


class SeatNetwork(SimNetwork):
    """SimNetwork with the pool's tagged codec, and loss and delay spikes per member.

    A link suffers the worse of the global setting and both ends' spikes.
    """

    def __init__(self, clock: SimClock, rng: random.Random) -> None:
        super().__init__(clock, rng)
        self._encode, self._decode = tagged_codec()
        self.spikes: dict[str, tuple[float, tuple[float, float]]] = {}

    def _link(self, source: str, destination: str) -> tuple[float, tuple[float, float]]:
        loss, delay = self.loss, self.delay
        for end in (source, destination):
            spike = self.spikes.get(end)
            if spike is not None:
                loss = max(loss, spike[0])
                delay = (max(delay[0], spike[1][0]), max(delay[1], spike[1][1]))
        return loss, delay

    def send(self, source: str, destination: str, message: object) -> None:
        data = self._encode(message)
        self.sent[type(message).__name__] += 1
        loss, delay = self._link(source, destination)
        if (source, destination) in self.blocked or self._rng.random() < loss:
            return
        copies = 2 if self._rng.random() < self.duplicate else 1
        for _ in range(copies):
            self._clock.callLater(self._rng.uniform(*delay), self._deliver, source, destination, data)

    def _deliver(self, source: str, destination: str, data: bytes) -> None:
        receive = self._receivers.get(destination)
        if receive is None or (source, destination) in self.blocked:
            return
        self.delivered += 1
        receive(source, self._decode(data))

    def heal(self) -> None:
        super().heal()
        self.spikes.clear()


# -- members and clients -------------------------------------------------------------


class _Connection:
    """What ClientLocator counts requests on; one per member incarnation."""

    outstanding = 0


@dataclass
class Member:
    """One running incarnation of a member."""

    name: str
    incarnation: int
    server: LicenseServer
    pool: ReplicatedPool
    locator: ClientLocator
    clock: PausableClock
    synced_at: float | None = None
    """When this incarnation first caught up with the pool (it serves features without
    majority rule from then on)."""

    def honours(self, feature: Feature) -> bool:
        """Whether this member would issue or renew seats of ``feature`` now (check_issue passes)."""
        if not self.server.serving:
            return False
        try:
            self.pool.check_issue(feature)
        except LicensingError:
            return False
        return True


class SimLicenseClient(LicenseClient):
    """The real LicenseClient; only ``call`` is simulated (see SeatCluster.request)."""

    def __init__(self, cluster: SeatCluster, clock: Any, **kwargs: Any) -> None:
        super().__init__(clock, {name: name for name in cluster.names}, **kwargs)  # type: ignore[misc]
        self.cluster = cluster

    async def call(self, name: str, command: type, **kwargs: Any) -> dict[str, Any]:
        if self.closed:
            raise Unreachable("the client is closed")
        return await self.cluster.request(self, name, command, kwargs)


@dataclass
class LossRecord:
    """A lease the application was told it lost."""

    time: float
    client: str
    lease_id: str
    feature: str
    issued_by: str
    holder: str
    """The member that last issued, renewed or converted it."""
    last_server: str
    why: str
    down: list[str]


class ClientApp:
    """An application using one LicenseClient: holds a lease or two, checks in and out."""

    def __init__(self, cluster: SeatCluster, index: int, rng: random.Random) -> None:
        self.cluster = cluster
        self.name = f"c{index}"
        self.rng = rng
        self.clock = DriftingClock(cluster.clock, rng.uniform(1 - DRIFT, 1 + DRIFT),
                                   EPOCH + rng.uniform(0, 100))
        names = cluster.names
        home = names[index % len(names)] if rng.random() < 0.7 else None
        self.client = SimLicenseClient(
            cluster, self.clock, client_id=f"{self.name}:{index}", user=f"user{index}",
            host=f"host{index}", home=home, request_timeout=cluster.config.timings.request_timeout,
            rng=random.Random(rng.getrandbits(64)),
        )
        self.want = rng.choice((1, 1, 1, 2))
        self.majority_share = rng.choice((0.6, 0.8, 1.0))
        self.busy = False
        self.frozen = False
        self.healed_at = float("inf")
        """Client clock when the nemesis healed everything: leases must be renewed after it."""
        self.issued_by: dict[str, str] = {}

    def start(self) -> None:
        self.clock.callLater(self.rng.uniform(2.5, 6.0), self._act)

    def _act(self) -> None:
        self.clock.callLater(self.rng.expovariate(1 / 6.0) + 0.2, self._act)
        if self.frozen or self.busy:
            return
        held = list(self.client.leases.values())
        if len(held) < self.want and (not held or self.rng.random() < 0.5):
            feature = MAJORITY if self.rng.random() < self.majority_share else FREE
            self._checkout(feature)
        elif held and self.rng.random() < 0.35:
            self._release(self.rng.choice(held))

    def _checkout(self, feature: str) -> None:
        self.busy = True
        d = Deferred.fromCoroutine(self.client.checkout(feature))

        def got(lease: ClientLease) -> None:
            self.issued_by[lease.lease_id] = lease.server
            self.cluster.note(f"{self.name} checked out {lease.lease_id[:8]} {feature} at {lease.server}")
            lease.add_loss_callback(lambda why, lease=lease: self._lost(lease, why))

        def refused(failure: Failure) -> None:
            failure.trap(LicensingError)
            self.cluster.note(f"{self.name} checkout of {feature} refused: "
                              f"{type(failure.value).__name__}")

        def done(_: object) -> None:
            self.busy = False

        d.addCallbacks(got, refused).addErrback(self.cluster.unexpected, f"{self.name} checkout")
        d.addBoth(done)

    def _release(self, lease: ClientLease) -> None:
        self.cluster.note(f"{self.name} checks in {lease.lease_id[:8]} at {lease.server}")
        Deferred.fromCoroutine(lease.release()).addErrback(self.cluster.unexpected,
                                                           f"{self.name} checkin")

    def _lost(self, lease: ClientLease, why: LeaseLost) -> None:
        lease_id = lease.lease_id
        issued_by = self.issued_by.get(lease_id, "?")
        record = LossRecord(self.cluster.clock.seconds(), self.name, lease_id, lease.feature,
                            issued_by, self.cluster.holders.get(lease_id, issued_by), lease.server,
                            str(why), self.cluster.down)
        self.cluster.invariants.lease_lost(record)


# -- the cluster -------------------------------------------------------------------


class SeatCluster:
    """N members and M client applications on one SimClock; crash, freeze and partition at will."""

    def __init__(self, config: SeatConfig) -> None:
        self.config = config
        self.rng = random.Random(f"seats-{config.seed}-{config.nodes}-{config.mode}")
        self.names = member_names(config.nodes)
        self.clock = SeatClock()
        self.network = SeatNetwork(self.clock, self._child_rng())
        self.stores = {name: DurableStore() for name in self.names}
        self.clocks = {
            name: PausableClock(self.clock, self.rng.uniform(1 - DRIFT, 1 + DRIFT),
                                EPOCH + self.rng.uniform(0, 100))
            for name in self.names
        }
        self.addresses = {name: Address(f"10.0.0.{i}", 7070) for i, name in enumerate(self.names, 1)}
        self.license_file = signed_license(config.majority_count, config.free_count, config.lease_ttl)
        self.license: License = verify_license(self.license_file, vendor_key().public_key())
        self.members: dict[str, Member] = {}
        self.holders: dict[str, str] = {}
        """Lease id -> the member that last issued, renewed or converted it."""
        self._gone: dict[str, float] = {}
        """Member -> when it last stopped serving (crashed or froze); inf while it cannot."""
        self._incarnations = itertools.count(1)
        self.trace: deque[str | tuple[float, dict[str, Any]]] = deque(maxlen=150)
        """Recent events; log events are formatted only if a failure shows them."""
        self.violations: list[str] = []
        self.invariants = SeatInvariants(self)
        self.apps = [ClientApp(self, i, self._child_rng()) for i in range(1, config.clients + 1)]
        for name in self.names:
            self.start(name)
        for app in self.apps:
            app.start()

    def _child_rng(self) -> random.Random:
        return random.Random(self.rng.getrandbits(64))

    def note(self, event: str) -> None:
        """Remember what happened, for the failure message."""
        self.trace.append(f"t={self.clock.seconds():.3f} {event}")

    def recent_events(self) -> list[str]:
        return [item if isinstance(item, str) else f"t={item[0]:.3f}   . {formatEvent(item[1])}"
                for item in self.trace]

    def unexpected(self, failure: Failure, where: str) -> None:
        """An error nothing should raise: a bug, reported as a violation."""
        self.violations.append(f"{where} failed unexpectedly: {failure.getTraceback()}")

    # -- members -----------------------------------------------------------

    def start(self, name: str) -> None:
        """Start (or restart) ``name`` on the store it always had."""
        clock = self.clocks[name]
        incarnation = next(self._incarnations)
        timings = self.config.timings
        server = LicenseServer(name, self.stores[name], clock, self._child_rng(),
                               vendor_key().public_key(), client_heartbeat=timings.client_heartbeat)

        def network_factory(deliver: Callable[[str, object], None]) -> MemberLink:
            self.network.attach(name, lambda sender, message: clock.hold(
                lambda: self._receive(name, incarnation, deliver, sender, message)))
            return MemberLink(self.network, name)

        pool = ReplicatedPool(server, self.addresses, timings, clock, self._child_rng(),
                              network_factory, preference=self.config.preference)
        member = Member(name, incarnation, server, pool, ClientLocator(server, _Connection()), clock)
        self.members[name] = member
        if name in self._gone:
            self._gone[name] = self.clock.seconds()
        pool.node.add_role_observer(
            lambda role, term, leader: self.note(f"{name}#{incarnation} {role} in term {term}, "
                                                 f"leader {leader}"))
        Deferred.fromCoroutine(server.start(pool, self.license_file)).addErrback(
            self.unexpected, f"start of {name}")

    def _receive(self, name: str, incarnation: int, deliver: Callable[[str, object], None],
                 sender: str, message: object) -> None:
        member = self.members.get(name)
        if member is None or member.incarnation != incarnation:
            return
        deliver(sender, message)
        self.check()

    def crash(self, name: str) -> None:
        """Kill ``name``: its timers stop, what waited for it is dropped, the objects are gone."""
        member = self.members.pop(name)
        member.server.stop()
        member.pool.stop()
        self.network.detach(name)
        member.clock.discard()
        self._gone[name] = float("inf")

    def pause(self, name: str) -> None:
        self.members[name].clock.paused = True
        self._gone[name] = float("inf")

    def resume(self, name: str) -> None:
        member = self.members.get(name)
        if member is not None and member.clock.paused:
            self._gone[name] = self.clock.seconds()
            member.clock.resume()

    def unavailable_since(self, name: str, since: float) -> bool:
        """Whether ``name`` could not serve at some time after ``since``: it was down,
        frozen, or not yet caught up after a restart."""
        member = self.members.get(name)
        if member is None or self._gone.get(name, float("-inf")) >= since:
            return True
        return member.synced_at is None or member.synced_at >= since

    @property
    def down(self) -> list[str]:
        return [name for name in self.names if name not in self.members]

    @property
    def paused(self) -> list[str]:
        return [name for name, member in self.members.items() if member.clock.paused]

    def leaders(self) -> list[Member]:
        return [m for m in self.members.values() if m.pool.role == "leader" and not m.clock.paused]

    def healthy_majority(self) -> bool:
        """Whether a majority of members is untouched by faults: up, unfrozen, unspiked, and
        not an end of any blocked link (either direction).

        A looser reading (a connected majority, whatever its members' links
        to the others) lets Raft lose its leader for good: a leader that
        still receives from everyone but reaches only one follower is never
        deposed (docs/simulation.md, "Known issues").
        """
        touched = {end for link in self.network.blocked for end in link}
        healthy = [name for name, member in self.members.items()
                   if not member.clock.paused and name not in self.network.spikes
                   and name not in touched]
        return len(healthy) >= len(self.names) // 2 + 1

    # -- client requests ---------------------------------------------------

    def request(self, client: SimLicenseClient, name: str, command: type,
                kwargs: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """One client request to member ``name``, as the real AMP connection would carry it.

        The request reaches the incarnation that was up when it was sent; a
        member that is down refuses the connection, one that crashed
        meanwhile resets it, and a frozen one answers only once it resumes
        (the client's request timeout applies).
        """
        result: Deferred[dict[str, Any]] = Deferred()
        result.addTimeout(client.request_timeout, client.clock)
        member = self.members.get(name)
        incarnation = member.incarnation if member is not None else None
        self.clock.callLater(self.rng.uniform(*CLIENT_DELAY), self._arrive, name, incarnation,
                             command, kwargs, result)
        return result

    def _arrive(self, name: str, incarnation: int | None, command: type, kwargs: dict[str, Any],
                result: Deferred[dict[str, Any]]) -> None:
        if result.called:
            return
        member = self.members.get(name)
        if member is None or member.incarnation != incarnation:
            # A crashed process on a live host: the connection is refused, or
            # reset if it was open (a frozen one times out instead).
            error: Exception = ConnectionRefusedError() if incarnation is None else ConnectionLost()
            self.clock.callLater(self.rng.uniform(*CLIENT_DELAY), self._fail, result, error)
            return
        member.clock.hold(lambda: self._serve(member, command, kwargs, result))

    def _serve(self, member: Member, command: type, kwargs: dict[str, Any],
               result: Deferred[dict[str, Any]]) -> None:
        if self.members.get(member.name) is not member:
            return
        answer = maybeDeferred(getattr(member.locator, _RESPONDERS[command]), **kwargs)
        answer.addBoth(self._answered, member, command, kwargs, result)
        self.check()

    def _answered(self, outcome: Any, member: Member, command: type, kwargs: dict[str, Any],
                  result: Deferred[dict[str, Any]]) -> None:
        if isinstance(outcome, Failure):
            if not outcome.check(LicensingError):
                self.violations.append(f"{member.name} answered {command.__name__} with an "
                                       f"unmapped error: {outcome.getTraceback()}")
                return
            outcome = outcome.value
        if isinstance(outcome, dict):
            if command is commands.Checkout:
                self.holders[outcome["lease_id"]] = member.name
            elif command is commands.Heartbeat:
                for lease_id, status, _ in outcome["statuses"]:
                    if status in (commands.RENEWED, commands.CONVERTED):
                        self.holders[lease_id] = member.name
        if command is commands.Heartbeat and kwargs.get("claims"):
            answer = ([(row[0][:8], row[1], round(float(row[2]), 2)) for row in outcome["statuses"]]
                      if isinstance(outcome, dict) else type(outcome).__name__)
            self.note(f"{kwargs['client_id']} claims at {member.name}: {answer}")
        self.clock.callLater(self.rng.uniform(*CLIENT_DELAY), self._reply, member, outcome, result)

    def _reply(self, member: Member, outcome: Any, result: Deferred[dict[str, Any]]) -> None:
        if result.called:
            return
        if self.members.get(member.name) is not member:
            result.errback(ConnectionLost())
        elif isinstance(outcome, Exception):
            result.errback(outcome)
        else:
            result.callback(outcome)

    @staticmethod
    def _fail(result: Deferred[dict[str, Any]], error: Exception) -> None:
        if not result.called:
            result.errback(error)

    # -- running -------------------------------------------------------------

    def run(self, seconds: float) -> None:
        self.clock.run_until(self.clock.seconds() + seconds)

    def check(self) -> None:
        self.invariants.check()

    @contextmanager
    def logging(self) -> Iterator[None]:
        """Errors logged by the code under test are violations; the rest goes to the trace."""

        def observe(event: dict[str, Any]) -> None:
            level = event.get("log_level")
            failure = event.get("log_failure")
            if failure is not None or level in (LogLevel.error, LogLevel.critical):
                text = formatEvent(event)
                if failure is not None:
                    text += "\n" + failure.getTraceback()
                self.violations.append(f"logged at t={self.clock.seconds():.3f}: {text}")
            elif level in (LogLevel.info, LogLevel.warn):
                self.trace.append((self.clock.seconds(), event))

        globalLogPublisher.addObserver(observe)
        try:
            yield
        finally:
            globalLogPublisher.removeObserver(observe)

    # -- convergence ---------------------------------------------------------

    def convergence_problem(self) -> str | None:
        """Why the healed pool has not settled yet, or None (invariant c)."""
        if self.down:
            return f"down: {self.down}"
        leaders = self.leaders()
        if len(leaders) != 1:
            return f"{len(leaders)} leaders"
        leader = leaders[0]
        last = leader.pool.node.last_log_index
        for name, member in self.members.items():
            if member.pool.term != leader.pool.term or member.pool.leader != leader.name:
                return f"{name} follows {member.pool.leader} in term {member.pool.term}"
            if member.pool.node.last_applied != last:
                return f"{name} applied {member.pool.node.last_applied} of {last}"
        reference = _record_view(leader.pool)
        for name, member in self.members.items():
            if _record_view(member.pool) != reference:
                return f"the record of {name} differs from the leader's"
        record = leader.pool.record
        if record.sequence != self.license.sequence:
            return f"license sequence {record.sequence}, expected {self.license.sequence}"
        for feature in self.license.features.values():
            total = sum(record.allocations.get(feature.name, {}).values())
            if total != feature.count:
                return f"allocations of {feature.name} add up to {total} of {feature.count}"
            for name, member in self.members.items():
                table = member.server.seats.allocation(feature.name)
                if table != record.allocation(feature.name, name):
                    return (f"{name} acts on {table} seats of {feature.name}, the record gives it "
                            f"{record.allocation(feature.name, name)}")
        for name, member in self.members.items():
            held = {lease.lease_id for lease in member.server.seats.leases()}
            recorded = set(record.held_by(name))
            if held != recorded:
                return (f"{name} holds {sorted(x[:8] for x in held - recorded)} unrecorded and "
                        f"the record lists {sorted(x[:8] for x in recorded - held)} it does not hold")
        for app in self.apps:
            for lease in app.client.leases.values():
                holders = [m.name for m in self.members.values()
                           if (held := m.server.seats.get(lease.lease_id)) is not None
                           and held.client_id == app.client.client_id]
                if not holders:
                    return f"{app.name}'s lease {lease.lease_id[:8]} is held by no member"
                if lease.renewed_at < app.healed_at:
                    return f"{app.name}'s lease {lease.lease_id[:8]} was not renewed since healing"
        return None


def _record_view(pool: ReplicatedPool) -> tuple[Any, ...]:
    record = pool.record
    return (record.sequence, record.allocations, record.leases)


# -- invariants --------------------------------------------------------------------


class SeatInvariants:
    """Invariants (a) and (b) of docs/simulation.md, checked at every event."""

    def __init__(self, cluster: SeatCluster) -> None:
        self.cluster = cluster
        self.losses: list[LossRecord] = []
        self.excused: list[LossRecord] = []

    def check(self) -> None:
        cluster = self.cluster
        if cluster.violations:
            raise SimulationFailure("; ".join(cluster.violations))
        for member in cluster.members.values():
            if member.synced_at is None and member.pool._synced:
                member.synced_at = cluster.clock.seconds()
        for feature in cluster.license.features.values():
            # Members that may not act only lower the sums: ask them only when needed.
            if (sum(m.server.seats.used(feature.name) for m in cluster.members.values())
                    <= feature.count
                    and sum(m.server.seats.allocation(feature.name) for m in cluster.members.values())
                    <= feature.count):
                continue
            used = allocated = 0
            for member in cluster.members.values():
                if not member.honours(feature):
                    continue
                used += member.server.seats.used(feature.name)
                allocated += member.server.seats.allocation(feature.name)
            if used > feature.count or allocated > feature.count:
                raise SimulationFailure(
                    f"(a) {feature.name}: members that may act hold {used} seats and believe in "
                    f"allocations of {allocated}, count {feature.count}: {self._describe(feature)}")

    def _describe(self, feature: Feature) -> str:
        rows = []
        for name, member in sorted(self.cluster.members.items()):
            pool = member.pool
            seats = member.server.seats
            rows.append(
                f"{name}#{member.incarnation} {pool.role} t{pool.term} acting={member.honours(feature)} "
                f"used={seats.used(feature.name)} table={seats.allocation(feature.name)} "
                f"record={pool.record.allocation(feature.name, name)} "
                f"applied={pool.node.last_applied}/{pool.node.commit_index} "
                f"lease_age={pool.node.leader_contact_age()}")
        return "; ".join(rows)

    def lease_lost(self, record: LossRecord) -> None:
        """(b): in minority mode, a heartbeating client never loses a lease."""
        self.losses.append(record)
        self.cluster.note(f"{record.client} LOST {record.lease_id[:8]} {record.feature} "
                          f"(issued by {record.issued_by}, last at {record.last_server}): {record.why}")
        if self.cluster.config.mode == "minority" and not self._excused(record):
            self.cluster.violations.append(
                f"(b) {record.client} lost lease {record.lease_id[:8]} of {record.feature} "
                f"at t={record.time:.3f} (issued by {record.issued_by}, last heartbeat to "
                f"{record.last_server}, down: {record.down}): {record.why}")


    def _excused(self, record: LossRecord) -> bool:
        """A lease of a feature without majority rule is lost by design if its holder could not
        serve it (down, frozen or not yet caught up after a restart) during the lease's last TTL.

        Its seat stays in that member's allocation, which is never reclaimed
        (DESIGN section 5), so only free seats elsewhere could save it.
        """
        feature = self.cluster.license.feature(record.feature)
        if feature is None or feature.majority_rule:
            return False
        since = record.time - feature.lease_ttl * (1 + DRIFT)
        if self.cluster.unavailable_since(record.holder, since):
            self.excused.append(record)
            return True
        return False


# -- the nemesis ---------------------------------------------------------------------


class SeatNemesis:
    """Picks one fault per step from a seeded rng, then lets time run.

    In "minority" mode an action that would leave no healthy majority (up,
    unfrozen, unspiked, fully connected) is not taken, and after every change
    of the faults the pool gets one lease TTL before the next: each failover
    must fit in a TTL (docs/simulation.md, invariant b). In "any" mode faults
    come as fast as the steps.
    """

    def __init__(self, cluster: SeatCluster, profile: SeatProfile, rng: random.Random) -> None:
        self.cluster = cluster
        self.profile = profile
        self.rng = rng
        self._actions = [
            (self.crash, 8),
            (self.restart, 9),
            (self.bounce, 3),
            (self.isolate, 5),
            (self.split, 3),
            (self.one_way, 4),
            (self.pause, 4),
            (self.spike, 4),
            (self.heal, 8),
            (self.wait, 8),
        ]

    @property
    def guarded(self) -> bool:
        return self.profile.mode == "minority"

    def step(self) -> None:
        actions, weights = zip(*self._actions)
        before = self._faults()
        self.rng.choices(actions, weights)[0]()
        seconds = self.rng.choice(STEP_LENGTHS)
        if self.guarded and self._faults() != before:
            seconds = max(seconds, self.cluster.config.lease_ttl)
        self.cluster.run(seconds)
        self.cluster.check()

    def _faults(self) -> tuple[Any, ...]:
        """Everything the nemesis can change, to tell whether a step changed anything."""
        cluster = self.cluster
        network = cluster.network
        return (tuple((n, m.incarnation, m.clock.paused) for n, m in cluster.members.items()),
                frozenset(network.blocked), tuple(sorted(network.spikes.items())), network.loss,
                network.delay)

    def _victim(self) -> str | None:
        live = sorted(self.cluster.members)
        if not live:
            return None
        leaders = [m.name for m in self.cluster.leaders()]
        return self.rng.choice(leaders if leaders and self.rng.random() < 0.5 else live)

    def _try(self, name: str, act: Callable[[], None], undo: Callable[[], None]) -> None:
        act()
        if self.guarded and not self.cluster.healthy_majority():
            undo()
            return
        self.cluster.note(f"nemesis: {name}")

    def crash(self) -> None:
        victim = self._victim()
        if victim is None or self.cluster.members[victim].clock.paused:
            return
        if self.guarded:
            member = self.cluster.members.pop(victim)
            ok = self.cluster.healthy_majority()
            self.cluster.members[victim] = member
            if not ok:
                return
        self.cluster.crash(victim)
        self.cluster.note(f"nemesis: crash {victim}")

    def restart(self) -> None:
        down = self.cluster.down
        if down:
            name = self.rng.choice(down)
            self.cluster.start(name)
            self.cluster.note(f"nemesis: restart {name}")

    def bounce(self) -> None:
        victim = self._victim()
        if victim is not None and not self.cluster.members[victim].clock.paused:
            self.cluster.crash(victim)
            self.cluster.start(victim)
            self.cluster.note(f"nemesis: bounce {victim}")

    def _blocking(self, label: str, links: set[tuple[str, str]]) -> None:
        network = self.cluster.network
        before = set(network.blocked)
        self._try(label, lambda: network.blocked.update(links),
                  lambda: setattr(network, "blocked", before))

    def isolate(self) -> None:
        victim = self._victim()
        if victim is not None:
            others = [n for n in self.cluster.names if n != victim]
            links = {(victim, o) for o in others} | {(o, victim) for o in others}
            self._blocking(f"isolate {victim}", links)

    def split(self) -> None:
        names = list(self.cluster.names)
        self.rng.shuffle(names)
        cut = self.rng.randint(1, len(names) - 1)
        a, b = names[:cut], names[cut:]
        links = {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}
        self._blocking(f"split {sorted(a)} | {sorted(b)}", links)

    def one_way(self) -> None:
        names = self.cluster.names
        leaders = [m.name for m in self.cluster.leaders()]
        if leaders and self.rng.random() < 0.6:
            leader = leaders[0]
            others = [n for n in names if n != leader]
            chosen = self.rng.sample(others, self.rng.randint(1, len(others)))
            inbound = self.rng.random() < 0.5
            links = {(o, leader) if inbound else (leader, o) for o in chosen}
        else:
            links = {tuple(self.rng.sample(names, 2)) for _ in range(self.rng.randint(1, 3))}
        self._blocking("block " + ", ".join(f"{a}->{b}" for a, b in sorted(links)), links)

    def pause(self) -> None:
        victim = self._victim()
        if victim is None or self.cluster.members[victim].clock.paused:
            return
        seconds = self.rng.choice((0.5, 1.5, 3.0, 5.0, 8.0))
        incarnation = self.cluster.members[victim].incarnation

        def resume() -> None:
            member = self.cluster.members.get(victim)
            if member is not None and member.incarnation == incarnation and member.clock.paused:
                self.cluster.note(f"nemesis: resume {victim}")
                self.cluster.resume(victim)
                self.cluster.check()

        def act() -> None:
            self.cluster.pause(victim)

        self._try(f"freeze {victim} for {seconds} s", act, lambda: self.cluster.resume(victim))
        if self.cluster.members[victim].clock.paused:
            self.cluster.clock.callLater(seconds, resume)

    def spike(self) -> None:
        network = self.cluster.network
        loss = self.rng.choice((0.0, 0.1, 0.3, 0.6))
        delay = self.rng.choice(SPIKE_DELAYS[self.profile.mode])
        if self.guarded or self.rng.random() < 0.5:
            victim = self.rng.choice(self.cluster.names)
            before = dict(network.spikes)
            self._try(f"spike {victim}: loss {loss}, delay {delay}",
                      lambda: network.spikes.__setitem__(victim, (loss, delay)),
                      lambda: setattr(network, "spikes", before))
        else:
            network.loss, network.delay = loss, delay
            self.cluster.note(f"nemesis: everywhere loss {loss}, delay {delay}")

    def heal(self) -> None:
        network = self.cluster.network
        network.heal()
        network.loss, network.delay = 0.0, NORMAL_DELAY
        for name in self.cluster.paused:
            self.cluster.resume(name)
        self.cluster.note("nemesis: heal")

    def wait(self) -> None:
        pass

    def recover(self) -> None:
        """Heal everything, restart everyone, freeze the applications; wait for a settled pool.

        Then run one more lease TTL: nothing may be lost and the pool stays settled.
        """
        cluster = self.cluster
        self.heal()
        for name in cluster.down:
            cluster.start(name)
        for app in cluster.apps:
            app.frozen = True
            app.healed_at = app.clock.seconds()
        cluster.note("recover: healed, restarted everyone, applications keep their leases")
        self._settle()
        losses = len(cluster.invariants.losses)
        cluster.run(cluster.config.lease_ttl)
        cluster.check()
        if len(cluster.invariants.losses) != losses:
            raise SimulationFailure("(c) a lease was lost after the pool had settled")
        self._settle()

    def _settle(self) -> None:
        cluster = self.cluster
        deadline = cluster.clock.seconds() + self.profile.recovery_seconds
        while True:
            cluster.run(0.5)
            cluster.check()
            problem = cluster.convergence_problem()
            if problem is None:
                return
            if cluster.clock.seconds() >= deadline:
                raise SimulationFailure(f"(c) no convergence within {self.profile.recovery_seconds} s "
                                        f"after healing: {problem}")


@dataclass
class SeatRun:
    """What a finished run leaves behind, for tests that look closer."""

    cluster: SeatCluster
    losses: list[LossRecord] = field(default_factory=list)


def run_seat_simulation(seed: int, nodes: int, profile: SeatProfile,
                        lease_ttl: int | None = None) -> SeatRun:
    """Run one seeded schedule; SimulationFailure (with the recent events) if anything breaks.

    ``lease_ttl`` overrides the seed's choice (10, 15 or 20 s).
    """
    config = make_seat_config(seed, nodes, profile.mode, lease_ttl)
    cluster = SeatCluster(config)
    nemesis = SeatNemesis(cluster, profile, random.Random(f"seats-nemesis-{seed}-{nodes}-{profile.mode}"))
    with cluster.logging():
        try:
            cluster.run(8.0)
            cluster.check()
            for _ in range(profile.steps):
                nemesis.step()
            nemesis.recover()
        except SimulationFailure as failure:
            events = "\n  ".join(cluster.recent_events())
            raise SimulationFailure(f"{failure}\n{config}\nrecent events:\n  {events}") from None
    return SeatRun(cluster, list(cluster.invariants.losses))
