"""RaftNode, one rule at a time, on a task.Clock and a network the test delivers by hand."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterable

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from licensing.errors import LeadershipTransferFailed, NotLeader
from licensing.interfaces import ILicenseStore, IPeerNetwork
from licensing.pool.messages import (
    AppendEntries,
    AppendReply,
    InstallSnapshot,
    RequestVote,
    SnapshotReply,
    VoteReply,
)
from licensing.pool.raft import CANDIDATE, FOLLOWER, LEADER, RaftNode, RaftTimings
from licensing.records import InstalledLicense, Lease, LogEntry, Snapshot, StoredState
from licensing.store.memory import MemoryStore
from tests.sim.machine import LedgerMachine, LicenseCell

NAMES = ("a", "b", "c")


@implementer(IPeerNetwork)
class _Endpoint:
    def __init__(self, wire: Wire, name: str) -> None:
        self.wire = wire
        self.name = name

    def send(self, to: str, message: object) -> None:
        self.wire.queue.append((self.name, to, message))
        self.wire.log.append((self.name, to, message))
        self.wire.sent[type(message).__name__] += 1


class Wire:
    """Messages wait in ``queue`` until ``deliver``; ``blocked`` links drop them."""

    def __init__(self) -> None:
        self.queue: list[tuple[str, str, object]] = []
        self.nodes: dict[str, RaftNode] = {}
        self.blocked: set[tuple[str, str]] = set()
        self.sent: Counter[str] = Counter()
        self.log: list[tuple[str, str, object]] = []

    def endpoint(self, name: str) -> IPeerNetwork:
        return _Endpoint(self, name)

    def deliver(self) -> None:
        """Deliver until nothing is left (messages sent meanwhile included)."""
        for _ in range(1000):
            if not self.queue:
                return
            batch, self.queue = self.queue, []
            for source, destination, message in batch:
                node = self.nodes.get(destination)
                if node is not None and (source, destination) not in self.blocked:
                    node.receive(source, message)
        raise AssertionError("messages never stopped flowing")

    def cut(self, one: str, others: Iterable[str]) -> None:
        for other in others:
            self.blocked |= {(one, other), (other, one)}

    def taken(self, kind: type) -> list[tuple[str, str, object]]:
        """Remove and return the queued messages of one kind."""
        taken = [item for item in self.queue if isinstance(item[2], kind)]
        self.queue = [item for item in self.queue if not isinstance(item[2], kind)]
        return taken


@implementer(ILicenseStore)
class HeldStore:
    """A MemoryStore whose writes wait (in order) until ``release``: a slow disk."""

    durable = False

    def __init__(self, inner: MemoryStore | None = None) -> None:
        self.inner = inner or MemoryStore()
        self.held: list[tuple[Callable[[], object], Deferred[None]]] = []

    def release(self) -> None:
        held, self.held = self.held, []
        for write, done in held:
            write()
            done.callback(None)

    def _hold(self, write: Callable[[], object]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.held.append((write, done))
        return done

    def load(self) -> Deferred[StoredState]:
        return self.inner.load()

    def save_term(self, term: int, voted_for: str | None) -> Deferred[None]:
        return self._hold(lambda: self.inner.save_term(term, voted_for))

    def append_entries(self, entries: list[LogEntry]) -> Deferred[None]:
        return self._hold(lambda: self.inner.append_entries(entries))

    def truncate_log(self, from_index: int) -> Deferred[None]:
        return self._hold(lambda: self.inner.truncate_log(from_index))

    def save_snapshot(self, snapshot: Snapshot) -> Deferred[None]:
        return self._hold(lambda: self.inner.save_snapshot(snapshot))

    def save_license(self, license: InstalledLicense) -> Deferred[None]:
        return self._hold(lambda: self.inner.save_license(license))

    def put_leases(self, leases: list[Lease]) -> Deferred[None]:
        return self._hold(lambda: self.inner.put_leases(leases))

    def remove_leases(self, lease_ids: list[str]) -> Deferred[None]:
        return self._hold(lambda: self.inner.remove_leases(lease_ids))

    def close(self) -> Deferred[None]:
        return self.inner.close()


class Pool:
    """Members on one Clock and one Wire, each with a store that outlives its crashes."""

    def __init__(self, names: Iterable[str] = NAMES, timings: RaftTimings | None = None,
                 preference: dict[str, int] | None = None,
                 stores: dict[str, object] | None = None, start: Iterable[str] | None = None,
                 seed: int = 1) -> None:
        self.names = tuple(names)
        self.timings = timings or RaftTimings()
        self.preference = preference
        self.clock = Clock()
        self.wire = Wire()
        self.rng = random.Random(seed)
        self.stores: dict[str, object] = {name: MemoryStore() for name in self.names}
        self.stores.update(stores or {})
        self.cells = {name: LicenseCell() for name in self.names}
        self.machines: dict[str, LedgerMachine] = {}
        self.nodes: dict[str, RaftNode] = {}
        for name in self.names if start is None else start:
            self.start(name)

    def start(self, name: str) -> RaftNode:
        machine = self.machines[name] = LedgerMachine(self.cells[name])
        node = RaftNode(name, self.names, self.stores[name], self.clock,  # type: ignore[arg-type]
                        random.Random(self.rng.random()), self.wire.endpoint(name), machine,
                        self.timings, self.preference)
        self.nodes[name] = self.wire.nodes[name] = node
        node.start()
        return node

    def crash(self, name: str) -> None:
        self.nodes.pop(name).stop()
        del self.wire.nodes[name]

    def run(self, seconds: float, step: float = 0.01) -> None:
        for _ in range(round(seconds / step)):
            self.clock.advance(step)
            self.wire.deliver()

    def leader(self) -> RaftNode:
        leaders = [node for node in self.nodes.values() if node.role == LEADER]
        assert len(leaders) == 1, [(n.name, n.role, n.term) for n in self.nodes.values()]
        return leaders[0]

    def followers(self) -> list[RaftNode]:
        return [node for node in self.nodes.values() if node.role != LEADER]

    def elect(self) -> RaftNode:
        self.run(4)
        return self.leader()


def preload(entries: Iterable[tuple[int, bytes]], term: int, voted_for: str | None = None
            ) -> MemoryStore:
    """A store holding ``term`` and a log of (term, data) entries from index 1."""
    store = MemoryStore()
    store.save_term(term, voted_for)
    store.append_entries([LogEntry(index, entry_term, data)
                          for index, (entry_term, data) in enumerate(entries, start=1)])
    return store


def stored_log(store: MemoryStore) -> list[tuple[int, int, bytes]]:
    state: list[StoredState] = []
    store.load().addCallback(state.append)
    return [(entry.index, entry.term, entry.data) for entry in state[0].log]


def results(deferred: Deferred) -> list[object]:
    outcome: list[object] = []
    deferred.addBoth(outcome.append)
    return outcome


# -- election ----------------------------------------------------------------


def test_single_member_leads_at_once() -> None:
    """A pool of one elects itself during start() and commits proposals synchronously."""
    pool = Pool(["solo"])
    node = pool.nodes["solo"]
    assert (node.role, node.term, node.leader) == (LEADER, 1, "solo")
    assert results(node.propose(b"x")) == [2]  # index 1 is the leader's no-op
    assert pool.machines["solo"].history == [(2, b"x")]


def test_three_members_elect_one_leader() -> None:
    """Within a few election timeouts one member leads, the others follow it in its term."""
    pool = Pool()
    leader = pool.elect()
    for node in pool.followers():
        assert (node.role, node.term, node.leader) == (FOLLOWER, leader.term, leader.name)
        assert node.commit_index == 1  # the leader's no-op
    assert leader.term == 1


def test_role_observer_sees_every_change() -> None:
    """Observers hear (role, term, leader) on election and on stepping down."""
    pool = Pool(["solo"], start=[])
    seen: list[tuple[str, int, str | None]] = []
    node = RaftNode("solo", ["solo"], MemoryStore(), pool.clock, random.Random(1),
                    pool.wire.endpoint("solo"), LedgerMachine(LicenseCell()), RaftTimings())
    node.add_role_observer(lambda *state: seen.append(state))
    node.start()
    assert seen[-1] == (LEADER, 1, "solo")
    assert (CANDIDATE, 1, None) in seen


def test_vote_is_durable_before_it_is_sent() -> None:
    """The term and vote reach the store before the VoteReply leaves."""
    store = HeldStore()
    pool = Pool(stores={"a": store}, start=["a"])
    pool.clock.advance(1.0)  # past start-up stickiness, before any election timer
    pool.nodes["a"].receive("b", RequestVote(1, 0, 0))
    assert pool.wire.queue == []
    assert stored_log(store.inner) == [] and store.inner._term == 0
    store.release()
    (_, destination, reply), = pool.wire.queue
    assert (destination, reply.granted, reply.term) == ("b", True, 1)
    assert (store.inner._term, store.inner._voted_for) == (1, "b")


def test_vote_rules() -> None:
    """One vote per term, only for a log at least as up to date, never for an old term."""
    store = preload([(1, b"x"), (2, b"y")], term=2)
    pool = Pool(stores={"a": store}, start=["a"])
    node = pool.nodes["a"]
    pool.clock.advance(1.0)

    def vote(sender: str, request: RequestVote) -> VoteReply:
        node.receive(sender, request)
        reply = pool.wire.queue.pop()[2]
        assert isinstance(reply, VoteReply)
        return reply

    assert not vote("b", RequestVote(3, 5, 1)).granted  # older last term
    assert not vote("b", RequestVote(3, 1, 2)).granted  # same term, shorter
    assert vote("b", RequestVote(3, 2, 2)).granted
    assert not vote("c", RequestVote(3, 9, 3)).granted  # already voted in term 3
    assert vote("b", RequestVote(3, 2, 2)).granted  # the same candidate again
    assert not vote("c", RequestVote(2, 9, 3)).granted  # an older term
    assert node.term == 3 and node.voted_for == "b"


def test_follower_of_live_leader_refuses_votes_without_adopting_the_term() -> None:
    """Leader stickiness: no vote or pre-vote while the leader is heard, except for a transfer."""
    pool = Pool()
    leader = pool.elect()
    follower = pool.followers()[0]
    other = next(name for name in NAMES if name not in (leader.name, follower.name))
    for request in (RequestVote(leader.term + 5, 99, 99, pre_vote=True),
                    RequestVote(leader.term + 5, 99, 99)):
        follower.receive(other, request)
        reply = pool.wire.queue.pop()[2]
        assert not reply.granted and reply.term == leader.term
    assert follower.term == leader.term
    follower.receive(other, RequestVote(leader.term + 1, 99, 99, transfer=True))
    assert pool.wire.queue.pop()[2].granted
    assert follower.term == leader.term + 1


def test_restarted_member_refuses_votes_for_an_election_timeout() -> None:
    """A member may have promised a leader not to vote before it crashed: it keeps that promise."""
    pool = Pool()
    pool.elect()
    follower = pool.followers()[0]
    pool.crash(follower.name)
    node = pool.start(follower.name)
    other = next(name for name in NAMES if name != follower.name)
    node.receive(other, RequestVote(node.term + 1, 99, 99))
    assert not pool.wire.queue.pop()[2].granted
    pool.clock.advance(1.0)
    node.receive(other, RequestVote(node.term + 1, 99, 99))
    assert pool.wire.queue.pop()[2].granted


def test_prevote_keeps_a_cut_off_member_from_inflating_its_term() -> None:
    """A member cut off for many timeouts keeps its term and does not unseat the leader on return."""
    pool = Pool()
    leader = pool.elect()
    lonely = pool.followers()[0]
    term = leader.term
    pool.wire.cut(lonely.name, [name for name in NAMES if name != lonely.name])
    pool.run(20)
    assert lonely.term == term and lonely.role == FOLLOWER
    assert pool.wire.sent["RequestVote"] > 5  # it kept asking for pre-votes
    pool.wire.blocked.clear()
    pool.run(3)
    assert pool.leader() is leader and leader.term == term
    assert lonely.leader == leader.name


def test_check_quorum_steps_down_and_fails_proposals() -> None:
    """A leader that hears no majority for an election timeout steps down; proposals fail."""
    pool = Pool()
    leader = pool.elect()
    pool.wire.cut(leader.name, [name for name in NAMES if name != leader.name])
    outcome = results(leader.propose(b"lost"))
    pool.run(1.0 + 2 * pool.timings.heartbeat)
    assert leader.role == FOLLOWER and leader.leader is None
    assert isinstance(outcome[0].value, NotLeader)  # type: ignore[attr-defined]


# -- replication and commit ------------------------------------------------------


def test_follower_names_the_leader_when_asked_to_propose() -> None:
    """propose on a follower fails at once with NotLeader naming the leader."""
    pool = Pool()
    leader = pool.elect()
    failure = results(pool.followers()[0].propose(b"x"))[0]
    assert failure.value.leader == leader.name  # type: ignore[attr-defined]


def test_proposals_commit_on_a_majority_and_apply_everywhere() -> None:
    """Proposals fire with their index once committed; every member applies them in order."""
    pool = Pool()
    leader = pool.elect()
    pool.crash(pool.followers()[0].name)
    indices = [results(leader.propose(b"e%d" % number)) for number in range(5)]
    pool.run(0.5)
    assert [outcome[0] for outcome in indices] == [2, 3, 4, 5, 6]
    histories = {tuple(pool.machines[name].history) for name in pool.nodes}
    assert histories == {tuple((index, b"e%d" % (index - 2)) for index in range(2, 7))}


def test_followers_know_what_a_dead_leader_had_applied() -> None:
    """The commit a leader sends is at most what it applied: after it dies, the new leader
    still knows that much (the pool moves seats a shrink took from it without waiting
    for it to be fenced), while a member that never led is known to have applied nothing."""
    pool = Pool()
    old = pool.elect()
    for number in range(3):
        results(old.propose(b"e%d" % number))
    pool.run(0.5)
    applied = old.last_applied
    pool.crash(old.name)
    new = pool.elect()
    assert new is not old
    assert new.known_applied(old.name) == applied
    other = next(name for name in pool.nodes if name != new.name)
    assert new.known_applied(other) == 0


def test_log_repair_after_divergence() -> None:
    """A follower's uncommitted entries from an old term are replaced, in memory and on disk."""
    common = [(1, b"x"), (1, b"y")]
    stores = {
        "a": preload(common + [(2, b"stale-3"), (2, b"stale-4")], term=2),
        "b": preload(common + [(3, b"new-3")], term=3),
        "c": preload(common + [(3, b"new-3"), (3, b"new-4")], term=3),
    }
    pool = Pool(stores=stores)  # type: ignore[arg-type]
    leader = pool.elect()
    assert leader.name in ("b", "c")
    leader_log = stored_log(stores[leader.name])
    pool.run(1)
    for name in NAMES:
        assert stored_log(stores[name]) == leader_log
    assert all(data != b"stale-3" for _, data in pool.machines["a"].history)
    assert pool.machines["a"].history == pool.machines[leader.name].history


def test_commit_counts_replicas_only_for_entries_of_the_current_term() -> None:
    """An older term's entry on a majority is not committed until an entry of ours is (Figure 8)."""
    pool = Pool(stores={"a": preload([(2, b"old")], term=2)})  # type: ignore[arg-type]
    pool.wire.blocked |= {("b", "c"), ("c", "b")}  # only a can win
    # Once elected, a is cut off before its first AppendEntries arrives.
    pool.nodes["a"].add_role_observer(
        lambda role, term, leader: role == LEADER and pool.wire.cut("a", ["b", "c"]))
    leader = pool.nodes["a"]
    while leader.role != LEADER:
        pool.run(0.01)
    pool.run(0.1)
    assert leader.term >= 3
    assert leader.commit_index == 0
    now = pool.clock.seconds()
    leader.receive("b", AppendReply(leader.term, True, 1, 0, 0, now, None, now))
    assert leader.commit_index == 0  # entry 1 is of term 2: counting does not commit it
    leader.receive("b", AppendReply(leader.term, True, 2, 0, 0, now, None, now))
    assert leader.commit_index == 2
    assert pool.machines["a"].history == [(1, b"old")]


def test_follower_commits_only_what_the_leader_vouched_for() -> None:
    """The leader's commit index reaches only entries this AppendEntries showed to match."""
    pool = Pool(stores={"b": preload([(1, b"x"), (1, b"y"), (1, b"maybe")], term=1)},  # type: ignore[arg-type]
                start=["b"])
    follower = pool.nodes["b"]
    follower.receive("a", AppendEntries(2, 2, 1, (), 5, 0.0))
    assert follower.commit_index == 2
    assert pool.machines["b"].history == [(1, b"x"), (2, b"y")]


def test_a_heartbeat_vouches_for_the_entries_of_its_own_term_already_held() -> None:
    """A heartbeat sent while the follower's acknowledgement of the last batch was in
    flight names a commit beyond its empty entries: entries the follower holds from that
    leader's term are the leader's, so they commit. Regression (pool-checkout benchmark):
    followers under load lagged the commit they were told and answered NoQuorum."""
    pool = Pool(stores={"b": preload([(1, b"x"), (2, b"y"), (2, b"z")], term=2)},  # type: ignore[arg-type]
                start=["b"])
    follower = pool.nodes["b"]
    follower.receive("a", AppendEntries(2, 1, 1, (), 3, 0.0))
    assert follower.commit_index == 3
    assert follower.leader_commit == 3
    assert pool.machines["b"].history == [(1, b"x"), (2, b"y"), (3, b"z")]


def test_entries_are_durable_before_they_are_acknowledged() -> None:
    """A follower answers AppendEntries only once its store has the entries."""
    store = HeldStore()
    pool = Pool(stores={"b": store}, start=["b"])
    follower = pool.nodes["b"]
    follower.receive("a", AppendEntries(1, 0, 0, (LogEntry(1, 1, b"x"),), 0, 0.0))
    assert pool.wire.queue == []
    store.release()
    (_, _, reply), = pool.wire.queue
    assert reply.success and reply.match_index == 1
    assert stored_log(store.inner) == [(1, 1, b"x")]


def test_leader_counts_itself_only_once_its_own_write_is_durable() -> None:
    """With a slow disk, a pool of one commits when its own append is durable, not before."""
    store = HeldStore()
    pool = Pool(["solo"], stores={"solo": store})
    store.release()  # the election's term and no-op
    node = pool.nodes["solo"]
    outcome = results(node.propose(b"x"))
    assert outcome == [] and node.commit_index == 1
    store.release()
    assert outcome == [2]


def test_stop_fails_waiting_proposals_and_ignores_messages() -> None:
    """After stop a node neither answers nor times out, and nobody waits on it forever."""
    pool = Pool(["solo"])
    node = pool.nodes["solo"]
    store = HeldStore()
    node._store = store  # writes from now on hang, so the proposal waits
    node._writes._issued  # noqa: B018 - the tracker keeps working with the new store
    outcome = results(node.propose(b"x"))
    node.stop()
    assert isinstance(outcome[0].value, NotLeader)  # type: ignore[attr-defined]
    node.receive("solo", RequestVote(9, 9, 9))
    assert pool.clock.getDelayedCalls() == []


def test_messages_from_strangers_and_unknown_kinds_are_ignored() -> None:
    """Only members are heard, and only with Raft messages."""
    pool = Pool(start=["a"])
    node = pool.nodes["a"]
    pool.clock.advance(1.0)
    node.receive("mallory", RequestVote(5, 9, 9))
    node.receive("b", "not a message")
    assert pool.wire.queue == [] and node.term == 0
    assert node.last_contact() == {"b": 1.0}


# -- snapshots, restarts -------------------------------------------------------------


def test_snapshot_is_taken_and_installed_in_chunks() -> None:
    """A member that missed compacted entries gets the snapshot in chunks and catches up."""
    timings = RaftTimings(snapshot_every=5, snapshot_chunk_bytes=100)
    pool = Pool(timings=timings)
    leader = pool.elect()
    late = pool.followers()[0].name
    pool.crash(late)
    for number in range(30):
        leader.propose(b"entry %02d " % number + b"." * 40)
    pool.run(1)
    assert leader._log.snapshot_index >= 25
    pool.start(late)
    pool.run(2)
    assert pool.machines[late].history == pool.machines[leader.name].history
    assert len(pool.machines[late].history) == 30
    assert pool.wire.sent["InstallSnapshot"] > 10
    state = results(pool.stores[late].load())[0]  # type: ignore[attr-defined]
    assert state.snapshot is not None and state.snapshot.index >= 25


def test_restart_recovers_state_from_the_store() -> None:
    """Crash every member; restarted ones restore snapshot and log and carry on."""
    pool = Pool(timings=RaftTimings(snapshot_every=4))
    leader = pool.elect()
    for number in range(10):
        leader.propose(b"e%d" % number)
    pool.run(1)
    before = pool.machines[leader.name].history
    terms = {name: node.term for name, node in pool.nodes.items()}
    for name in NAMES:
        pool.crash(name)
    for name in NAMES:
        pool.start(name)
        assert pool.nodes[name].term == terms[name]
        assert pool.nodes[name].last_applied >= 4  # from the snapshot
    leader = pool.elect()
    leader.propose(b"after")
    pool.run(1)
    for name in NAMES:
        assert pool.machines[name].history[: len(before)] == before
        assert pool.machines[name].history[-1][1] == b"after"


def test_stale_snapshot_does_not_roll_a_follower_back() -> None:
    """A delayed InstallSnapshot older than what a follower committed is acknowledged, not applied."""
    pool = Pool(start=["b"])
    follower = pool.nodes["b"]
    entries = tuple(LogEntry(index, 1, b"e%d" % index) for index in range(1, 6))
    follower.receive("a", AppendEntries(1, 0, 0, entries, 5, 0.0))
    assert follower.last_applied == 5
    follower.receive("a", InstallSnapshot(1, 3, 1, 0, b"{}", True, 0.0))
    reply = pool.wire.queue[-1][2]
    assert isinstance(reply, SnapshotReply) and reply.installed
    assert follower.last_applied == 5 and len(pool.machines["b"].history) == 5


def test_duplicate_replies_do_not_multiply_messages() -> None:
    """A duplicated SnapshotReply sends no extra chunk (once, it grew into a storm)."""
    pool = Pool(timings=RaftTimings(snapshot_every=3, snapshot_chunk_bytes=50))
    leader = pool.elect()
    late = pool.followers()[0].name
    pool.crash(late)
    for number in range(10):
        leader.propose(b"e%d" % number + b"." * 30)
    pool.run(0.5)
    pool.start(late)
    pool.wire.blocked.add((late, leader.name))  # the leader never hears back
    pool.run(0.25)
    snapshot = leader._progress[late].snapshot
    assert snapshot is not None and len(snapshot.data) > 100
    now = pool.clock.seconds()
    reply = SnapshotReply(leader.term, snapshot.index, 50, False, now, None, now)
    for _ in range(3):
        leader.receive(late, reply)
    assert len(pool.wire.taken(InstallSnapshot)) == 1


# -- transfer and preference -----------------------------------------------------------


def test_leadership_transfer() -> None:
    """The target takes over in the next term; proposals are refused while the hand-over runs."""
    pool = Pool()
    leader = pool.elect()
    target = pool.followers()[0]
    done = results(leader.transfer_leadership(target.name))
    assert isinstance(results(leader.propose(b"x"))[0].value, NotLeader)  # type: ignore[attr-defined]
    pool.run(0.5)
    assert done == [None]
    assert pool.leader() is target and target.term == leader.term
    assert leader.leader == target.name


def test_transfer_to_an_unreachable_member_fails_and_leadership_resumes() -> None:
    """If the target never catches up, the transfer fails and the leader takes proposals again."""
    pool = Pool()
    leader = pool.elect()
    target = pool.followers()[0]
    pool.crash(target.name)
    leader.propose(b"the target lacks this")
    pool.run(0.1)
    done = results(leader.transfer_leadership(target.name))
    pool.run(1.5)
    assert isinstance(done[0].value, LeadershipTransferFailed)  # type: ignore[attr-defined]
    assert pool.leader() is leader
    assert results(leader.propose(b"y")) == [] and (pool.run(0.5) is None)
    assert pool.machines[leader.name].history[-1][1] == b"y"


def test_transfer_errors() -> None:
    """Only a leader transfers, only to a member; to itself is a no-op."""
    pool = Pool()
    leader = pool.elect()
    follower = pool.followers()[0]
    assert isinstance(results(follower.transfer_leadership(leader.name))[0].value, NotLeader)  # type: ignore[attr-defined]
    assert isinstance(results(leader.transfer_leadership("zed"))[0].value, ValueError)  # type: ignore[attr-defined]
    assert results(leader.transfer_leadership(leader.name)) == [None]


def test_preferred_member_takes_over_once_it_is_back_and_caught_up() -> None:
    """Leadership moves to the lowest preference number that is up, through a transfer, and stays."""
    pool = Pool(preference={"a": 1, "b": 2, "c": 3}, start=["b", "c"])
    first = pool.elect()
    assert first.name in ("b", "c")
    pool.run(3)
    assert pool.leader().name == "b"  # c handed over to b
    pool.start("a")
    pool.run(4)
    leader = pool.leader()
    assert leader.name == "a"
    term = leader.term
    pool.run(5)
    assert pool.leader() is leader and leader.term == term


def test_preference_waits_until_the_new_leader_has_led_for_the_delay() -> None:
    """A leader hands over to a preferred member only after ``preference_delay``, so a
    failover's reclaim is not restarted by a handover right after the election."""
    timings = RaftTimings(preference_delay=4.0)
    pool = Pool(preference={"a": 1, "b": 2, "c": 3}, start=["b", "c"], timings=timings)
    first = pool.elect()
    pool.run(first._leader_since + 3.9 - pool.clock.seconds())
    assert pool.leader() is first  # no handover within the delay, whoever won
    pool.run(3)
    assert pool.leader().name == "b"


def test_a_held_handover_waits_until_the_hold_is_released() -> None:
    """While ``hold_handover`` says true (the pool keeps reclaimed seats for a failed
    member's clients' claims) the leader does not hand over; afterwards it does."""
    pool = Pool(preference={"a": 1, "b": 2, "c": 3}, start=["b", "c"])
    pool.elect()
    pool.run(3)
    leader = pool.leader()
    assert leader.name == "b"
    holding = [True]
    leader.hold_handover = lambda: holding[0]
    pool.start("a")
    pool.run(6)
    assert pool.leader() is leader
    holding[0] = False
    pool.run(3)
    assert pool.leader().name == "a"


# -- the clock readings fencing uses ---------------------------------------------------


def test_lease_readings_in_a_healthy_pool() -> None:
    """A leader sees recent acknowledgements; followers see a recent confirmed contact."""
    pool = Pool()
    leader = pool.elect()
    now = pool.clock.seconds()
    for follower in pool.followers():
        acked = leader.acked_within(follower.name)
        assert acked is not None and now - acked <= pool.timings.heartbeat + 0.02
        age = follower.leader_contact_age()
        # Anchored at a reply the leader echoed back: up to three heartbeats old.
        assert age is not None and age <= 3 * pool.timings.heartbeat + 0.02
        assert follower.acked_within(leader.name) is None
        assert follower.majority_acked_since() is None
    since = leader.majority_acked_since()
    assert since is not None and now - since <= pool.timings.heartbeat + 0.02
    assert leader.leader_contact_age() is None
    assert leader.reachable(0.5) == set(NAMES)


def test_follower_that_cannot_answer_loses_its_contact() -> None:
    """One-way cut: the follower still hears the leader but the leader cannot hear it, so the
    follower's confirmed contact ages while the leader's acknowledgement stands still."""
    pool = Pool()
    leader = pool.elect()
    follower = pool.followers()[0]
    pool.wire.blocked.add((follower.name, leader.name))
    acked = leader.acked_within(follower.name)
    pool.run(3)
    assert follower.leader == leader.name and follower.role == FOLLOWER
    age = follower.leader_contact_age()
    assert age is not None and age > 2.9
    assert leader.acked_within(follower.name) == acked
    assert follower.name not in leader.reachable(1.0)


def test_allocation_leases_are_confirmed_only_under_a_leader_lease() -> None:
    """A leader that no majority has acknowledged lately stops confirming followers' leases,
    even to a follower it still reaches: a new leader may already be counting."""
    # With this drift bound the lease (2/3 s) ends well before check-quorum (1 s).
    pool = Pool(timings=RaftTimings(clock_drift=0.2))
    leader = pool.elect()
    others = [name for name in NAMES if name != leader.name]
    pool.wire.blocked |= {(other, leader.name) for other in others}
    start = pool.clock.seconds()
    pool.run(0.98)
    confirmations = [(message.sent_at - start, message.lease_from)
                     for source, _, message in pool.wire.log
                     if source == leader.name and isinstance(message, AppendEntries)
                     and message.sent_at > start]
    assert confirmations[0][1] is not None
    assert confirmations[-1][1] is None


def test_lease_is_void_once_timeout_now_is_sent() -> None:
    """A transfer election skips stickiness, so the old leader's lease ends with TimeoutNow."""
    pool = Pool()
    leader = pool.elect()
    target = pool.followers()[0]
    leader.transfer_leadership(target.name)
    assert leader.majority_acked_since() is None


@pytest.mark.parametrize("bad", [
    {"heartbeat": 1.0, "election_timeout": 1.0},
    {"snapshot_every": 0},
    {"max_batch_bytes": 10},
    {"snapshot_chunk_bytes": 40_000},
])
def test_timings_are_validated(bad: dict[str, float]) -> None:
    """Nonsense timings are refused when built, not discovered in production."""
    with pytest.raises(ValueError):
        RaftTimings(**bad)  # type: ignore[arg-type]


def test_oversized_and_empty_proposals_are_refused() -> None:
    """An entry must fit one AppendEntries, and empty data is reserved for no-ops."""
    pool = Pool(["solo"], timings=RaftTimings(max_batch_bytes=100))
    node = pool.nodes["solo"]
    assert isinstance(results(node.propose(b"x" * 100))[0].value, ValueError)  # type: ignore[attr-defined]
    assert isinstance(results(node.propose(b""))[0].value, ValueError)  # type: ignore[attr-defined]
