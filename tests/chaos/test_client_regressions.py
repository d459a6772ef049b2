"""Client bugs the chaos suite found, replayed deterministically against scripted members.

The members here are plain AMP responders that answer as a real pool did
in the failing run, joined to a ``LicenseClient`` by iosim pumps on one
``Clock``: no processes, no TLS, milliseconds per test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.test import iosim
from zope.interface import implementer

from licensing import commands
from licensing.client import LicenseClient
from licensing.errors import NoQuorum

LEASE = "0123456789abcdef0123456789abcdef"


@dataclass
class Member(amp.CommandLocator):
    """A scripted member: ``answer(lease_id, claimed)`` decides each heartbeat status, unless
    ``no_quorum`` makes it refuse heartbeats as a member cut off from its leader does."""

    name: str
    leader: str
    answer: Callable[[str, bool], tuple[str, float]] = lambda lease_id, claimed: (commands.UNKNOWN, 0.0)
    held: set[str] = field(default_factory=set)
    no_quorum: bool = False
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    @commands.Locate.responder
    def locate(self) -> dict[str, Any]:
        return {"server": self.name, "leader": self.leader,
                "members": [("ls1", "127.0.0.1", 1), ("ls2", "127.0.0.1", 2)]}

    @commands.Checkout.responder
    def checkout(self, feature: str, version: str, client_id: str, user: str, host: str,
                 count: int) -> dict[str, Any]:
        self.held.add(LEASE)
        return {"lease_id": LEASE, "server": self.name, "ttl": 15.0, "heartbeat": 1.0}

    @commands.Heartbeat.responder
    def heartbeat(self, client_id: str, leases: list[str], claims: Any = None,
                  claim_wait: float | None = None) -> dict[str, Any]:
        ids = [(x, False) for x in leases] + [(c[0], True) for c in claims or []]
        self.calls.append(("heartbeat", ids))
        if self.no_quorum:
            raise NoQuorum(f"{self.name} cannot see a majority")
        return {"statuses": [(x, *self.answer(x, claimed)) for x, claimed in ids]}

    @commands.Checkin.responder
    def checkin(self, lease_id: str) -> dict[str, Any]:
        self.calls.append(("checkin", lease_id))
        released = lease_id in self.held
        self.held.discard(lease_id)
        return {"released": released}


@implementer(IStreamClientEndpoint)
@dataclass
class Endpoint:
    member: Member
    clock: Clock
    pumps: list[iosim.IOPump]

    def connect(self, factory: Any) -> Deferred[Any]:
        client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 0))
        server = amp.AMP(locator=self.member)
        self.pumps.append(iosim.connect(server, iosim.makeFakeServer(server), client,
                                        iosim.makeFakeClient(client), greet=False, clock=self.clock))
        return succeed(client)


def pool(*members: Member) -> tuple[LicenseClient, Clock, Callable[[float], None]]:
    """A client of ``members``; the returned ``run(seconds)`` advances time and moves bytes."""
    clock = Clock()
    pumps: list[iosim.IOPump] = []
    client = LicenseClient(clock, {m.name: Endpoint(m, clock, pumps) for m in members},
                           client_id="c", user="u", host="h", home=members[-1].name, heartbeat=1.0)

    def run(seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            for _ in range(20):
                if not [p.pump() for p in list(pumps)].count(True):
                    break
            clock.advance(0.1)

    return client, clock, run


def held_here(member: Member) -> Callable[[str, bool], tuple[str, float]]:
    """Answers of a member that renews what it holds."""
    return lambda lease_id, claimed: (commands.RENEWED, 15.0) if lease_id in member.held \
        else (commands.UNKNOWN, 0.0)


def deferring_leader(lease_id: str, claimed: bool) -> tuple[str, float]:
    """Answers of a leader that cannot convert yet: unknown to heartbeats, retry-after to claims."""
    return (commands.RETRY_AFTER, 2.0) if claimed else (commands.UNKNOWN, 0.0)


def holder_cut_off_for_a_moment() -> tuple[LicenseClient, Member, Member, list[Any], Callable[[float], None]]:
    """A lease checked out at ls2, whose heartbeats ls2 then refuses (NoQuorum) for 1.5 s."""
    leader = Member("ls1", "ls1", deferring_leader)
    ls2 = Member("ls2", "ls1")
    ls2.answer = held_here(ls2)
    client, _, run = pool(leader, ls2)
    lease: list[Any] = []
    Deferred.fromCoroutine(client.checkout("cad-pro")).addCallback(lease.append)
    run(0.5)
    ls2.no_quorum = True
    run(1.5)
    ls2.no_quorum = False
    return client, leader, ls2, lease, run


def test_a_deferred_claim_is_offered_to_the_member_that_still_holds_it() -> None:
    """Seeds 1 and 303 (first runs): a member answers NoQuorum for a moment (woken from SIGSTOP,
    or around a change of leader); its clients claim at the leader, which cannot convert yet and
    defers (retry-after). From then on the client heartbeated only the leader, which kept
    deferring, and the lease ran out although the member that issued it, acting again a moment
    later, would have renewed it.

    A claim the leader defers now goes on to the other members in the same round.
    """
    client, _, _, lease, run = holder_cut_off_for_a_moment()
    run(20)
    assert lease[0].alive, "the lease ran out although its holder renews it"
    assert lease[0].server == "ls2"
    client.close()


def test_release_after_a_deferred_claim_checks_in_at_the_holder() -> None:
    """Seed 101 (first run): after the leader deferred a claim, the lease's checkin went to the
    leader, which did not hold it and answered "not released"; the seat stayed in use at the
    member that held it until its TTL ran out (and, with a lost report, in the record for good).
    """
    client, leader, ls2, lease, run = holder_cut_off_for_a_moment()
    lease[0].server = "ls1"  # where the old client sent it after the retry-after
    Deferred.fromCoroutine(lease[0].release())
    run(1)
    assert LEASE not in ls2.held, f"the checkin went only to the leader: {leader.calls[-1:]}"
    client.close()
