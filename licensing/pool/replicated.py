"""``ReplicatedPool``: a member of a pool of several, on top of Raft and the record.

It turns the consensus core's view (role, term, contact times) into the
answers the license server needs: may I issue seats of this feature now, how
many are mine, who leads. Followers report their leases to the leader, which
merges the reports through the log (F3); license files move by sequence
number through the log too (F9).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ..errors import (
    BadRequest,
    LicensingError,
    NoQuorum,
    NotServing,
    StaleLicense,
)
from ..interfaces import IPool
from ..license import License
from ..records import InstalledLicense, Lease
from . import record as entries
from .notes import LeaseReport, LicenseOffer, MemberNote, PledgeRequest, ReportAck, SeatRequest
from .record import Record

if TYPE_CHECKING:
    from ..config import Address, Timings
    from ..server import LicenseServer

log = Logger()

MAX_REPORT = 1000
"""Leases per report entry (about 250 KB): a busy member's first report takes a few entries."""

MAX_ENTRY_BYTES = 1_500_000
"""Largest log entry and AppendEntries batch: a 1 MiB license file in base64 fits; the
peer transport chunks it into AMP-sized values."""


def lease_doc(lease: Lease) -> dict[str, Any]:
    return {k: getattr(lease, k) for k in entries.LEASE_FIELDS}


def _check_lease_doc(doc: Any, server: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise BadRequest("a reported lease must be an object")
    out = {}
    for key in entries.LEASE_FIELDS:
        value = doc.get(key)
        if key == "count":
            if not isinstance(value, int) or not 1 <= value <= 10_000:
                raise BadRequest("reported lease count out of range")
        elif not isinstance(value, str) or len(value) > 256:
            raise BadRequest(f"reported lease {key} must be short text")
        out[key] = value
    out["server"] = server
    return out


@implementer(IPool)
class ReplicatedPool:
    """``IPool`` for a member of a pool of two or more."""

    def __init__(
        self,
        server: LicenseServer,
        members: Mapping[str, Address],
        timings: Timings,
        clock: Any,
        rng: random.Random,
        network_factory: Any,
        preference: Mapping[str, int] | None = None,
    ) -> None:
        from .raft import RaftNode, RaftTimings

        self.server = server
        self.name = server.name
        self.member_addresses = dict(members)
        self.timings = timings
        self.clock = clock
        self.record = Record(list(members), server.parse_license)
        self.record.observers.append(self._record_changed)
        self.network = network_factory(self._deliver)
        self.node = RaftNode(
            self.name, list(members), server.store, clock, rng, self.network, self.record,
            RaftTimings(heartbeat=timings.peer_heartbeat, election_timeout=timings.election_timeout,
                        snapshot_every=timings.snapshot_every, max_batch_bytes=MAX_ENTRY_BYTES,
                        clock_drift=timings.clock_drift,
                        preference_delay=self.reclaim_wait() + 2 * timings.election_timeout),
            preference=preference,
        )
        self.node.add_role_observer(self._role_changed)
        self.node.hold_handover = self._keeping_for_claims
        self.notes: dict[str, tuple[float, MemberNote]] = {}
        self._heard: dict[str, float] = {}
        self.offers: dict[int, bytes] = {}
        self._license_waiters: list[tuple[int, Deferred[int]]] = []
        self._report_id = 0
        self._in_flight: LeaseReport | None = None
        self._in_flight_at = 0.0
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._steward_loop = LoopingCall(self._steward)
        self._steward_loop.clock = clock
        self._stopped = False
        self.won_at = 0.0
        self._ready_index = 0
        self.pledges: dict[str, list[int]] = {}
        self._wanted: dict[str, dict[str, tuple[int, float]]] = {}
        """Leader: feature -> member -> (seats it asked for, when it last asked)."""
        self._pending: set[tuple[str, str]] = set()
        self._asked: dict[tuple[str, str], float] = {}
        self._settled_at = 0
        """The applied index at which the seat table last gave up what the record took away."""
        self._synced = False
        """Caught up with a leader since this start: before, the record may be stale."""
        self._moved_away: set[str] = set()
        """Leases held here that an applied entry gave to another member."""
        self._kept: dict[str, list[tuple[int, float]]] = {}
        self._claims: dict[str, dict[str, float]] = {}
        """Leader: feature -> lease id -> when a claim for it last had to wait for seats."""
        self._to_keep: dict[str, list[tuple[int, float]]] = {}
        """Leader: seats reclaimed and not yet handed out, to keep once they come here."""
        """Leader: feature -> (seats, until) reclaimed from fenced members, kept for their
        clients' claims (not for new checkouts) until one lease TTL after the reclaim."""

    # -- IPool ------------------------------------------------------------------

    @property
    def role(self) -> str:
        return self.node.role

    @property
    def leader(self) -> str | None:
        return self.node.leader

    @property
    def term(self) -> int:
        return self.node.term

    def start(self) -> Deferred[None]:
        return ensureDeferred(self._start())

    async def _start(self) -> None:
        self.network.start()
        await self.node.start()
        self._loop.start(self.timings.status_report, now=False).addErrback(
            lambda f: log.failure("pool status loop stopped", f))
        self._steward_loop.start(self.timings.peer_heartbeat, now=False).addErrback(
            lambda f: log.failure("allocation steward stopped", f))

    def stop(self) -> None:
        self._stopped = True
        for loop in (self._loop, self._steward_loop):
            if loop.running:
                loop.stop()
        self.node.stop()
        d = self.network.stop()
        if d is not None:
            d.addErrback(lambda f: log.failure("peer links did not stop cleanly", f))

    def reclaim_wait(self) -> float:
        """How long after its last acknowledged contact a member is surely fenced.

        ``allocation_lease`` stretched by the worst rate difference of two
        clocks that each drift by at most ``clock_drift`` from real time.
        """
        d = self.timings.clock_drift
        return self.timings.allocation_lease * (1 + d) / (1 - d)

    def has_quorum(self) -> bool:
        """Whether this member may act on its allocation now (DESIGN section 5).

        A follower needs an allocation lease confirmed by the leader within
        ``allocation_lease`` and must have applied every entry the leader had
        committed when it last wrote: an entry that shrank this member's
        allocation is then in effect before the member issues again. A leader
        needs a majority within the same window and its own record caught up.
        """
        now = self.clock.seconds()
        lease = self.timings.allocation_lease
        node = self.node
        if node.role == "leader":
            since = node.majority_acked_since()
            return (since is not None and now - since <= lease
                    and node.last_applied >= self._ready_index)
        age = node.leader_contact_age()
        return (age is not None and age <= lease and node.last_applied >= node.leader_commit
                and self._commit_of_this_term())

    def _commit_of_this_term(self) -> bool:
        """Follower: the commit index the leader told us is that of an entry of its own term.

        A new leader learns which entries of earlier terms are committed only
        once an entry of its own term commits; until then the commit index it
        sends can leave out a committed entry that shrank this member's
        allocation, whose seats the record already gave to another member.
        The seat simulation found it: a member restarted with commit index 0
        won an election and confirmed allocation leases with commit 0 (seed
        147, three members, "any" mode). The leader's lease confirmation
        should wait for this (docs/simulation.md, "Known issues"); until it
        does, the follower checks it.
        """
        node = self.node
        return node.leader_commit > 0 and node._log.term_at(node.leader_commit) == node.term

    def fenced(self, member: str) -> bool:
        """Leader: ``member`` has surely stopped acting on its allocation by now."""
        acked = self.node.acked_within(member)
        ref = self.won_at if acked is None else max(self.won_at, acked)
        return self.clock.seconds() >= ref + self.reclaim_wait()

    def _fenced_at(self, member: str) -> float:
        acked = self.node.acked_within(member)
        ref = self.won_at if acked is None else max(self.won_at, acked)
        return ref + self.reclaim_wait()

    def check_issue(self, feature: Any) -> None:
        if self.record.license is None:
            raise NotServing(f"server {self.name} has no committed license yet; retry shortly")
        self._settle()
        if feature.majority_rule and not self.has_quorum():
            raise NoQuorum(
                f"feature {feature.name!r} needs a majority of the pool and server {self.name} "
                f"cannot see one (leader: {self.node.leader or 'none'}); try another server"
            )
        if not feature.majority_rule and not self._synced:
            # A restarted member's record is the committed prefix it happens
            # to hold; seats moved away since then would be issued twice.
            raise NotServing(f"server {self.name} restarted and has not yet caught up with the "
                             f"pool; try another server")

    def allocation(self, feature: str) -> int:
        return self.record.allocation(feature, self.name)

    def offer_license(self, data: bytes) -> Deferred[int]:
        lic = self.server.verify(data)
        if lic.sequence <= self.record.sequence:
            raise StaleLicense(
                f"license sequence {lic.sequence} is not newer than the pool's sequence "
                f"{self.record.sequence}; kept the installed file")
        self.offers[lic.sequence] = data
        waiter: Deferred[int] = Deferred()
        self._license_waiters.append((lic.sequence, waiter))
        self._push_offers()
        return waiter

    def members(self) -> list[dict[str, Any]]:
        now = self.clock.seconds()
        contact = self._heard
        window = 2 * self.timings.election_timeout
        out = []
        for name, address in self.member_addresses.items():
            doc: dict[str, Any] = {"name": name, "client_host": address.host, "client_port": address.port}
            if name == self.name:
                doc.update(role=self.node.role, reachable=True, last_contact=0.0, term=self.node.term,
                           commit_index=self.node.commit_index, license_sequence=self.record.sequence or None)
            else:
                heard = contact.get(name)
                note = self.notes.get(name)
                fresh = note is not None and now - note[0] <= window
                doc.update(
                    role=note[1].role if fresh else "unreachable",
                    reachable=heard is not None and now - heard <= window,
                    last_contact=None if heard is None else round(now - heard, 3),
                    term=note[1].term if note else None,
                    commit_index=note[1].commit_index if note else None,
                    license_sequence=(note[1].license_sequence or None) if note else None,
                )
            out.append(doc)
        return out

    def leases_changed(self) -> None:
        """Reports go out on the status loop; coalescing many changes into one entry."""

    def request_seats(self, feature: str, count: int) -> None:
        """Ask the leader to move seats here; at most one message per feature per heartbeat.

        The leader asking itself costs nothing, so every request counts: the
        claims of a failed member's clients arrive in a burst, and each must
        add to what the leader asks its donors for.
        """
        leader = self.node.leader
        if leader is None:
            return
        if leader == self.name:
            self._want(self.name, feature, count)
            return
        now = self.clock.seconds()
        key = (feature, leader)
        if now - self._asked.get(key, float("-inf")) < self.timings.peer_heartbeat:
            return
        self._asked[key] = now
        self.network.send(leader, SeatRequest(feature, count))

    def retry_after(self, feature: str, lease_id: str | None = None) -> float | None:
        """Leader: when converting a lease of ``feature`` may succeed, or None if it cannot.

        0 means now: a seat kept for claims was just made free for the claim
        of ``lease_id``, which the server then converts at once.
        """
        if self.node.role != "leader" or self.record.license is None:
            return None
        f = self.record.license.feature(feature)
        if f is None:
            return None
        if self._may_use_kept(feature, lease_id) and self._release_kept(feature, 1):
            return 0.0
        now = self.clock.seconds()
        waits = []
        reachable = self.node.reachable(self.timings.election_timeout)
        for member in self.member_addresses:
            if member == self.name or self.record.allocation(feature, member) == 0:
                continue
            free = self.record.allocation(feature, member) - self.record.used(feature, member)
            if f.majority_rule and self.fenced(member):
                waits.append(self.timings.peer_heartbeat * 2)
            elif f.majority_rule and member not in reachable:
                waits.append(max(self.timings.peer_heartbeat, self._fenced_at(member) - now))
            elif member in reachable and free > 0:
                # Borrowing moves them here, for features without majority rule too.
                waits.append(1.0)
        if self.record.unassigned(feature) > 0:
            waits.append(self.timings.peer_heartbeat * 2)
        if not waits:
            return None
        self.request_seats(feature, self._claim_waiting(feature, lease_id))
        return round(min(waits) + self.timings.peer_heartbeat, 3)

    def _claim_waiting(self, feature: str, lease_id: str | None) -> int:
        """Leader: how many claims of ``feature`` wait for seats, this one included.

        Asking donors for one seat per round converted one claim per round:
        a failed member's ten clients, sent back to retry every few seconds,
        ran out of lease TTL before the last one was served (integration
        test of a frozen leader, after a hand-over moved the kept seats).
        """
        now = self.clock.seconds()
        window = 3 * self.timings.status_report
        waiting = self._claims.setdefault(feature, {})
        waiting[lease_id or f"anonymous-{now}"] = now
        for key in [k for k, when in waiting.items() if now - when > window]:
            del waiting[key]
        return len(waiting)

    def _keeping_for_claims(self) -> bool:
        """Leader: seats reclaimed from a failed member still wait for its clients' claims.

        Only while the record lists leases of a member whose allocation was
        reclaimed, not for the whole time seats are kept (one lease TTL):
        a failed member that held no leases must not stop a hand-over.
        """
        if any(self._to_keep.values()):
            return True
        return any(self._kept_seats(feature) and self._unclaimed(feature)
                   for feature in list(self._kept))

    def _unclaimed(self, feature: str) -> bool:
        allocation = self.record.allocation
        return any(doc["feature"] == feature and doc["server"] != self.name
                   and allocation(feature, doc["server"]) == 0
                   for doc in self.record.leases.values())

    def lease_adopted(self, lease: Any) -> None:
        self._claims.get(lease.feature, {}).pop(lease.lease_id, None)
        if self.node.role == "leader":
            held = self.record.leases.get(lease.lease_id)
            source = held["server"] if held else None
            self._propose(entries.adopt_entry(lease_doc(lease), source, self.name))

    def usage(self, feature: str) -> dict[str, dict[str, int]]:
        out = {}
        for name in self.member_addresses:
            used = self.server.seats.used(feature) if name == self.name else self.record.used(feature, name)
            out[name] = {"allocation": self.record.allocation(feature, name), "used": used}
        return out

    # -- record -> server ------------------------------------------------------

    def _record_changed(self, kind: str, detail: Any) -> None:
        if kind == entries.LICENSE:
            lic: License = detail
            served = self.server.license
            if served is None or lic.sequence >= served.sequence:
                # A restarted member replays the log from older files up while it
                # already serves the newer file it stored: it never goes back (F9).
                self.server.license = lic
            self.offers = {s: d for s, d in self.offers.items() if s > lic.sequence}
            stored = self.server.stored_sequence
            if lic.sequence > stored and self.record.license_data is not None:
                self.server.stored_sequence = lic.sequence
                self.server.store.save_license(InstalledLicense(lic.sequence, self.record.license_data)) \
                    .addErrback(lambda f: log.error("license not stored: {e}", e=str(f.value)))
            for sequence, waiter in list(self._license_waiters):
                if lic.sequence >= sequence:
                    self._license_waiters.remove((sequence, waiter))
                    waiter.callback(lic.sequence)
        elif kind == entries.ALLOCATION:
            self._set_allocations()
        elif kind == entries.APPLIED:
            self._settle()
        elif kind == entries.ADOPT:
            # Released once settled, if the lease has not come back here by
            # then: a restarted member replaying the log also meets the
            # adoptions of leases that it converted itself later on.
            lease_id = detail["lease_id"]
            if detail["server"] == self.name:
                self._moved_away.discard(lease_id)
            elif self.server.seats.get(lease_id) is not None:
                self._moved_away.add(lease_id)

    def _set_allocations(self) -> None:
        """Make the seat table follow the record, less what this member pledged away
        and, on the leader, the seats it keeps for claims."""
        seats = self.server.seats
        for feature, shares in self.record.allocations.items():
            mine = shares.get(self.name, 0)
            pledge = self.pledges.get(feature)
            if pledge is not None and pledge[0] != mine:
                del self.pledges[feature]
                pledge = None
            seats.set_allocation(feature, mine - (pledge[1] if pledge else 0) - self._kept_seats(feature))

    def _kept_seats(self, feature: str) -> int:
        kept = self._kept.get(feature)
        if not kept:
            return 0
        now = self.clock.seconds()
        if any(until <= now for _, until in kept):
            kept[:] = [(n, until) for n, until in kept if until > now]
        return sum(n for n, _ in kept)

    def _may_use_kept(self, feature: str, lease_id: str | None) -> bool:
        """Kept seats are for leases of members whose allocation was reclaimed.

        Also for leases the record never heard of (issued in a member's last
        moments), but not for one that a member still acting holds: around a
        change of leader every follower answers NoQuorum for a moment, its
        clients claim here, and converting them would spend the kept seats
        on leases that are not lost.
        """
        doc = self.record.leases.get(lease_id) if lease_id is not None else None
        if doc is None:
            return True
        holder = doc["server"]
        return (holder != self.name and self.record.allocation(feature, holder) == 0) \
            or self.fenced(holder)

    def _release_kept(self, feature: str, count: int) -> bool:
        """Stop keeping ``count`` seats (for a claim, or a pledge); False if too few are kept."""
        if self._kept_seats(feature) < count:
            return False
        kept = self._kept[feature]
        while count > 0:
            n, until = kept.pop(0)
            if n > count:
                kept.insert(0, (n - count, until))
            count -= n
        self._set_allocations()
        return True

    def _applied(self) -> int:
        # Inside Record.apply the record is one ahead of the node; Raft's own
        # no-op entries move only the node.
        return max(self.record.applied, self.node.last_applied)

    def _caught_up(self) -> bool:
        """Whether the record holds everything the leader had committed when it last wrote."""
        applied = self._applied()
        if self.node.role == "leader":
            return applied >= self._ready_index
        return applied >= self.node.leader_commit and self._commit_of_this_term()

    def _settle(self) -> None:
        """Once caught up, give up the leases the current record leaves no seats for.

        If the record gives this member fewer seats than its leases use (its
        allocation was reclaimed while it was cut off), the newest leases go:
        their clients convert them at the leader. Never on a record that is
        still replaying old entries after a restart: an early entry's smaller
        allocation would drop leases that the latest one has room for.
        """
        if self._settled_at >= self._applied() or not self._caught_up():
            return
        self._settled_at = self._applied()
        self._synced = True
        seats = self.server.seats
        for lease_id in sorted(self._moved_away):
            doc = self.record.leases.get(lease_id)
            if doc is not None and doc["server"] != self.name and seats.release(lease_id) is not None:
                self.server.forget([lease_id])
                log.info("lease {lease_id} moved to {to}; released here", lease_id=lease_id,
                         to=doc["server"])
        self._moved_away.clear()
        for feature in self.record.allocations:
            excess = seats.used(feature) - seats.allocation(feature)
            if excess > 0:
                newest = sorted((x for x in seats.leases() if x.feature == feature),
                                key=lambda x: x.issued_at, reverse=True)
                dropped = []
                for lease in newest:
                    if excess <= 0:
                        break
                    seats.release(lease.lease_id)
                    dropped.append(lease.lease_id)
                    excess -= lease.count
                self.server.forget(dropped)
                log.warn("allocation of {feature} shrank below use; released {n} lease(s)",
                         feature=feature, n=len(dropped))

    # -- peers -------------------------------------------------------------------

    def _deliver(self, sender: str, message: object) -> None:
        if self._stopped:
            return
        self._heard[sender] = self.clock.seconds()
        if isinstance(message, MemberNote):
            if message.name == sender:
                self.notes[sender] = (self.clock.seconds(), message)
        elif isinstance(message, LeaseReport):
            self._merge_report(sender, message)
        elif isinstance(message, ReportAck):
            self._report_acked(message.report_id)
        elif isinstance(message, LicenseOffer):
            self._offered(sender, message.data.encode("latin-1"))
        elif isinstance(message, SeatRequest):
            if self.node.role == "leader" and isinstance(message.count, int) and message.count > 0:
                self._want(sender, message.feature, min(message.count, 10_000))
        elif isinstance(message, PledgeRequest):
            if sender == self.node.leader and isinstance(message.count, int):
                self._pledge(message.feature, message.count)
        else:
            self.node.receive(sender, message)

    def _role_changed(self, role: str, term: int, leader: str | None) -> None:
        log.info("{name} is {role} in term {term} (leader {leader})", name=self.name, role=role,
                 term=term, leader=leader)
        self._in_flight = None
        # Seats kept for claims stay kept after a change of leader: new
        # checkouts here may not take them, and the new leader, where the
        # claims now go, borrows them first (_pledge).
        self._to_keep.clear()
        if role == "leader":
            self.won_at = self.clock.seconds()
            self._ready_index = self.node.last_log_index
            self._wanted.clear()
            self._pending.clear()
        if leader is not None:
            self._push_offers()

    def _propose(self, data: bytes) -> Deferred[int]:
        from ..errors import NotLeader

        d = self.node.propose(data)
        d.addErrback(lambda f: f.trap(NotLeader) and None)
        d.addErrback(lambda f: log.failure("proposal failed", f))
        return d

    def _push_offers(self) -> None:
        if not self.offers:
            return
        best = max(self.offers)
        if best <= self.record.sequence:
            self.offers.clear()
            return
        if self.node.role == "leader":
            self._propose(entries.license_entry(best, self.offers[best]))
        elif self.node.leader is not None:
            self.network.send(self.node.leader, LicenseOffer(self.offers[best].decode("latin-1")))

    def _offered(self, sender: str, data: bytes) -> None:
        try:
            lic = self.server.verify(data)
        except LicensingError as e:
            log.warn("license offered by {sender} refused: {error}", sender=sender, error=str(e))
            return
        if lic.sequence > self.record.sequence:
            self.offers[lic.sequence] = data
            self._push_offers()
        else:
            log.info("license sequence {seq} offered by {sender} is not newer than {current}",
                     seq=lic.sequence, sender=sender, current=self.record.sequence)

    # -- status loop: notes and lease reports (F3) -------------------------------

    def _tick(self) -> None:
        self._settle()
        for peer in self.member_addresses:
            if peer != self.name:
                self.network.send(peer, self._note())
        self._push_offers()
        self._report()

    def _note(self) -> MemberNote:
        # The leader moves seats a shrink freed only once the shrunk member
        # reports it settled past that entry, so the index is the settled one.
        return MemberNote(self.name, self.node.role, self.node.term, self.node.commit_index,
                          self.record.sequence, self._settled_at,
                          {f: list(p) for f, p in self.pledges.items()})

    # -- seats across the pool: reclaim, pledges, borrowing ------------------------

    def _want(self, member: str, feature: str, count: int) -> None:
        wanted = self._wanted.setdefault(feature, {})
        before = self._wants(feature).get(member, 0)
        wanted[member] = (max(before, count), self.clock.seconds())

    def _wants(self, feature: str) -> dict[str, int]:
        """Seats reachable members asked for lately.

        A member asks again while its checkouts keep failing; an old request
        of a member that has since been served otherwise, or cannot be
        reached, would keep seats moving towards it, away from members that
        need them now (the leader itself, for claims).
        """
        now = self.clock.seconds()
        window = 3 * self.timings.status_report
        reachable = self.node.reachable(self.timings.election_timeout)
        return {m: n for m, (n, when) in (self._wanted.get(feature) or {}).items()
                if now - when <= window and m in reachable}

    def _pledge(self, feature: str, count: int) -> None:
        """Stop using ``count`` free seats (giver first), and tell the leader at once.

        Seats kept for claims go first once this member no longer leads: it
        kept them for claims that now go to another leader.
        """
        if self.record.license is None or self.record.license.feature(feature) is None:
            return
        seats = self.server.seats
        kept = self._kept_seats(feature) if self.node.role != "leader" else 0
        give = min(count, seats.free(feature) + kept)
        if give <= 0:
            return
        if kept:
            self._release_kept(feature, min(give, kept))
        base = self.record.allocation(feature, self.name)
        pledge = self.pledges.setdefault(feature, [base, 0])
        pledge[1] += give
        self._set_allocations()
        leader = self.node.leader
        if leader is not None and leader != self.name:
            self.network.send(leader, self._note())

    def _safe(self, member: str, feature: Any) -> bool:
        """Leader: ``member`` no longer acts on seats of ``feature`` that an entry took from it.

        A fenced member does not act on majority-rule features at all; it
        may still serve one without majority rule from its old allocation.
        """
        note = self.notes.get(member)
        settled = note[1].last_applied if note else 0
        if settled >= self.record.shrinks.get(feature.name, {}).get(member, 0):
            return True
        return bool(feature.majority_rule) and self.fenced(member)

    def _steward(self) -> None:
        """Leader, every peer heartbeat: reclaim from fenced members, move pledged and free seats."""
        lic = self.record.license
        if self._kept:
            self._set_allocations()  # kept seats whose time is up become ordinary free seats
        if self.node.role != "leader" or lic is None or not self.has_quorum():
            return
        for feature in lic.features.values():
            name = feature.name
            if any(p[0] == name for p in self._pending):
                continue
            if feature.majority_rule and self._reclaim(feature):
                continue
            self._give_unassigned(feature)
            self._move_pledges(name)
            self._ask_donors(name)

    def _reclaim(self, feature: Any) -> bool:
        """Take the allocation of one fenced member, if any; True if a change was proposed.

        The seats become unassigned, and the next hand-out gives them to
        this leader, which keeps them for claims only (F8), not for new
        checkouts, until one lease TTL after the reclaim: the member's
        clients come here to claim their leases, including those it issued
        in its last moments, which never reached the record. Given to
        whichever member asked first, a new checkout there could take them
        before the dead member's clients came to claim (DESIGN section 11,
        item 4). Not in the same entry as the shrink: the member may be back
        by the time that entry commits, with an allocation lease confirmed
        by a message sent before the commit, and act on its old share.
        """
        name = feature.name
        for member in self.member_addresses:
            share = self.record.allocation(name, member)
            if member == self.name or share == 0 or not self.fenced(member):
                continue
            log.info("reclaiming {n} seat(s) of {feature} from unreachable {member}, kept for "
                     "its clients' claims", n=share, feature=name, member=member)
            self._change(name, {member: 0}, {member: share}).addCallback(
                lambda index, n=share: index is not None and self._to_keep.setdefault(
                    name, []).append((n, self.clock.seconds() + feature.lease_ttl)))
            return True
        return False

    def _change(self, feature: str, changes: dict[str, int], expect: dict[str, int]) -> Deferred[int]:
        key = (feature, ",".join(sorted(changes)))
        self._pending.add(key)
        d = self._propose(entries.allocation_entry(feature, changes, expect))
        d.addBoth(lambda result: (self._pending.discard(key), result)[1])
        return d

    def _receiver(self, feature: str) -> str:
        """Who gets free seats: the reachable member that asked for most, else this leader."""
        wanted = self._wants(feature)
        return max(wanted, key=lambda m: (wanted[m], m)) if wanted else self.name

    def _granted(self, feature: str, member: str, seats: int) -> None:
        wanted = self._wanted.get(feature, {})
        if member in wanted:
            count, when = wanted[member]
            if count > seats:
                wanted[member] = (count - seats, when)
            else:
                del wanted[member]

    def _give_unassigned(self, feature: Any) -> None:
        """Hand free seats out, once every member they were taken from has stopped using them.

        Seats reclaimed from a fenced member come to this leader, kept for claims.
        """
        name = feature.name
        free = self.record.unassigned(name)
        if free <= 0 or not all(self._safe(m, feature) for m in self.member_addresses
                                if m != self.name):
            return
        keep, left = [], free
        for n, until in self._to_keep.pop(name, []):
            if until > self.clock.seconds() and left > 0:
                keep.append((min(n, left), until))
                left -= min(n, left)
        to = self.name if keep else self._receiver(name)
        share = self.record.allocation(name, to)
        d = self._change(name, {to: share + free}, {to: share})
        if keep:
            d.addCallback(lambda index: index is not None and self._keep(name, keep))
        else:
            self._granted(name, to, free)

    def _keep(self, feature: str, seats: list[tuple[int, float]]) -> None:
        if self.node.role == "leader":
            self._kept.setdefault(feature, []).extend(seats)
            self._set_allocations()

    def _move_pledges(self, feature: str) -> None:
        """Shrink a member that offered seats; they go out as unassigned seats once it settled.

        Giver first in two entries, not one: a receiver may apply an entry
        before the giver does, and a giver that restarted meanwhile has
        forgotten its offer. An offer counts only if its note was sent after
        the giver settled the last change of its allocation: an older one
        may be about an allocation that has since changed and changed back.
        """
        changed = self.record.changes.get(feature, {})
        pledged = {self.name: self.pledges.get(feature)}
        for member, (_, note) in self.notes.items():
            if note.last_applied >= changed.get(member, 0):
                pledged[member] = note.pledges.get(feature)
        for giver, pledge in pledged.items():
            if not pledge or pledge[1] <= 0 or self.record.allocation(feature, giver) != pledge[0]:
                continue
            base, seats = pledge
            self._change(feature, {giver: base - seats}, {giver: base})
            return

    def _ask_donors(self, feature: str) -> None:
        wanted = self._wants(feature)
        if not wanted:
            return
        now = self.clock.seconds()
        need = sum(wanted.values())
        reachable = self.node.reachable(self.timings.election_timeout)
        donors = sorted(
            ((self.record.allocation(feature, m) - self.record.used(feature, m), m)
             for m in self.member_addresses if m not in wanted and m in reachable),
            reverse=True,
        )
        for free, donor in donors:
            if free <= 0 or need <= 0:
                break
            key = (feature, donor)
            if now - self._asked.get(key, float("-inf")) < 2 * self.timings.peer_heartbeat:
                continue
            self._asked[key] = now
            give = min(free, need)
            if donor == self.name:
                self._pledge(feature, give)
            else:
                self.network.send(donor, PledgeRequest(feature, give))
            need -= give

    def _report(self) -> None:
        leader = self.node.leader
        if leader is None:
            return
        now = self.clock.seconds()
        if self._in_flight is not None and now - self._in_flight_at < 3 * self.timings.status_report:
            return
        # The difference between what this member holds and what the record
        # says it holds: also right after a restart, when the record still
        # lists leases that ended while this member was down.
        current = {lease.lease_id: lease for lease in self.server.seats.leases()}
        recorded = self.record.held_by(self.name)
        added = [lease_doc(current[k]) for k in sorted(current.keys() - recorded.keys())][:MAX_REPORT]
        removed = sorted(recorded.keys() - current.keys())[:MAX_REPORT]
        if not added and not removed:
            self._in_flight = None
            return
        self._report_id += 1
        report = LeaseReport(self._report_id, added, removed)
        self._in_flight, self._in_flight_at = report, now
        if leader == self.name:
            if self.node.role == "leader":
                rid = report.report_id
                self._propose(entries.report_entry(self.name, added, removed)).addCallback(
                    lambda index: index is not None and self._report_acked(rid))
        else:
            self.network.send(leader, report)

    def _report_acked(self, report_id: int) -> None:
        report = self._in_flight
        if report is not None and report.report_id == report_id:
            self._in_flight = None

    def _merge_report(self, sender: str, report: LeaseReport) -> None:
        if self.node.role != "leader":
            return
        try:
            added = [_check_lease_doc(doc, sender) for doc in report.added[:MAX_REPORT]]
            removed = [r for r in report.removed[:MAX_REPORT] if isinstance(r, str)]
        except BadRequest as e:
            log.warn("lease report from {sender} refused: {error}", sender=sender, error=str(e))
            return
        rid = report.report_id
        self._propose(entries.report_entry(sender, added, removed)).addCallback(
            lambda index: index is not None and self.network.send(sender, ReportAck(rid)))


def tagged_codec() -> tuple[Any, Any]:
    """encode/decode for the peer links: consensus messages and pool notes, told apart by a tag."""
    from . import codec
    from .notes import NOTES, decode_note, encode_note

    def encode(message: object) -> bytes:
        if type(message).__name__ in NOTES:
            return b"N" + encode_note(message)
        return b"R" + codec.encode(message)

    def decode(data: bytes) -> object:
        if data[:1] == b"N":
            return decode_note(data[1:])
        if data[:1] == b"R":
            return codec.decode(data[1:])
        raise BadRequest("peer message with an unknown tag")

    return encode, decode
