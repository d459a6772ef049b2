"""Raft for the pool's record, written sans-IO against a clock, a store and a network.

``RaftNode`` never touches a socket, a thread or the global reactor: time
comes from an injected ``IReactorTime``, randomness from a ``random.Random``,
durability from an ``ILicenseStore`` and messages go out through an
``IPeerNetwork`` and come in through ``receive``. The same code runs under
``twistd`` over AMP and inside the deterministic simulation in ``tests/sim``.

On top of textbook Raft (Ongaro and Ousterhout) it has pre-vote, check-quorum,
leader stickiness, snapshots sent in chunks, leadership transfer, a preferred
leader, and the clock readings the allocation fencing needs (leader lease and
follower allocation lease). docs/pool.md explains each and why.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import LeadershipTransferFailed, NotLeader
from ..records import LogEntry, Snapshot, StoredState
from .log import ENTRY_OVERHEAD, RaftLog, entry_cost
from .messages import (
    AppendEntries,
    AppendReply,
    InstallSnapshot,
    RequestVote,
    SnapshotReply,
    TimeoutNow,
    VoteReply,
)
from .progress import MAX_INFLIGHT, Progress
from .writes import DurableWrites

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from ..interfaces import ILicenseStore, IPeerNetwork, IRecordStateMachine

log = Logger()

FOLLOWER = "follower"
CANDIDATE = "candidate"
LEADER = "leader"

# AMP carries at most 65,535 bytes per value; a chunk plus its header fits.
MAX_SNAPSHOT_CHUNK = 32 * 1024


@dataclass(frozen=True)
class RaftTimings:
    """How fast the pool reacts; the defaults are the design's (docs/pool.md).

    ``election_timeout`` is the minimum: each wait is drawn uniformly from
    [t, 2t]. ``max_batch_bytes`` bounds the entries of one AppendEntries and
    so the largest entry ``propose`` accepts. ``snapshot_chunk_bytes`` may
    only be lowered (the simulation does, to exercise chunking).
    """

    heartbeat: float = 0.2
    election_timeout: float = 1.0
    snapshot_every: int = 1000
    max_batch_bytes: int = 48_000
    snapshot_chunk_bytes: int = MAX_SNAPSHOT_CHUNK
    clock_drift: float = 0.05
    preference_delay: float = 0.0
    """A new leader hands over to a preferred member only after leading this long,
    so a failover finishes (the pool reclaims a dead member's seats) before a
    handover makes the next leader start its own wait again."""

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat < self.election_timeout:
            raise ValueError("the heartbeat must be positive and shorter than the election timeout")
        if self.snapshot_every < 1:
            raise ValueError("snapshot_every must be at least 1")
        if self.max_batch_bytes <= ENTRY_OVERHEAD:
            raise ValueError(f"max_batch_bytes must be more than {ENTRY_OVERHEAD}")
        if not 0 < self.snapshot_chunk_bytes <= MAX_SNAPSHOT_CHUNK:
            raise ValueError(f"snapshot_chunk_bytes must be in 1..{MAX_SNAPSHOT_CHUNK}")


@dataclass
class _Transfer:
    """A leadership transfer under way, and everyone waiting for its outcome."""

    target: str
    term: int
    waiting: list[Deferred[None]]
    timeout_now_sent: bool = False


@dataclass
class _IncomingSnapshot:
    """A snapshot a follower is assembling from InstallSnapshot chunks."""

    key: tuple[int, int, int]  # (leader term, index, snapshot term)
    data: bytearray = field(default_factory=bytearray)


class RaftNode:
    """One member's Raft: election, replication, commit, snapshots, transfer.

    Read ``role``, ``term``, ``leader``, ``commit_index``, ``last_applied`` and
    ``last_log_index`` freely; change the node only through its methods.
    """

    def __init__(
        self,
        name: str,
        members: Sequence[str],
        store: ILicenseStore,
        clock: IReactorTime,
        rng: random.Random,
        network: IPeerNetwork,
        state_machine: IRecordStateMachine,
        timings: RaftTimings,
        preference: Mapping[str, int] | None = None,
    ) -> None:
        self.name = name
        self.members = tuple(dict.fromkeys(members))
        if name not in self.members:
            raise ValueError(f"{name!r} is not one of the members {self.members}")
        self._peers = tuple(member for member in self.members if member != name)
        self._quorum = len(self.members) // 2 + 1
        self._store = store
        self._clock = clock
        self._rng = rng
        self._network = network
        self._state_machine = state_machine
        self._timings = timings
        self._preference = dict(preference) if preference else None
        self.hold_handover: Callable[[], bool] = lambda: False
        """While this says true, a leader keeps leadership from a preferred member:
        the pool holds it while seats reclaimed from a failed member wait for its
        clients' claims, which a new leader would make wait for another reclaim."""

        self.role = FOLLOWER
        self.term = 0
        self.voted_for: str | None = None
        self.leader: str | None = None
        self.commit_index = 0
        self.last_applied = 0
        self._log = RaftLog()
        self._snapshot: Snapshot | None = None
        self._writes = DurableWrites(self._store_failed)

        self._started = False
        self._running = False
        self._stopped = False
        self._timers: dict[str, IDelayedCall] = {}
        self._observers: list[Callable[[str, int, str | None], None]] = []
        self._notified = (self.role, self.term, self.leader)

        self._last_contact: dict[str, float] = {}
        # Votes and pre-votes are refused until then: we heard from a live leader.
        self._no_vote_until = float("-inf")
        # Follower: the time of ours the current leader has confirmed (messages.py).
        self._lease_from: float | None = None
        self.leader_commit = 0
        """Follower: the highest commit index the current leader has told us.

        The pool lets a follower act on its allocation only once it has
        applied this far, so an entry that shrank its allocation is in effect
        before a lease confirmed after that entry's commit is used."""
        self._applied_by: dict[str, int] = {}
        self._prevoting = False
        self._votes: set[str] = set()
        self._vote_times: dict[str, float] = {}
        self._incoming: _IncomingSnapshot | None = None

        # Leader state.
        self._progress: dict[str, Progress] = {}
        self._pending: dict[int, tuple[int, Deferred[int]]] = {}
        self._durable_index = 0
        self._leader_since = 0.0
        self._transfer: _Transfer | None = None

        self._handlers: dict[type, Callable[[str, object], None]] = {
            RequestVote: self._on_request_vote,  # type: ignore[dict-item]
            VoteReply: self._on_vote_reply,  # type: ignore[dict-item]
            AppendEntries: self._on_append_entries,  # type: ignore[dict-item]
            AppendReply: self._on_append_reply,  # type: ignore[dict-item]
            InstallSnapshot: self._on_install_snapshot,  # type: ignore[dict-item]
            SnapshotReply: self._on_snapshot_reply,  # type: ignore[dict-item]
            TimeoutNow: self._on_timeout_now,  # type: ignore[dict-item]
        }

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Load term, vote, snapshot and log from the store, then take part.

        Fires once the node runs. A pool of one elects itself at once; others
        wait an election timeout for a leader first.
        """
        if self._started:
            raise RuntimeError("a RaftNode starts once; make a new one to restart")
        self._started = True
        loading = self._store.load()
        loading.addCallback(self._loaded)
        return loading

    def _loaded(self, state: StoredState) -> None:
        if self._stopped:
            return
        self.term = state.term
        self.voted_for = state.voted_for
        if state.snapshot is not None:
            snapshot = state.snapshot
            self._state_machine.restore(snapshot.data)
            self._snapshot = snapshot
            self._log = RaftLog(snapshot.index, snapshot.term)
            self.commit_index = self.last_applied = snapshot.index
        self._log.append(entry for entry in state.log if entry.index > self._log.snapshot_index)
        self._running = True
        # We may have promised a leader, before a crash, not to vote for a while.
        self._no_vote_until = self._clock.seconds() + self._timings.election_timeout
        self._notify()
        if self._quorum == 1:
            self._start_prevote()
        else:
            self._reset_election_timer()

    def stop(self) -> None:
        """Cancel every timer and ignore every message from now on.

        Waiting proposals fail with NotLeader and a transfer under way fails;
        what is in the store stays, for a new node to start from.
        """
        if self._stopped:
            return
        self._stopped = True
        self._running = False
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()
        self._fail_proposals(NotLeader(None, "this member stopped"))
        self._finish_transfer(LeadershipTransferFailed("this member stopped"))

    def _store_failed(self, failure: Failure) -> None:
        log.failure(
            "a store write failed; {name} leaves the pool until restarted",
            failure,
            name=self.name,
        )
        if self._running:
            if self.role != FOLLOWER or self.leader is not None:
                self.role = FOLLOWER
                self.leader = None
                self._notify()
            self.stop()

    # -- what others read ---------------------------------------------------

    @property
    def last_log_index(self) -> int:
        """The index of the last entry in this member's log (committed or not)."""
        return self._log.last_index

    def add_role_observer(self, observer: Callable[[str, int, str | None], None]) -> None:
        """Call ``observer(role, term, leader)`` whenever any of the three changes."""
        self._observers.append(observer)

    def last_contact(self) -> dict[str, float]:
        """Peer -> our clock when we last received any valid message from it."""
        return dict(self._last_contact)

    def reachable(self, within: float) -> set[str]:
        """The members heard from within ``within`` seconds, and ourselves."""
        now = self._clock.seconds()
        heard = {peer for peer, when in self._last_contact.items() if now - when <= within}
        return heard | {self.name}

    def leader_contact_age(self) -> float | None:
        """Follower: seconds since the current leader last confirmed contact; else None.

        The age is measured from the send time (our clock) of a reply of ours
        that the leader received and then answered, not from when we last
        received something: a message can be delayed for any time, and a
        one-way partition can let us hear the leader while it cannot hear
        us. Measured this way, an allocation lease of L that a follower runs
        from here ends before the leader's ``acked_within(follower) + L`` (up
        to clock drift), which is what fencing needs. None until the first
        such round trip with a new leader (two heartbeats), and for leaders
        and candidates.
        """
        if self.role != FOLLOWER or self.leader is None or self._lease_from is None:
            return None
        return self._clock.seconds() - self._lease_from

    def known_applied(self, member: str) -> int:
        """An index ``member`` has surely applied: the highest commit index it
        sent us while it led (0 if it never did, since this node started).

        A leader applies each entry as it commits it, before it sends the
        new commit index, so the commit it sends is at most what it applied.
        A new leader has no status notes yet from the member it replaced;
        this tells it that member had applied the entries that shrank its
        allocation, so moving those seats need not wait for it to be fenced.
        """
        return self._applied_by.get(member, 0)

    def acked_within(self, peer: str) -> float | None:
        """Leader: our clock when we sent the latest message ``peer`` acknowledged."""
        if self.role != LEADER:
            return None
        progress = self._progress.get(peer)
        return progress.acked if progress is not None else None

    def majority_acked_since(self) -> float | None:
        """Leader: the send time t such that a majority acknowledged messages sent at or after t.

        We count as acknowledging now. Followers that acknowledged refuse
        votes for an election timeout after receiving, so no other leader
        can exist before t + election_timeout * (1 - d) / (1 + d) on our clock,
        with d the clock drift bound: the leader lease. None once a
        TimeoutNow has been sent, since a transfer election skips that rule.
        """
        if self.role != LEADER or (self._transfer is not None and self._transfer.timeout_now_sent):
            return None
        others = self._quorum - 1
        if others == 0:
            return self._clock.seconds()
        acked = sorted(
            (progress.acked for progress in self._progress.values() if progress.acked is not None),
            reverse=True,
        )
        return acked[others - 1] if len(acked) >= others else None

    def leader_lease_valid(self) -> bool:
        """Leader: no other leader can have been elected yet (see majority_acked_since)."""
        since = self.majority_acked_since()
        if since is None:
            return False
        d = self._timings.clock_drift
        return self._clock.seconds() - since < self._timings.election_timeout * (1 - d) / (1 + d)

    # -- proposals and transfer ---------------------------------------------

    def propose(self, data: bytes) -> Deferred[int]:
        """Leader: append ``data`` and replicate it.

        Fires with its index once it is committed and applied here. Fails
        with NotLeader if this member is not the leader, is handing over
        leadership, or loses leadership before the entry commits (the entry
        may still commit under the next leader), and with ValueError if
        ``data`` is empty or larger than one AppendEntries may carry.
        """
        if not self._running or self.role != LEADER or self._transfer is not None:
            return fail(NotLeader(self.leader if self.leader != self.name else None))
        if not isinstance(data, bytes) or not data:
            return fail(ValueError("an entry's data must be non-empty bytes"))
        entry = LogEntry(self._log.last_index + 1, self.term, data)
        if entry_cost(entry) > self._timings.max_batch_bytes:
            return fail(ValueError(f"an entry may hold at most "
                                   f"{self._timings.max_batch_bytes - ENTRY_OVERHEAD} bytes"))
        proposed: Deferred[int] = Deferred()
        # Registered first: with a store that fires at once and a pool of
        # one, appending commits and applies before _append_local returns.
        self._pending[entry.index] = (self.term, proposed)
        self._append_local([entry])
        self._schedule_flush()
        return proposed

    def transfer_leadership(self, to: str) -> Deferred[None]:
        """Leader: hand leadership to ``to``; fires once ``to`` leads.

        Proposals are refused meanwhile. ``to`` is first brought up to date,
        then told to stand at once (TimeoutNow). Fails with
        LeadershipTransferFailed if ``to`` has not taken over within an
        election timeout, NotLeader if we are not the leader.
        """
        if not self._running or self.role != LEADER:
            return fail(NotLeader(self.leader))
        if to == self.name:
            return succeed(None)
        if to not in self._peers:
            return fail(ValueError(f"{to!r} is not a member of the pool"))
        done: Deferred[None] = Deferred()
        if self._transfer is not None:
            if self._transfer.target != to:
                return fail(LeadershipTransferFailed(
                    f"a transfer to {self._transfer.target} is under way"))
            self._transfer.waiting.append(done)
            return done
        self._transfer = _Transfer(to, self.term, [done])
        self._schedule("transfer", self._timings.election_timeout, self._transfer_timed_out)
        self._check_transfer_ready(to)
        self._replicate(to)
        return done

    # -- incoming messages --------------------------------------------------

    def receive(self, sender: str, message: object) -> None:
        """Handle one message from the member ``sender`` (the transport vouches for it)."""
        if not self._running or sender not in self._peers:
            return
        self._last_contact[sender] = self._clock.seconds()
        handler = self._handlers.get(type(message))
        if handler is None:
            log.warn("ignoring a {kind} from {sender}", kind=type(message).__name__, sender=sender)
            return
        handler(sender, message)

    def _on_request_vote(self, sender: str, request: RequestVote) -> None:
        now = self._clock.seconds()
        up_to_date = (request.last_log_term, request.last_log_index) >= (
            self._log.last_term,
            self._log.last_index,
        )
        # Leader stickiness: while a leader is alive, nobody may unseat it
        # except through a transfer it started itself.
        sticky = not request.transfer and (self.role == LEADER or now < self._no_vote_until)
        if request.pre_vote:
            granted = request.term > self.term and up_to_date and not sticky
            reply_term = request.term if granted else self.term
            self._send(sender, VoteReply(reply_term, granted, True, now))
            return
        if request.term < self.term or sticky:
            # A sticky refusal does not adopt the candidate's term either.
            self._send(sender, VoteReply(self.term, False, False, now))
            return
        if request.term > self.term:
            self._become_follower(request.term, None)
        granted = self.voted_for in (None, sender) and up_to_date
        if granted:
            self.voted_for = sender
            self._persist_term()
            self._reset_election_timer()
        self._send(sender, VoteReply(self.term, granted, False, now))

    def _on_vote_reply(self, sender: str, reply: VoteReply) -> None:
        if reply.pre_vote:
            if reply.granted:
                if self._prevoting and reply.term == self.term + 1:
                    self._votes.add(sender)
                    if len(self._votes) >= self._quorum:
                        self._start_election(transfer=False)
            elif reply.term > self.term:
                self._become_follower(reply.term, None)
            return
        if reply.term > self.term:
            self._become_follower(reply.term, None)
            return
        if self.role != CANDIDATE or reply.term != self.term or not reply.granted:
            return
        self._votes.add(sender)
        self._vote_times[sender] = reply.time
        if len(self._votes) >= self._quorum:
            self._become_leader()

    def _on_append_entries(self, sender: str, request: AppendEntries) -> None:
        now = self._clock.seconds()

        def refuse(conflict_index: int, conflict_term: int) -> None:
            self._send(sender, AppendReply(self.term, False, 0, conflict_index, conflict_term,
                                           request.sent_at, request.peer_time, now))

        if request.term < self.term:
            # Tell a deposed leader (or one cut off while we moved on) our term.
            refuse(0, 0)
            return
        if not _terms_consistent(request):
            log.warn("ignoring malformed AppendEntries from {sender}", sender=sender)
            return
        if not self._accept_leader(sender, request.term):
            return
        self._note_lease(request.lease_from)
        self.leader_commit = max(self.leader_commit, request.commit)
        if request.commit > self._applied_by.get(sender, 0):
            self._applied_by[sender] = request.commit
        entries = request.entries
        prev_index = request.prev_index
        last_new = request.prev_index + len(request.entries)
        if prev_index < self._log.snapshot_index:
            # The snapshot holds committed entries, which match the leader's.
            entries = entries[self._log.snapshot_index - prev_index :]
        elif prev_index > self._log.last_index:
            refuse(self._log.last_index + 1, 0)
            return
        elif self._log.term_at(prev_index) != request.prev_term:
            conflict_term = self._log.term_at(prev_index) or 0
            refuse(self._log.first_index_of_term(prev_index), conflict_term)
            return
        if not self._store_entries(entries):
            return
        new_commit = min(request.commit, self._vouched_end(request.term, last_new))
        if new_commit > self.commit_index:
            self.commit_index = new_commit
            self._apply_committed()
        match = max(last_new, self._log.snapshot_index)
        self._send(sender, AppendReply(self.term, True, match, 0, 0,
                                       request.sent_at, request.peer_time, now))

    def _vouched_end(self, term: int, last_new: int) -> int:
        """The last index of ours that this AppendEntries vouches for.

        Raft commits up to the last entry of the message at most. But entries
        we already hold from the sender's own term are the leader's entries
        too (a leader never rewrites its term's entries, and log matching
        holds below them), so they count: a heartbeat sent while our
        acknowledgement of its last batch was in flight carries a commit
        index beyond its (empty) entries, and the pool lets a follower act
        only once it applied the commit the leader last told it. Without
        this, followers under steady load answered NoQuorum between batches.
        """
        last = self._log.last_index
        if last > last_new and self._log.term_at(last) == term:
            return last
        return last_new

    def _on_append_reply(self, sender: str, reply: AppendReply) -> None:
        if reply.term > self.term:
            self._become_follower(reply.term, None)
            return
        if self.role != LEADER or reply.term != self.term:
            return
        progress = self._progress[sender]
        progress.note_reply(reply.sent_at, reply.time, reply.peer_time)
        if reply.success:
            self._matched(sender, progress, min(reply.match_index, self._log.last_index))
            return
        if progress.snapshot is not None:
            return
        next_index = reply.conflict_index
        if reply.conflict_term:
            ours = self._log.last_index_of_term(reply.conflict_term)
            if ours is not None:
                next_index = ours + 1
        next_index = max(progress.match_index + 1, min(next_index, self._log.last_index + 1))
        moved = next_index < progress.next_index or not progress.probing
        progress.probing = True
        progress.inflight = 0
        progress.next_index = next_index
        # Probe again at once only if this refusal taught us something: a
        # duplicated or stale refusal must not multiply messages (the next
        # heartbeat retries anyway).
        if moved:
            self._replicate(sender, probe=True)

    def _on_install_snapshot(self, sender: str, request: InstallSnapshot) -> None:
        now = self._clock.seconds()

        def answer(received: int, installed: bool) -> None:
            self._send(sender, SnapshotReply(self.term, request.index, received, installed,
                                             request.sent_at, request.peer_time, now))

        if request.term < self.term:
            answer(0, False)
            return
        if request.snapshot_term > request.term or request.index == 0:
            log.warn("ignoring malformed InstallSnapshot from {sender}", sender=sender)
            return
        if not self._accept_leader(sender, request.term):
            return
        self._note_lease(request.lease_from)
        if request.index <= self.commit_index:
            # We already hold everything it covers (committed entries match).
            answer(0, True)
            return
        key = (request.term, request.index, request.snapshot_term)
        incoming = self._incoming
        if request.offset == 0:
            incoming = self._incoming = _IncomingSnapshot(key)
        elif incoming is None or incoming.key != key or request.offset != len(incoming.data):
            held = len(incoming.data) if incoming is not None and incoming.key == key else 0
            answer(held, False)
            return
        incoming.data += request.data
        if not request.done:
            answer(len(incoming.data), False)
            return
        self._incoming = None
        self._install_snapshot(Snapshot(request.index, request.snapshot_term, bytes(incoming.data)))
        answer(len(incoming.data), True)

    def _on_snapshot_reply(self, sender: str, reply: SnapshotReply) -> None:
        if reply.term > self.term:
            self._become_follower(reply.term, None)
            return
        if self.role != LEADER or reply.term != self.term:
            return
        progress = self._progress[sender]
        progress.note_reply(reply.sent_at, reply.time, reply.peer_time)
        snapshot = progress.snapshot
        if reply.installed:
            self._matched(sender, progress, min(reply.index, self._log.last_index))
        elif snapshot is not None and reply.index == snapshot.index:
            # Resume where the follower stands (from the start if it lost
            # track). Only progress sends the next chunk at once: duplicated
            # or stale replies wait for the heartbeat, so they cannot
            # multiply chunks.
            received = reply.received if reply.received < len(snapshot.data) else 0
            advanced = received > progress.snapshot_offset
            progress.snapshot_offset = received
            if advanced:
                self._send_snapshot_chunk(sender, progress)

    def _on_timeout_now(self, sender: str, request: TimeoutNow) -> None:
        if request.term == self.term and self.role == FOLLOWER and self.leader == sender:
            self._start_election(transfer=True)

    # -- follower side ------------------------------------------------------

    def _accept_leader(self, sender: str, term: int) -> bool:
        """A message from the leader of ``term`` (not older than ours) arrived."""
        if self.role == LEADER and term == self.term:
            log.error("{sender} claims to lead term {term}, which we lead", sender=sender, term=term)
            return False
        if term > self.term or self.role != FOLLOWER or self.leader != sender:
            self._become_follower(term, sender)
        else:
            self._reset_election_timer()
        self._no_vote_until = self._clock.seconds() + self._timings.election_timeout
        return True

    def _note_lease(self, lease_from: float | None) -> None:
        if lease_from is not None and (self._lease_from is None or lease_from > self._lease_from):
            self._lease_from = lease_from

    def _store_entries(self, entries: Sequence[LogEntry]) -> bool:
        """Make our log hold ``entries`` (which follow a matching prefix); False on a bug."""
        for position, entry in enumerate(entries):
            ours = self._log.term_at(entry.index)
            if ours == entry.term:
                continue
            if ours is not None:
                if entry.index <= self.commit_index:
                    log.error("the leader contradicts committed entry {index}", index=entry.index)
                    return False
                self._log.truncate_from(entry.index)
                self._writes.issue(self._store.truncate_log(entry.index))
            new = list(entries[position:])
            self._log.append(new)
            self._writes.issue(self._store.append_entries(new))
            break
        return True

    def _install_snapshot(self, snapshot: Snapshot) -> None:
        keeps_suffix = self._log.term_at(snapshot.index) == snapshot.term
        # Snapshot first: a crash in between leaves entries we had, never a hole.
        self._writes.issue(self._store.save_snapshot(snapshot))
        if keeps_suffix:
            self._log.compact_to(snapshot.index, snapshot.term)
        else:
            self._log.reset(snapshot.index, snapshot.term)
            self._writes.issue(self._store.truncate_log(snapshot.index + 1))
        self._snapshot = snapshot
        self._state_machine.restore(snapshot.data)
        self.commit_index = max(self.commit_index, snapshot.index)
        self.last_applied = snapshot.index
        self._apply_committed()

    # -- elections ----------------------------------------------------------

    def _election_timeout(self) -> None:
        if self.role != LEADER:
            self._start_prevote()

    def _start_prevote(self) -> None:
        """Ask whether we could win, without moving to a new term (no term inflation)."""
        if self.role != FOLLOWER or self.leader is not None:
            self._become_follower(self.term, None)
        self._prevoting = True
        self._votes = {self.name}
        self._reset_election_timer()
        if len(self._votes) >= self._quorum:
            self._start_election(transfer=False)
            return
        request = RequestVote(self.term + 1, self._log.last_index, self._log.last_term, pre_vote=True)
        for peer in self._peers:
            self._send(peer, request)

    def _start_election(self, transfer: bool) -> None:
        self._prevoting = False
        self.term += 1
        self.voted_for = self.name
        self._persist_term()
        self.role = CANDIDATE
        self.leader = None
        self._lease_from = None
        self._votes = {self.name}
        self._vote_times = {}
        self._reset_election_timer()
        self._notify()
        if len(self._votes) >= self._quorum:
            self._become_leader()
            return
        request = RequestVote(self.term, self._log.last_index, self._log.last_term,
                              transfer=transfer)
        for peer in self._peers:
            self._send(peer, request)

    def _become_follower(self, term: int, leader: str | None) -> None:
        """Follow ``leader`` (None: unknown) in ``term``, which is not older than ours."""
        if term > self.term:
            self.term = term
            self.voted_for = None
            self._persist_term()
            self._lease_from = None
        if leader != self.leader:
            self._lease_from = None
            self.leader_commit = 0
        if self.role == LEADER:
            self._stop_leading(leader)
        self.role = FOLLOWER
        self.leader = leader
        self._prevoting = False
        self._votes = set()
        self._reset_election_timer()
        self._notify()

    def _reset_election_timer(self) -> None:
        timeout = self._timings.election_timeout
        self._schedule("election", self._rng.uniform(timeout, 2 * timeout), self._election_timeout)

    # -- leading ------------------------------------------------------------

    def _become_leader(self) -> None:
        self.role = LEADER
        self.leader = self.name
        self._prevoting = False
        self._cancel("election")
        self._leader_since = self._clock.seconds()
        self._durable_index = 0
        next_index = self._log.last_index + 1
        self._progress = {peer: Progress(next_index) for peer in self._peers}
        for peer, when in self._vote_times.items():
            self._progress[peer].peer_time = when
        # A no-op of our term lets us commit what earlier leaders left behind.
        self._append_local([LogEntry(next_index, self.term, b"")])
        self._heartbeat()
        if self._preference is not None:
            self._schedule("preference", self._timings.election_timeout, self._preference_tick)
        self._notify()

    def _stop_leading(self, leader: str | None) -> None:
        for name in ("heartbeat", "preference", "flush"):
            self._cancel(name)
        self._progress = {}
        self._fail_proposals(NotLeader(leader, "leadership was lost before the entry committed"))

    def _fail_proposals(self, error: NotLeader) -> None:
        pending, self._pending = self._pending, {}
        for _, proposed in pending.values():
            proposed.errback(error)

    def _heartbeat(self) -> None:
        if self.role != LEADER:
            return
        if self._lost_quorum():
            log.info("{name} stepping down: no majority heard within an election timeout",
                     name=self.name)
            self._become_follower(self.term, None)
            return
        for peer in self._peers:
            self._replicate(peer, heartbeat=True)
        self._schedule("heartbeat", self._timings.heartbeat, self._heartbeat)

    def _lost_quorum(self) -> bool:
        """Check-quorum: has a majority been silent for a whole election timeout?"""
        now = self._clock.seconds()
        window = self._timings.election_timeout
        if now - self._leader_since < window:
            return False
        heard = sum(1 for peer in self._peers
                    if now - self._last_contact.get(peer, float("-inf")) <= window)
        return heard + 1 < self._quorum

    def _append_local(self, entries: list[LogEntry]) -> None:
        self._log.append(entries)
        self._writes.issue(self._store.append_entries(entries))
        last, term = entries[-1].index, self.term
        self._writes.after(lambda: self._local_durable(last, term))

    def _local_durable(self, index: int, term: int) -> None:
        if self._running and self.role == LEADER and self.term == term:
            self._durable_index = max(self._durable_index, index)
            self._advance_commit()

    def _matched(self, peer: str, progress: Progress, match: int) -> None:
        """``peer`` holds our log up to ``match``: move on, commit, keep sending."""
        progress.match_index = max(progress.match_index, match)
        progress.next_index = max(progress.next_index, progress.match_index + 1)
        if progress.snapshot is not None:
            if progress.match_index < progress.snapshot.index:
                return
            progress.snapshot = None
        if progress.probing:
            progress.probing = False
            progress.inflight = 0
        else:
            progress.inflight = max(0, progress.inflight - 1)
        self._advance_commit()
        if self.role == LEADER:
            self._check_transfer_ready(peer)
            self._replicate(peer)

    def _advance_commit(self) -> None:
        """Commit the highest entry of our term that a majority holds (and all before it)."""
        matches = sorted([self._durable_index, *(p.match_index for p in self._progress.values())],
                         reverse=True)
        candidate = matches[self._quorum - 1]
        if candidate > self.commit_index and self._log.term_at(candidate) == self.term:
            self.commit_index = candidate
            self._schedule_flush()
            self._apply_committed()

    def _schedule_flush(self) -> None:
        """Send new entries and commits soon, once per reactor turn rather than per change."""
        if "flush" not in self._timers:
            self._schedule("flush", 0, self._flush)

    def _flush(self) -> None:
        if self.role != LEADER:
            return
        for peer, progress in self._progress.items():
            if progress.probing or progress.snapshot is not None:
                continue
            if progress.next_index <= self._log.last_index:
                self._replicate(peer)
            elif (progress.commit_sent < self.commit_index
                  and progress.match_index >= self._log.snapshot_index):
                self._send_append(peer, progress, progress.match_index, ())

    def _replicate(self, peer: str, heartbeat: bool = False, probe: bool = False) -> None:
        """Send ``peer`` what it lacks: entries, a snapshot chunk, or (heartbeat) nothing new.

        Outside heartbeats and probes, only a follower in step gets entries,
        and only while few batches are unacknowledged.
        """
        progress = self._progress[peer]
        if progress.snapshot is not None:
            if heartbeat:
                self._send_snapshot_chunk(peer, progress)
            return
        if heartbeat and not progress.probing:
            # Resend whatever has not been acknowledged.
            progress.next_index = progress.match_index + 1
            progress.inflight = 0
        elif not heartbeat and not probe and (progress.probing
                                              or progress.inflight >= MAX_INFLIGHT):
            return
        if progress.next_index <= self._log.snapshot_index:
            progress.snapshot = self._snapshot
            progress.snapshot_offset = 0
            self._send_snapshot_chunk(peer, progress)
            return
        entries: tuple[LogEntry, ...] = ()
        if progress.next_index <= self._log.last_index:
            entries = self._log.entries_from(progress.next_index, self._timings.max_batch_bytes)
        if not entries and not heartbeat and not probe:
            return
        prev_index = progress.next_index - 1
        if entries and not progress.probing:
            progress.next_index = entries[-1].index + 1
            progress.inflight += 1
        self._send_append(peer, progress, prev_index, entries)

    def _send_append(self, peer: str, progress: Progress, prev_index: int,
                     entries: tuple[LogEntry, ...]) -> None:
        prev_term = self._log.term_at(prev_index)
        assert prev_term is not None, "replication below the snapshot"
        progress.commit_sent = self.commit_index
        # Confirm allocation leases only while no other leader can exist: a
        # deposed leader that still reaches a follower must not keep it
        # acting after a new leader has started counting towards reclaiming.
        lease_from = progress.lease_from if self.leader_lease_valid() else None
        self._send(peer, AppendEntries(self.term, prev_index, prev_term, entries,
                                       self.commit_index, self._clock.seconds(),
                                       progress.peer_time, lease_from))

    def _send_snapshot_chunk(self, peer: str, progress: Progress) -> None:
        snapshot = progress.snapshot
        assert snapshot is not None
        offset = progress.snapshot_offset
        chunk = snapshot.data[offset : offset + self._timings.snapshot_chunk_bytes]
        done = offset + len(chunk) >= len(snapshot.data)
        self._send(peer, InstallSnapshot(self.term, snapshot.index, snapshot.term, offset, chunk,
                                         done, self._clock.seconds(),
                                         progress.peer_time, progress.lease_from))

    # -- transfer and preference ----------------------------------------------

    def _check_transfer_ready(self, peer: str) -> None:
        transfer = self._transfer
        if (transfer is None or transfer.target != peer or transfer.timeout_now_sent
                or self.role != LEADER):
            return
        if self._progress[peer].match_index >= self._log.last_index:
            transfer.timeout_now_sent = True
            self._send(peer, TimeoutNow(self.term))

    def _transfer_timed_out(self) -> None:
        transfer = self._transfer
        if transfer is None:
            return
        self._finish_transfer(LeadershipTransferFailed(
            f"{transfer.target} did not take over within an election timeout"))
        if self.role == LEADER and self.term == transfer.term and transfer.timeout_now_sent:
            # A TimeoutNow still in flight may yet start an election that skips
            # stickiness, so our lease is void: let a fresh election decide.
            self._become_follower(self.term, None)

    def _finish_transfer(self, error: Exception | None) -> None:
        transfer, self._transfer = self._transfer, None
        if transfer is None:
            return
        self._cancel("transfer")
        for waiting in transfer.waiting:
            if error is None:
                waiting.callback(None)
            else:
                waiting.errback(error)

    def _settle_transfer(self) -> None:
        transfer = self._transfer
        if transfer is None:
            return
        if self.leader == transfer.target:
            self._finish_transfer(None)
        elif self.leader is not None and (self.leader != self.name or self.term != transfer.term):
            self._finish_transfer(LeadershipTransferFailed(
                f"{self.leader} leads term {self.term} instead of {transfer.target}"))

    def _preference_tick(self) -> None:
        """Hand over to a preferred member that is up and caught up (as Sentinel does)."""
        if self.role != LEADER:
            return
        self._schedule("preference", self._timings.election_timeout, self._preference_tick)
        if self._clock.seconds() - self._leader_since < self._timings.preference_delay:
            return
        if self.hold_handover():
            return
        target = self._preferred_successor()
        if target is None or self._transfer is not None:
            return
        log.info("{name} hands leadership to preferred member {target}",
                 name=self.name, target=target)
        self.transfer_leadership(target).addErrback(
            lambda failure: log.info("transfer to {target} failed: {why}",
                                     target=target, why=failure.getErrorMessage()))

    def _preferred_successor(self) -> str | None:
        assert self._preference is not None
        infinity = float("inf")
        ours = self._preference.get(self.name, infinity)
        now = self._clock.seconds()
        window = self._timings.election_timeout
        candidates = [
            (self._preference[peer], peer)
            for peer in self._peers
            if self._preference.get(peer, infinity) < ours
            and now - self._last_contact.get(peer, -infinity) <= window
            and self._progress[peer].match_index >= self._log.last_index
        ]
        return min(candidates)[1] if candidates else None

    # -- applying, snapshots, persistence -----------------------------------

    def _apply_committed(self) -> None:
        settled: list[tuple[Deferred[int], bool, int]] = []
        while self.last_applied < self.commit_index and self._running:
            index = self.last_applied + 1
            entry = self._log.entry(index)
            if entry.data:
                self._state_machine.apply(index, entry.data)
            self.last_applied = index
            waiting = self._pending.pop(index, None)
            if waiting is not None:
                settled.append((waiting[1], waiting[0] == entry.term, index))
        self._maybe_snapshot()
        for proposed, ours, index in settled:
            if ours:
                proposed.callback(index)
            else:
                proposed.errback(NotLeader(self.leader))

    def _maybe_snapshot(self) -> None:
        if self.last_applied - self._log.snapshot_index < self._timings.snapshot_every:
            return
        term = self._log.term_at(self.last_applied)
        assert term is not None
        snapshot = Snapshot(self.last_applied, term, self._state_machine.snapshot())
        self._writes.issue(self._store.save_snapshot(snapshot))
        self._log.compact_to(snapshot.index, snapshot.term)
        self._snapshot = snapshot

    def _persist_term(self) -> None:
        self._writes.issue(self._store.save_term(self.term, self.voted_for))

    def _send(self, to: str, message: object) -> None:
        """Send once every store write issued so far is durable: what we say is on disk."""
        self._writes.after(lambda: self._running and self._network.send(to, message))

    # -- timers and observers ---------------------------------------------------

    def _schedule(self, name: str, delay: float, action: Callable[[], None]) -> None:
        self._cancel(name)

        def fire() -> None:
            self._timers.pop(name, None)
            if self._running:
                action()

        self._timers[name] = self._clock.callLater(delay, fire)

    def _cancel(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _notify(self) -> None:
        state = (self.role, self.term, self.leader)
        if state == self._notified:
            return
        self._notified = state
        self._settle_transfer()
        for observer in list(self._observers):
            try:
                observer(*state)
            except Exception:
                log.failure("a role observer of {name} failed", name=self.name)


def _terms_consistent(request: AppendEntries) -> bool:
    """Entries' terms never go down and never pass the leader's term."""
    previous = request.prev_term
    for entry in request.entries:
        if entry.term < previous:
            return False
        previous = entry.term
    return previous <= request.term
