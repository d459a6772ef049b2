"""``ReplicatedPool``: a member of a pool of several, on top of Raft and the record.

It turns the consensus core's view (role, term, contact times) into the
answers the license server needs: may I issue seats of this feature now, how
many are mine, who leads. Followers report their leases to the leader, which
merges the reports through the log (F3); license files move by sequence
number through the log too (F9).

This class holds the wiring and the consensus view; the lease reports live
in :mod:`licensing.pool.reports` and the movement of seats across the pool
in :mod:`licensing.pool.steward`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ..errors import LicensingError, NoQuorum, NotServing, StaleLicense
from ..interfaces import IPool
from ..license import License
from ..records import InstalledLicense
from . import record as entries
from .notes import LeaseReport, LicenseOffer, MemberNote, PledgeRequest, ReportAck, SeatRequest
from .record import Record
from .reports import LeaseReports, lease_doc
from .steward import SeatSteward


if TYPE_CHECKING:
    from ..config import Address, Timings
    from ..server import LicenseServer

log = Logger()

MAX_ENTRY_BYTES = 1_500_000
"""Largest log entry and AppendEntries batch: a 1 MiB license file in base64 fits; the
peer transport chunks it into AMP-sized values."""


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
        self.notes: dict[str, tuple[float, MemberNote]] = {}
        self._heard: dict[str, float] = {}
        self.offers: dict[int, bytes] = {}
        self._license_waiters: list[tuple[int, Deferred[int]]] = []
        self.reports = LeaseReports(
            self.name, self.node, self.record, server.seats, self.network, clock, timings,
            propose=self._propose,
        )
        self.steward = SeatSteward(
            self.name, list(members), self.node, self.record, server.seats, self.network, clock,
            timings, notes=self.notes, propose=self._propose, note=self._note,
            has_quorum=self.has_quorum, fenced_at=self._fenced_at,
        )
        self.node.hold_handover = self.steward.keeping_for_claims
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._steward_loop = LoopingCall(self.steward.step)
        self._steward_loop.clock = clock
        self._stopped = False
        self.won_at = 0.0
        self._ready_index = 0
        self._settled_at = 0
        """The applied index at which the seat table last gave up what the record took away."""
        self._synced = False
        """Caught up with a leader since this start: before, the record may be stale."""
        self._moved_away: set[str] = set()
        """Leases held here that an applied entry gave to another member."""

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
        return self.clock.seconds() >= self._fenced_at(member)

    def _fenced_at(self, member: str) -> float:
        """Leader: when ``member`` is surely fenced, a reclaim wait after the later of
        this leader's win and the send time of the last message it acknowledged."""
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
        """See :meth:`SeatSteward.request_seats`."""
        self.steward.request_seats(feature, count)

    def retry_after(self, feature: str, lease_id: str | None = None) -> float | None:
        """See :meth:`SeatSteward.retry_after`."""
        return self.steward.retry_after(feature, lease_id)

    def lease_adopted(self, lease: Any) -> None:
        self.steward.adopted(lease)
        if self.node.role == "leader":
            held = self.record.leases.get(lease.lease_id)
            source = held.server if held else None
            self._propose(entries.adopt_entry(lease_doc(lease), source, self.name))

    def awaiting_leader(self) -> bool:
        node = self.node
        return node.role != "leader" and (
            node.leader is None or node.leader not in node.reachable(2 * self.timings.peer_heartbeat))

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
            self.steward.set_allocations()
        elif kind == entries.APPLIED:
            self._settle()
            if self.record.shrunk_at.get(self.name) == detail and self._settled_at >= detail:
                self._tell_leader()
        elif kind == entries.ADOPT:
            # Released once settled, if the lease has not come back here by
            # then: a restarted member replaying the log also meets the
            # adoptions of leases that it converted itself later on.
            lease_id = detail.lease_id
            if detail.server == self.name:
                self._moved_away.discard(lease_id)
            elif self.server.seats.get(lease_id) is not None:
                self._moved_away.add(lease_id)

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
            if doc is not None and doc.server != self.name and seats.release(lease_id) is not None:
                self.server.forget([lease_id])
                log.info("lease {lease_id} moved to {to}; released here", lease_id=lease_id,
                         to=doc.server)
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
            self.reports.merge(sender, message)
        elif isinstance(message, ReportAck):
            self.reports.acked(message.report_id)
        elif isinstance(message, LicenseOffer):
            self._offered(sender, message.data.encode("latin-1"))
        elif isinstance(message, SeatRequest):
            if self.node.role == "leader" and isinstance(message.count, int) and message.count > 0:
                self.steward.want(sender, message.feature, min(message.count, 10_000))
        elif isinstance(message, PledgeRequest):
            if sender == self.node.leader and isinstance(message.count, int):
                self.steward.pledge(message.feature, message.count)
        else:
            self.node.receive(sender, message)

    def _role_changed(self, role: str, term: int, leader: str | None) -> None:
        log.info("{name} is {role} in term {term} (leader {leader})", name=self.name, role=role,
                 term=term, leader=leader)
        self.reports.forget_in_flight()
        self.steward.role_changed(role)
        if role == "leader":
            self.won_at = self.clock.seconds()
            self._ready_index = self.node.last_log_index
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
        self.reports.report()

    def _tell_leader(self) -> None:
        """Send the leader our note now, not at the next status report.

        After applying an entry that shrank our allocation: the leader hands
        the seats out only once we report that we settled past it, and the
        periodic note would add up to a status report (1 s) to every move of
        seats, borrowing for claims included.
        """
        leader = self.node.leader
        if leader is not None and leader != self.name:
            self.network.send(leader, self._note())

    def _note(self) -> MemberNote:
        # The leader moves seats a shrink freed only once the shrunk member
        # reports it settled past that entry, so the index is the settled one.
        return MemberNote(self.name, self.node.role, self.node.term, self.node.commit_index,
                          self.record.sequence, self._settled_at,
                          {f: list(p) for f, p in self.steward.pledges.items()})
