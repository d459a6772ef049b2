"""A simulated pool: N RaftNodes on one clock, a SimNetwork, stores that survive crashes,
and the invariants checked after every step."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from licensing.errors import LeadershipTransferFailed, NotLeader
from licensing.pool.raft import LEADER, RaftNode, RaftTimings
from licensing.store.memory import MemoryStore

from .clock import DriftingClock, SimClock
from .machine import LICENSE_PREFIX, LedgerMachine, LicenseCell
from .network import SimNetwork
from .store import GroupCommitStore

# The allocation lease the fencing rule uses (docs/pool.md), checked here
# against the clock readings Raft exposes for it.
ALLOCATION_LEASE = 2.0


class SimulationFailure(AssertionError):
    """An invariant broke, or the pool did not recover after the faults were healed."""


@dataclass(frozen=True)
class SimConfig:
    """Everything that shapes one run besides the nemesis's own choices."""

    seed: int
    nodes: int
    timings: RaftTimings
    drift: float
    preference: dict[str, int] | None
    store_latency: tuple[float, float] | None  # None: writes durable at once


@dataclass
class _Incarnation:
    """What one started node looked like at the last check (monotonic values)."""

    commit_index: int = 0
    last_applied: int = 0
    max_sequence: int = 0
    log_checked: int = 0
    history_checked: int = 0
    restores: int = 0


@dataclass
class Invariants:
    """Global knowledge the checks compare every node against."""

    cluster: SimCluster
    leaders: dict[int, str] = field(default_factory=dict)
    committed: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    reference: list[tuple[int, bytes]] = field(default_factory=list)
    reference_index: dict[int, bytes] = field(default_factory=dict)
    acknowledged: dict[int, bytes] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    views: dict[RaftNode, _Incarnation] = field(default_factory=dict)
    won_at: dict[str, tuple[int, float]] = field(default_factory=dict)

    def role_changed(self, name: str, role: str, term: int, leader: str | None) -> None:
        """Role observer: every leader of every term, however briefly it led."""
        if role == LEADER:
            self._leader(term, name)
            self.won_at[name] = (term, self.cluster.clocks[name].seconds())
            # The moment of election is when a lease overlap would show.
            try:
                self._check_leases()
            except SimulationFailure as failure:
                self.violations.append(str(failure))

    def _leader(self, term: int, name: str) -> None:
        first = self.leaders.setdefault(term, name)
        if first != name:
            self.violations.append(f"two leaders in term {term}: {first} and {name}")

    def proposal_done(self, data: bytes, index: int) -> None:
        """A proposal fired: its data must be what the log holds at ``index`` forever."""
        previous = self.acknowledged.setdefault(index, data)
        if previous != data:
            self.violations.append(f"index {index} acknowledged twice: {previous!r} and {data!r}")

    def fail(self, message: str) -> None:
        raise SimulationFailure(message)

    def check(self) -> None:
        """Every safety invariant, against every live node, now."""
        if self.violations:
            self.fail("; ".join(self.violations))
        for name, node in self.cluster.nodes.items():
            self._check_node(name, node)
        self._check_acknowledged()
        self._check_leases()

    def _check_node(self, name: str, node: RaftNode) -> None:
        view = self.views.setdefault(node, _Incarnation())
        machine = self.cluster.machines[name]
        if node.role == LEADER:
            self._leader(node.term, name)
        for attribute in ("commit_index", "last_applied"):
            now, before = getattr(node, attribute), getattr(view, attribute)
            if now < before:
                self.fail(f"{name}: {attribute} went down from {before} to {now}")
            setattr(view, attribute, now)
        if not node.last_applied <= node.commit_index <= node.last_log_index:
            self.fail(f"{name}: applied {node.last_applied}, committed {node.commit_index}, "
                      f"last {node.last_log_index} out of order")
        if machine.max_sequence < view.max_sequence:
            self.fail(f"{name}: license sequence went down from {view.max_sequence} "
                      f"to {machine.max_sequence}")
        view.max_sequence = machine.max_sequence
        self._check_log(name, node, view)
        self._check_history(name, node, machine, view)

    def _check_log(self, name: str, node: RaftNode, view: _Incarnation) -> None:
        """Committed (index, term, data) never differ between nodes or over time."""
        raft_log = node._log  # the simulation reads the in-memory log directly
        start = max(view.log_checked, raft_log.snapshot_index) + 1
        for index in range(start, node.commit_index + 1):
            entry = raft_log.entry(index)
            known = self.committed.setdefault(index, (entry.term, entry.data))
            if known != (entry.term, entry.data):
                self.fail(f"{name}: committed entry {index} is {(entry.term, entry.data)!r}, "
                          f"was {known!r}")
        view.log_checked = max(view.log_checked, node.commit_index)

    def _check_history(self, name: str, node: RaftNode, machine: LedgerMachine,
                       view: _Incarnation) -> None:
        """Every state machine applies a prefix of one and the same sequence."""
        if machine.restores != view.restores:
            view.restores = machine.restores
            view.history_checked = 0
        history = machine.history
        if history and history[-1][0] > node.last_applied:
            self.fail(f"{name}: state machine holds {history[-1][0]}, "
                      f"applied only {node.last_applied}")
        for position in range(view.history_checked, len(history)):
            index, data = history[position]
            if position < len(self.reference):
                if self.reference[position] != (index, data):
                    self.fail(f"{name}: applied {(index, data)!r} at position {position}, "
                              f"others applied {self.reference[position]!r}")
            else:
                self.reference.append((index, data))
                self.reference_index[index] = data
            committed = self.committed.get(index)
            if committed is not None and committed[1] != data:
                self.fail(f"{name}: applied {data!r} at {index}, committed was {committed!r}")
        view.history_checked = len(history)

    def _check_acknowledged(self) -> None:
        for index, data in self.acknowledged.items():
            applied = self.reference_index.get(index)
            if applied is not None and applied != data:
                self.fail(f"proposal acknowledged at {index} with {data!r}, applied {applied!r}")
            committed = self.committed.get(index)
            if committed is not None and committed[1] != data:
                self.fail(f"proposal acknowledged at {index} with {data!r}, "
                          f"committed {committed!r}")

    def _check_leases(self) -> None:
        """Leader lease and allocation lease, as docs/pool.md states them."""
        config = self.cluster.config
        drift = config.drift
        leader_lease = config.timings.election_timeout * (1 - drift) / (1 + drift)
        nodes = self.cluster.nodes
        for name, node in nodes.items():
            if node.role != LEADER:
                continue
            since = node.majority_acked_since()
            now = self.cluster.clocks[name].seconds()
            if since is not None and now < since + leader_lease:
                for other, rival in nodes.items():
                    if rival.role == LEADER and rival.term > node.term:
                        self.fail(f"{other} leads term {rival.term} while {name} holds a "
                                  f"leader lease of term {node.term}")
        reclaim_after = ALLOCATION_LEASE * (1 + drift) / (1 - drift)
        for name, node in nodes.items():
            age = node.leader_contact_age()
            if age is None or age >= ALLOCATION_LEASE or node.leader is None:
                continue
            for other, rival in nodes.items():
                # A newer leader waits reclaim_after from its election before
                # taking seats from members it has not heard from.
                if rival.role == LEADER and rival.term > node.term:
                    term, won = self.won_at[other]
                    now = self.cluster.clocks[other].seconds()
                    if term == rival.term and now >= won + reclaim_after:
                        self.fail(f"{name} holds an allocation lease of term {node.term} "
                                  f"(age {age:.3f}) that {other}, leading term {rival.term} "
                                  f"since {won:.3f}, would reclaim at {now:.3f}")
            leader = nodes.get(node.leader)
            if leader is None or leader.role != LEADER or leader.term != node.term:
                continue
            acked = leader.acked_within(name)
            now = self.cluster.clocks[leader.name].seconds()
            if acked is None or now >= acked + reclaim_after:
                self.fail(f"{name} holds an allocation lease (age {age:.3f}) that leader "
                          f"{leader.name} would reclaim (acked {acked}, now {now:.3f})")

    def check_final(self) -> None:
        """After convergence: nothing acknowledged or committed is missing anywhere."""
        for index, data in self.acknowledged.items():
            if self.reference_index.get(index) != data:
                self.fail(f"acknowledged proposal {index} ({data!r}) is not in the final state")
        for index, (_, data) in self.committed.items():
            if data and self.reference_index.get(index) != data:
                self.fail(f"committed entry {index} ({data!r}) is not in the final state")


class SimCluster:
    """N members with their stores, clocks and license cells; crash and restart them at will."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.names = [f"n{number}" for number in range(1, config.nodes + 1)]
        self.clock = SimClock()
        self.network = SimNetwork(self.clock, self._child_rng())
        self.stores = {name: MemoryStore() for name in self.names}
        self.clocks = {
            name: DriftingClock(self.clock, self.rng.uniform(1 - config.drift, 1 + config.drift),
                                self.rng.uniform(0, 1000))
            for name in self.names
        }
        self.cells = {name: LicenseCell() for name in self.names}
        self.nodes: dict[str, RaftNode] = {}
        self.machines: dict[str, LedgerMachine] = {}
        self._pending_stores: dict[str, GroupCommitStore] = {}
        self.invariants = Invariants(self)
        self.network.after_delivery = self.invariants.check
        self.events: deque[str] = deque(maxlen=40)
        for name in self.names:
            self.start(name)

    def _child_rng(self) -> random.Random:
        return random.Random(self.rng.getrandbits(64))

    def note(self, event: str) -> None:
        """Remember what happened, for the failure message."""
        self.events.append(f"t={self.clock.seconds():.3f} {event}")

    def start(self, name: str) -> None:
        """Start (or restart) ``name`` on the store it always had."""
        latency = self.config.store_latency
        store: object = self.stores[name]
        if latency is not None:
            store = self._pending_stores[name] = GroupCommitStore(
                self.stores[name], self.clock, self._child_rng(), latency)
        machine = self.machines[name] = LedgerMachine(self.cells[name])
        node = RaftNode(name, self.names, store, self.clocks[name], self._child_rng(),  # type: ignore[arg-type]
                        self.network.endpoint(name), machine, self.config.timings,
                        self.config.preference)
        node.add_role_observer(
            lambda role, term, leader, name=name: self.invariants.role_changed(name, role, term, leader))
        self.nodes[name] = node
        self.network.attach(name, node.receive)
        node.start().addErrback(lambda failure: self.invariants.violations.append(
            f"{name} failed to start: {failure.getErrorMessage()}"))

    def crash(self, name: str) -> None:
        """Kill ``name``: its timers stop, unfinished store writes are lost, the object is dropped."""
        node = self.nodes.pop(name)
        node.stop()
        self.network.detach(name)
        pending = self._pending_stores.pop(name, None)
        if pending is not None:
            pending.crash()

    @property
    def down(self) -> list[str]:
        return [name for name in self.names if name not in self.nodes]

    def leaders(self) -> list[RaftNode]:
        return [node for node in self.nodes.values() if node.role == LEADER]

    def propose(self, node: RaftNode, data: bytes) -> None:
        """Propose on ``node``; record the outcome for the invariants."""
        def done(index: int) -> None:
            self.invariants.proposal_done(data, index)

        def failed(failure: object) -> None:
            if not failure.check(NotLeader):  # type: ignore[attr-defined]
                self.invariants.violations.append(
                    f"proposal failed with {failure.getErrorMessage()}")  # type: ignore[attr-defined]

        node.propose(data).addCallbacks(done, failed)

    def transfer(self, node: RaftNode, to: str) -> None:
        """Ask ``node`` to hand leadership to ``to``; only the expected failures are fine."""
        def failed(failure: object) -> None:
            if not failure.check(NotLeader, LeadershipTransferFailed):  # type: ignore[attr-defined]
                self.invariants.violations.append(
                    f"transfer failed with {failure.getErrorMessage()}")  # type: ignore[attr-defined]

        node.transfer_leadership(to).addErrback(failed)

    def run(self, seconds: float) -> None:
        self.clock.run_until(self.clock.seconds() + seconds)

    def convergence_problem(self) -> str | None:
        """Why the pool has not yet settled (all up, one leader, same state), or None."""
        if self.down:
            return f"down: {self.down}"
        leaders = self.leaders()
        if len(leaders) != 1:
            return f"{len(leaders)} leaders"
        leader = leaders[0]
        for name, node in self.nodes.items():
            if node.term != leader.term or node.leader != leader.name:
                return f"{name} follows {node.leader} in term {node.term}"
            if node.last_applied != leader.last_log_index:
                return f"{name} applied {node.last_applied} of {leader.last_log_index}"
        histories = {tuple(machine.history) for machine in self.machines.values()}
        if len(histories) != 1:
            return "state machines differ"
        sequences = {machine.max_sequence for machine in self.machines.values()}
        sequences |= {cell.sequence for cell in self.cells.values()}
        if len(sequences) != 1:
            return f"license sequences differ: {sorted(sequences)}"
        highest = max((int(data[len(LICENSE_PREFIX):]) for _, data in self.invariants.reference
                       if data.startswith(LICENSE_PREFIX)), default=0)
        if sequences != {highest}:
            return f"license sequence {sequences} is not the highest committed {highest}"
        return None
