"""The seeded nemesis: random faults and load against a SimCluster, invariants after every step."""

from __future__ import annotations

import random
from dataclasses import dataclass

from licensing.pool.raft import RaftTimings

from .cluster import SimCluster, SimConfig, SimulationFailure
from .machine import license_entry

DRIFT = 0.05
NORMAL_DELAY = (0.001, 0.02)
STEP_LENGTHS = (0.005, 0.02, 0.1, 0.3, 0.6, 1.0, 2.0, 3.0)


@dataclass(frozen=True)
class Profile:
    """How long and how rough a run is."""

    steps: int
    # "minority": at most a minority down at once (the pool must keep
    # serving); "anyone": any number, even all.
    crash_policy: str
    recovery_seconds: float = 60.0


CI = Profile(steps=45, crash_policy="minority")
SOAK = Profile(steps=200, crash_policy="anyone")


def make_config(seed: int, nodes: int) -> SimConfig:
    """The per-seed shape of a run: timings, snapshots, store latency, preferences."""
    rng = random.Random(f"config-{seed}-{nodes}")
    timings = RaftTimings(
        snapshot_every=rng.choice((3, 8, 20, 1000)),
        max_batch_bytes=rng.choice((120, 600, 48_000)),
        snapshot_chunk_bytes=rng.choice((64, 700, 32 * 1024)),
    )
    names = [f"n{number}" for number in range(1, nodes + 1)]
    preference = None
    if rng.random() < 0.3:
        ranks = list(range(1, nodes + 1))
        rng.shuffle(ranks)
        preference = dict(zip(names, ranks))
    store_latency = rng.choice((None, None, (0.0005, 0.01), (0.001, 0.08)))
    return SimConfig(seed=seed, nodes=nodes, timings=timings, drift=DRIFT,
                     preference=preference, store_latency=store_latency)


class Nemesis:
    """Picks one action per step from a seeded rng, then lets time run."""

    def __init__(self, cluster: SimCluster, profile: Profile, rng: random.Random) -> None:
        self.cluster = cluster
        self.profile = profile
        self.rng = rng
        self.proposals = 0
        self.highest_sequence = 0
        self._actions = [
            (self.propose, 30),
            (self.crash, 7),
            (self.restart, 9),
            (self.partition, 6),
            (self.heal, 7),
            (self.set_loss, 4),
            (self.set_duplication, 3),
            (self.set_delay, 4),
            (self.transfer, 4),
            (self.propose_and_crash, 5),
            (self.bounce, 4),
            (self.strand_leader, 4),
            (self.wait, 8),
        ]

    def step(self) -> None:
        actions, weights = zip(*self._actions)
        self.rng.choices(actions, weights)[0]()
        self.cluster.run(self.rng.choice(STEP_LENGTHS))
        self.cluster.invariants.check()

    def propose(self) -> None:
        leaders = self.cluster.leaders()
        if not leaders:
            return
        leader = self.rng.choice(leaders)
        for _ in range(self.rng.randint(1, 4)):
            self.proposals += 1
            if self.rng.random() < 0.3:
                if self.rng.random() < 0.6:
                    self.highest_sequence += 1
                    sequence = self.highest_sequence
                else:
                    sequence = self.rng.randint(1, self.highest_sequence + 3)
                    self.highest_sequence = max(self.highest_sequence, sequence)
                data = license_entry(sequence)
            else:
                size = self.rng.choice((1, 10, 50, 90))
                data = b"e%d:" % self.proposals + bytes(self.rng.randrange(256) for _ in range(size))
            self.cluster.propose(leader, data)
        self.cluster.note(f"propose on {leader.name}")

    def crash(self) -> None:
        live = sorted(self.cluster.nodes)
        if not live:
            return
        if self.profile.crash_policy == "minority":
            minority = (len(self.cluster.names) - 1) // 2
            if len(self.cluster.down) >= minority:
                return
        leaders = [node.name for node in self.cluster.leaders()]
        victim = self.rng.choice(leaders if leaders and self.rng.random() < 0.4 else live)
        self.cluster.crash(victim)
        self.cluster.note(f"crash {victim}")

    def propose_and_crash(self) -> None:
        """Crash someone while fresh entries are half replicated and maybe not yet on disk."""
        leaders = self.cluster.leaders()
        if not leaders:
            return
        self.propose()
        self.cluster.run(self.rng.choice((0.001, 0.005, 0.02, 0.05)))
        victim = self.rng.choice([leaders[0].name, *self.cluster.nodes])
        if victim in self.cluster.nodes:
            self.cluster.crash(victim)
            self.cluster.note(f"crash {victim} right after proposing")
            if self.profile.crash_policy == "minority" and len(self.cluster.down) > (
                    len(self.cluster.names) - 1) // 2:
                self.cluster.start(victim)
                self.cluster.note(f"restart {victim} at once")

    def bounce(self) -> None:
        """Crash and restart one member at once: only its unfinished writes are lost."""
        live = sorted(self.cluster.nodes)
        if live:
            name = self.rng.choice(live)
            self.cluster.crash(name)
            self.cluster.start(name)
            self.cluster.note(f"bounce {name}")

    def strand_leader(self) -> None:
        """Cut the leader off and feed it entries that can never commit: divergent logs."""
        leaders = self.cluster.leaders()
        if not leaders:
            return
        leader = leaders[0].name
        self.cluster.network.partition([leader], [n for n in self.cluster.names if n != leader])
        self.cluster.note(f"strand leader {leader}")
        self.propose()

    def restart(self) -> None:
        down = self.cluster.down
        if down:
            name = self.rng.choice(down)
            self.cluster.start(name)
            self.cluster.note(f"restart {name}")

    def partition(self) -> None:
        names = list(self.cluster.names)
        network = self.cluster.network
        kind = self.rng.choices(("split", "isolate", "one-way", "one-way-leader", "bridge"),
                                (2, 1, 2, 3, 2))[0]
        if kind == "split":
            self.rng.shuffle(names)
            cut = self.rng.randint(1, len(names) - 1)
            network.partition(names[:cut], names[cut:])
            self.cluster.note(f"partition {sorted(names[:cut])} | {sorted(names[cut:])}")
        elif kind == "isolate":
            lonely = self.rng.choice(names)
            network.partition([lonely], [name for name in names if name != lonely])
            self.cluster.note(f"isolate {lonely}")
        elif kind == "one-way":
            for _ in range(self.rng.randint(1, len(names))):
                source, destination = self.rng.sample(names, 2)
                network.block(source, destination)
                self.cluster.note(f"block {source} -> {destination}")
        elif kind == "bridge":
            # Cut the leader from one follower only: the others still hear both,
            # so only leader stickiness stops the cut-off one from taking over.
            leaders = self.cluster.leaders()
            if leaders:
                leader = leaders[0].name
                other = self.rng.choice([name for name in names if name != leader])
                network.partition([leader], [other])
                self.cluster.note(f"cut {leader} <-> {other}")
        else:
            leaders = self.cluster.leaders()
            if leaders:
                leader = leaders[0].name
                others = [name for name in names if name != leader]
                inbound = self.rng.random() < 0.5
                for other in self.rng.sample(others, self.rng.randint(1, len(others))):
                    source, destination = (other, leader) if inbound else (leader, other)
                    network.block(source, destination)
                    self.cluster.note(f"block {source} -> {destination}")

    def heal(self) -> None:
        self.cluster.network.heal()
        self.cluster.note("heal")

    def set_loss(self) -> None:
        self.cluster.network.loss = self.rng.choice((0.0, 0.0, 0.05, 0.2, 0.5))
        self.cluster.note(f"loss {self.cluster.network.loss}")

    def set_duplication(self) -> None:
        self.cluster.network.duplicate = self.rng.choice((0.0, 0.05, 0.3))
        self.cluster.note(f"duplicate {self.cluster.network.duplicate}")

    def set_delay(self) -> None:
        delay = self.rng.choice((NORMAL_DELAY, NORMAL_DELAY, (0.01, 0.3), (0.2, 2.5)))
        self.cluster.network.delay = delay
        self.cluster.note(f"delay {delay}")

    def transfer(self) -> None:
        leaders = self.cluster.leaders()
        if leaders:
            leader = self.rng.choice(leaders)
            target = self.rng.choice(self.cluster.names)
            self.cluster.transfer(leader, target)
            self.cluster.note(f"transfer {leader.name} -> {target}")

    def wait(self) -> None:
        pass

    def recover(self) -> None:
        """Heal every fault, bring every member back, and wait for one settled pool.

        Then commit one more entry through the final leader, to show the pool
        still makes progress, and wait for every member to apply it.
        """
        cluster = self.cluster
        network = cluster.network
        network.heal()
        network.loss = network.duplicate = 0.0
        network.delay = NORMAL_DELAY
        for name in cluster.down:
            cluster.start(name)
        cluster.note("recover: healed everything, restarted everyone")
        self._settle("after healing")
        # A transfer may still be under way, refusing proposals: try again.
        for attempt in range(5):
            final = b"final-%d" % attempt
            cluster.propose(cluster.leaders()[0], final)
            self._settle("after the final proposal")
            if final in cluster.invariants.acknowledged.values():
                break
        else:
            raise SimulationFailure("the final proposals were never acknowledged")
        cluster.invariants.check_final()

    def _settle(self, when: str) -> None:
        cluster = self.cluster
        deadline = cluster.clock.seconds() + self.profile.recovery_seconds
        while True:
            cluster.run(0.5)
            cluster.invariants.check()
            problem = cluster.convergence_problem()
            if problem is None:
                return
            if cluster.clock.seconds() >= deadline:
                raise SimulationFailure(f"no convergence {when} within "
                                        f"{self.profile.recovery_seconds}s: {problem}")


def run_simulation(seed: int, nodes: int, profile: Profile) -> SimCluster:
    """Run one seeded schedule; SimulationFailure (with the recent events) if anything breaks."""
    config = make_config(seed, nodes)
    cluster = SimCluster(config)
    nemesis = Nemesis(cluster, profile, random.Random(f"nemesis-{seed}-{nodes}"))
    try:
        for _ in range(profile.steps):
            nemesis.step()
        nemesis.recover()
    except SimulationFailure as failure:
        events = "\n  ".join(cluster.events)
        raise SimulationFailure(f"{failure}\n{config}\nrecent events:\n  {events}") from None
    return cluster
