"""Seats across the pool: reclaim from fenced members, pledges, borrowing (DESIGN section 5).

The leader moves seats between members only through allocation entries in
the log, the giver shrinking first: a member that has stopped using seats
pledges them, the leader shrinks it, and once it settled past that entry
the seats go out as unassigned seats. Seats reclaimed from a fenced member
are kept by the leader for its clients' claims (F8) before anyone else may
use them. Every member also runs the giver's side: pledging when asked, and
keeping its seat table at the record's allocation less what it pledged or
keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from . import record as entries
from .notes import MemberNote, PledgeRequest, SeatRequest

if TYPE_CHECKING:
    from ..config import Timings
    from ..interfaces import IPeerNetwork
    from ..records import Lease
    from ..seats import SeatTable
    from .raft import RaftNode
    from .record import Record

log = Logger()

MIN_EVEN_OUT = 2
"""Seats one evening-out move gives at least: moving single seats around a small pool
buys no failover time and costs two log entries each."""


class SeatSteward:
    """One member's part in moving seats: the leader's decisions, every member's pledges.

    ``notes`` is the pool's live map of the other members' latest notes
    (member -> (when received, note)). ``propose`` puts an entry in the log
    and fires with its index once committed, or with None if this member
    could not propose it. ``note`` is this member's current note, sent to the
    leader at once after a pledge. ``fenced_at(member)`` is when, on this
    leader's clock, ``member`` has surely stopped acting on its allocation.
    """

    def __init__(
        self,
        name: str,
        members: Sequence[str],
        node: RaftNode,
        record: Record,
        seats: SeatTable,
        network: IPeerNetwork,
        clock: Any,
        timings: Timings,
        notes: Mapping[str, tuple[float, MemberNote]],
        propose: Callable[[bytes], Deferred[int]],
        note: Callable[[], MemberNote],
        has_quorum: Callable[[], bool],
        fenced_at: Callable[[str], float],
    ) -> None:
        self._name = name
        self._members = tuple(members)
        self._node = node
        self._record = record
        self._seats = seats
        self._network = network
        self._clock = clock
        self._timings = timings
        self._notes = notes
        self._propose = propose
        self._note = note
        self._has_quorum = has_quorum
        self._fenced_at = fenced_at
        self.pledges: dict[str, list[int]] = {}
        """feature -> [base allocation, seats]: seats this member stopped using, for the leader to move."""
        self._wanted: dict[str, dict[str, tuple[int, float]]] = {}
        """Leader: feature -> member -> (seats it asked for, when it last asked)."""
        self._pending: set[tuple[str, str]] = set()
        self._asked: dict[tuple[str, str], float] = {}
        self._kept: dict[str, list[tuple[int, float]]] = {}
        """Leader: feature -> (seats, until) reclaimed from fenced members, kept for their
        clients' claims (not for new checkouts) until one lease TTL after the reclaim."""
        self._to_keep: dict[str, list[tuple[int, float]]] = {}
        """Leader: seats reclaimed and not yet handed out, to keep once they come here."""
        self._claims: dict[str, dict[str, float]] = {}
        """Leader: feature -> lease id -> when a claim for it last had to wait for seats."""
        self._evened_at: dict[str, float] = {}
        """Leader: feature -> when it last asked a member to pledge free seats to even them out."""

    def _fenced(self, member: str) -> bool:
        return self._clock.seconds() >= self._fenced_at(member)

    # -- requests and answers ----------------------------------------------------

    def request_seats(self, feature: str, count: int) -> None:
        """Ask the leader to move seats here; at most one message per feature per heartbeat.

        The leader asking itself costs nothing, so every request counts: the
        claims of a failed member's clients arrive in a burst, and each must
        add to what the leader asks its donors for.
        """
        leader = self._node.leader
        if leader is None:
            return
        if leader == self._name:
            self.want(self._name, feature, count)
            return
        now = self._clock.seconds()
        key = (feature, leader)
        if now - self._asked.get(key, float("-inf")) < self._timings.peer_heartbeat:
            return
        self._asked[key] = now
        self._network.send(leader, SeatRequest(feature, count))

    def retry_after(self, feature: str, lease_id: str | None = None) -> float | None:
        """Leader: when converting a lease of ``feature`` may succeed, or None if it cannot.

        0 means now: a seat kept for claims was just made free for the claim
        of ``lease_id``, which the server then converts at once.
        """
        if self._node.role != "leader" or self._record.license is None:
            return None
        f = self._record.license.feature(feature)
        if f is None:
            return None
        if self._may_use_kept(feature, lease_id) and self._release_kept(feature, 1):
            return 0.0
        now = self._clock.seconds()
        waits = []
        reachable = self._node.reachable(self._timings.election_timeout)
        for member in self._members:
            if member == self._name or self._record.allocation(feature, member) == 0:
                continue
            free = self._record.allocation(feature, member) - self._record.used(feature, member)
            if f.majority_rule and self._fenced(member):
                waits.append(self._timings.peer_heartbeat * 2)
            elif f.majority_rule and member not in reachable:
                waits.append(max(self._timings.peer_heartbeat, self._fenced_at(member) - now))
            elif member in reachable and free > 0:
                # Borrowing moves them here, for features without majority rule too.
                waits.append(1.0)
        if self._record.unassigned(feature) > 0:
            waits.append(self._timings.peer_heartbeat * 2)
        if not waits:
            return None
        self.request_seats(feature, self._claim_waiting(feature, lease_id))
        return round(min(waits) + self._timings.peer_heartbeat, 3)

    def _claim_waiting(self, feature: str, lease_id: str | None) -> int:
        """Leader: how many claims of ``feature`` wait for seats, this one included.

        Asking donors for one seat per round converted one claim per round:
        a failed member's ten clients, sent back to retry every few seconds,
        ran out of lease TTL before the last one was served (integration
        test of a frozen leader, after a hand-over moved the kept seats).
        """
        now = self._clock.seconds()
        window = 3 * self._timings.status_report
        waiting = self._claims.setdefault(feature, {})
        waiting[lease_id or f"anonymous-{now}"] = now
        for key in [k for k, when in waiting.items() if now - when > window]:
            del waiting[key]
        return len(waiting)

    def adopted(self, lease: Lease) -> None:
        """The claim of ``lease`` was served: it no longer waits for seats."""
        self._claims.get(lease.feature, {}).pop(lease.lease_id, None)

    def keeping_for_claims(self) -> bool:
        """Leader: seats reclaimed from a failed member still wait for its clients' claims.

        Only while the record lists leases of a member whose allocation was
        reclaimed, not for the whole time seats are kept (one lease TTL):
        a failed member that held no leases must not stop a hand-over.
        Also while claims here wait for seats on their way: a hand-over
        makes them start over at the next leader (seat soak seed 1108).
        """
        if any(self._to_keep.values()) or self._claims_waiting():
            return True
        return any(self._kept_seats(feature) and self._unclaimed(feature)
                   for feature in list(self._kept))

    def _claims_waiting(self) -> bool:
        now = self._clock.seconds()
        window = 3 * self._timings.status_report
        return any(now - when <= window for waiting in self._claims.values() for when in waiting.values())

    def _unclaimed(self, feature: str) -> bool:
        record = self._record
        return any(member != self._name and record.allocation(feature, member) == 0
                   and record.used(feature, member) > 0 for member in self._members)

    def role_changed(self, role: str) -> None:
        """Forget what only the leader that decided it can finish."""
        # Seats kept for claims stay kept after a change of leader: new
        # checkouts here may not take them, and the new leader, where the
        # claims now go, borrows them first (pledge).
        self._to_keep.clear()
        if role == "leader":
            self._wanted.clear()
            self._pending.clear()

    # -- this member's seat table ------------------------------------------------

    def set_allocations(self) -> None:
        """Make the seat table follow the record, less what this member pledged away
        and, on the leader, the seats it keeps for claims."""
        seats = self._seats
        for feature, shares in self._record.allocations.items():
            mine = shares.get(self._name, 0)
            pledge = self.pledges.get(feature)
            if pledge is not None and pledge[0] != mine:
                del self.pledges[feature]
                pledge = None
            seats.set_allocation(feature, mine - (pledge[1] if pledge else 0) - self._kept_seats(feature))

    def _kept_seats(self, feature: str) -> int:
        kept = self._kept.get(feature)
        if not kept:
            return 0
        now = self._clock.seconds()
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
        doc = self._record.leases.get(lease_id) if lease_id is not None else None
        if doc is None:
            return True
        holder = doc.server
        return (holder != self._name and self._record.allocation(feature, holder) == 0) \
            or self._fenced(holder)

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
        self.set_allocations()
        return True

    def want(self, member: str, feature: str, count: int) -> None:
        """Leader: ``member`` asked for ``count`` seats of ``feature``."""
        wanted = self._wanted.setdefault(feature, {})
        before = self._wants(feature).get(member, 0)
        wanted[member] = (max(before, count), self._clock.seconds())

    def _wants(self, feature: str, within: float | None = None) -> dict[str, int]:
        """Seats reachable members asked for lately.

        A member asks again while its checkouts keep failing; an old request
        of a member that has since been served otherwise, or cannot be
        reached, would keep seats moving towards it, away from members that
        need them now (the leader itself, for claims).
        """
        now = self._clock.seconds()
        window = 3 * self._timings.status_report if within is None else within
        reachable = self._node.reachable(self._timings.election_timeout)
        return {m: n for m, (n, when) in (self._wanted.get(feature) or {}).items()
                if now - when <= window and m in reachable}

    def pledge(self, feature: str, count: int) -> None:
        """Stop using ``count`` free seats (giver first), and tell the leader at once.

        Seats kept for claims go first once this member no longer leads: it
        kept them for claims that now go to another leader.
        """
        if self._record.license is None or self._record.license.feature(feature) is None:
            return
        seats = self._seats
        kept = self._kept_seats(feature) if self._node.role != "leader" else 0
        give = min(count, seats.free(feature) + kept)
        if give <= 0:
            return
        if kept:
            self._release_kept(feature, min(give, kept))
        base = self._record.allocation(feature, self._name)
        pledge = self.pledges.setdefault(feature, [base, 0])
        pledge[1] += give
        self.set_allocations()
        leader = self._node.leader
        if leader is not None and leader != self._name:
            self._network.send(leader, self._note())

    # -- the leader's rounds -----------------------------------------------------

    def _bound(self, member: str, feature: Any) -> int | None:
        """Leader: the most seats of ``feature`` that ``member`` may still act on; None if unknown.

        Its allocation in the record once it has applied the last entry that
        lowered it, or is fenced (a fenced member does not act on majority-
        rule features at all; it may still serve one without majority rule
        from an old allocation). Otherwise the highest allocation it has had
        since the last entry it is known to have applied.
        """
        name = feature.name
        if member == self._name:
            return self._record.allocation(name, member)
        note = self._notes.get(member)
        settled = max(note[1].last_applied if note else 0, self._node.known_applied(member))
        if settled >= self._record.shrinks.get(name, {}).get(member, 0) or (
                feature.majority_rule and self._fenced(member)):
            return self._record.allocation(name, member)
        return self._record.highest_since(name, member, settled)

    def _givable(self, feature: Any) -> int:
        """Leader: unassigned seats no member can be acting on, so they may be handed out.

        Members that have not yet applied an entry that took seats from them
        hold back only the seats above their allocation then, not every
        unassigned seat: a member slow to confirm (a lossy link) no longer
        stalls the seats other members gave up (seat soak seed 1108).
        """
        bounds = [self._bound(member, feature) for member in self._members]
        if any(b is None for b in bounds):
            return 0
        return min(self._record.unassigned(feature.name), feature.count - sum(bounds))  # type: ignore[arg-type]

    def step(self) -> None:
        """Leader, every peer heartbeat: reclaim from fenced members, move pledged and free seats."""
        lic = self._record.license
        if self._kept:
            self.set_allocations()  # kept seats whose time is up become ordinary free seats
        if self._node.role != "leader" or lic is None or not self._has_quorum():
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
            self._even_out(name)

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
        for member in self._members:
            share = self._record.allocation(name, member)
            if member == self._name or share == 0 or not self._fenced(member):
                continue
            log.info("reclaiming {n} seat(s) of {feature} from unreachable {member}, kept for "
                     "its clients' claims", n=share, feature=name, member=member)
            self._change(name, {member: 0}, {member: share}).addCallback(
                lambda index, n=share: index is not None and self._to_keep.setdefault(
                    name, []).append((n, self._clock.seconds() + feature.lease_ttl)))
            return True
        return False

    def _change(self, feature: str, changes: dict[str, int], expect: dict[str, int]) -> Deferred[int]:
        key = (feature, ",".join(sorted(changes)))
        self._pending.add(key)
        d = self._propose(entries.allocation_entry(feature, changes, expect))
        d.addBoth(lambda result: (self._pending.discard(key), result)[1])
        return d

    def _receiver(self, feature: str) -> str:
        """Who gets free seats: the reachable member that asked for most, else the one
        with the fewest free seats (this leader among equals)."""
        wanted = self._wants(feature)
        if wanted:
            return max(wanted, key=lambda m: (wanted[m], m))
        free = self._free_seats(feature)
        return min(free, key=lambda m: (free[m], m != self._name, m))

    def _free_seats(self, feature: str) -> dict[str, int]:
        """Reachable members' free seats of ``feature``: this member's as its seat table
        has them (less what it keeps or pledged), the others' as the record has them."""
        reachable = self._node.reachable(self._timings.election_timeout)
        free = {}
        for member in self._members:
            if member == self._name:
                free[member] = self._seats.free(feature)
            elif member in reachable:
                free[member] = self._record.allocation(feature, member) - self._record.used(feature, member)
        return free

    def _even_out(self, feature: str) -> None:
        """Leader, while nobody asks for seats: move free seats from the member that has
        most to the one that has fewest, half the difference at a time.

        Seats a dead member held free can only be reclaimed once it is
        surely fenced (``allocation_lease`` and drift, 2.2 s by default), so
        its clients' claims wait that long if the survivors have no free
        seat. Free seats gather where leases were checked in or reclaimed
        (the leader, mostly); spread out, a survivor has room for the claims
        at once. Only where the difference matters (at least
        2 * MIN_EVEN_OUT, and more than twice the fewest plus one), once per
        status report, not within a status report of a request for seats, and not while a
        pledge is outstanding, so it never churns. Not while claims may still need the
        leader's free seats either: while a reclaim is on its way, claims wait, or the
        record lists leases of a reclaimed member. Seats kept for claims are not free
        seats and stay kept; they no longer hold the others back for a whole lease
        TTL once nothing is left to claim (failover benchmark: the leader that had
        reclaimed the last leader's seats held every free seat when it was killed in
        turn).
        """
        now = self._clock.seconds()
        report = self._timings.status_report
        if (self._wants(feature, within=report) or self._to_keep.get(feature)
                or self._claims_waiting() or (self._kept_seats(feature) and self._unclaimed(feature))
                or self._record.unassigned(feature) > 0
                or now - self._evened_at.get(feature, float("-inf")) < report):
            return
        free = self._free_seats(feature)
        if len(free) < 2 or self.pledges.get(feature) or any(
                note.pledges.get(feature) for member, (_, note) in self._notes.items() if member in free):
            return
        donor = max(free, key=lambda m: (free[m], m == self._name, m))
        receiver = min(free, key=lambda m: (free[m], m != self._name, m))
        gap = free[donor] - free[receiver]
        if gap < 2 * MIN_EVEN_OUT or free[donor] <= 2 * free[receiver] + 1:
            return
        self._evened_at[feature] = now
        give = gap // 2
        log.debug("evening out free seats of {feature}: {donor} pledges {n} for {receiver}",
                  feature=feature, donor=donor, n=give, receiver=receiver)
        if donor == self._name:
            self.pledge(feature, give)
        else:
            self._network.send(donor, PledgeRequest(feature, give))

    def _granted(self, feature: str, member: str, seats: int) -> None:
        wanted = self._wanted.get(feature, {})
        if member in wanted:
            count, when = wanted[member]
            if count > seats:
                wanted[member] = (count - seats, when)
            else:
                del wanted[member]

    def _give_unassigned(self, feature: Any) -> None:
        """Hand free seats out, those that no member they were taken from can still be using.

        Seats reclaimed from a fenced member come to this leader, kept for claims.
        """
        name = feature.name
        free = self._givable(feature)
        if free <= 0:
            return
        keep, left = [], free
        for n, until in self._to_keep.pop(name, []):
            if until > self._clock.seconds() and left > 0:
                keep.append((min(n, left), until))
                left -= min(n, left)
        to = self._name if keep else self._receiver(name)
        share = self._record.allocation(name, to)
        d = self._change(name, {to: share + free}, {to: share})
        if keep:
            d.addCallback(lambda index: index is not None and self._keep(name, keep))
        else:
            self._granted(name, to, free)

    def _keep(self, feature: str, seats: list[tuple[int, float]]) -> None:
        if self._node.role == "leader":
            self._kept.setdefault(feature, []).extend(seats)
            self.set_allocations()

    def _move_pledges(self, feature: str) -> None:
        """Shrink a member that offered seats; they go out as unassigned seats once it settled.

        Giver first in two entries, not one: a receiver may apply an entry
        before the giver does, and a giver that restarted meanwhile has
        forgotten its offer. An offer counts only if its note was sent after
        the giver settled the last change of its allocation: an older one
        may be about an allocation that has since changed and changed back.
        """
        changed = self._record.changes.get(feature, {})
        pledged = {self._name: self.pledges.get(feature)}
        for member, (_, note) in self._notes.items():
            if note.last_applied >= changed.get(member, 0):
                pledged[member] = note.pledges.get(feature)
        for giver, pledge in pledged.items():
            if not pledge or pledge[1] <= 0 or self._record.allocation(feature, giver) != pledge[0]:
                continue
            base, seats = pledge
            self._change(feature, {giver: base - seats}, {giver: base})
            return

    def _ask_donors(self, feature: str) -> None:
        wanted = self._wants(feature)
        if not wanted:
            return
        now = self._clock.seconds()
        need = sum(wanted.values())
        reachable = self._node.reachable(self._timings.election_timeout)
        donors = sorted(
            ((self._record.allocation(feature, m) - self._record.used(feature, m), m)
             for m in self._members if m not in wanted and m in reachable),
            reverse=True,
        )
        for free, donor in donors:
            if free <= 0 or need <= 0:
                break
            key = (feature, donor)
            if now - self._asked.get(key, float("-inf")) < 2 * self._timings.peer_heartbeat:
                continue
            self._asked[key] = now
            give = min(free, need)
            if donor == self._name:
                self.pledge(feature, give)
            else:
                self._network.send(donor, PledgeRequest(feature, give))
            need -= give
