"""Directed fault scenarios on the simulated pool, with drifting clocks and the full checker.

The random schedules hit these only now and then; here each runs on purpose,
over several seeds (different drift, delays and timer draws).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from .cluster import SimCluster
from .nemesis import CI, make_config, run_simulation

SEEDS = range(8)


def _cluster(seed: int, nodes: int = 3) -> SimCluster:
    config = dataclasses.replace(make_config(seed, nodes), preference=None)
    cluster = SimCluster(config)
    cluster.run(5)
    cluster.invariants.check()
    return cluster


def _run_checked(cluster: SimCluster, seconds: float) -> None:
    for _ in range(round(seconds / 0.1)):
        cluster.run(0.1)
        cluster.invariants.check()


@pytest.mark.parametrize("seed", SEEDS)
def test_follower_cut_from_the_leader_alone_cannot_unseat_it(seed: int) -> None:
    """Cut the link between the leader and one follower only: the other follower still hears
    the leader, so stickiness refuses the cut-off one's votes and the leader keeps its term."""
    cluster = _cluster(seed)
    leader = cluster.leaders()[0]
    term = leader.term
    lonely = next(name for name in cluster.names if name != leader.name)
    cluster.network.partition([leader.name], [lonely])
    _run_checked(cluster, 10)
    assert cluster.leaders() == [leader] and leader.term == term


@pytest.mark.parametrize("seed", SEEDS)
def test_leader_that_cannot_hear_steps_down_and_a_new_one_takes_over(seed: int) -> None:
    """Block everything sent to the leader: it steps down (check-quorum) while its messages
    still arrive, and the others elect a new leader without overlapping its lease."""
    cluster = _cluster(seed, 5)
    old = cluster.leaders()[0]
    for name in cluster.names:
        if name != old.name:
            cluster.network.block(name, old.name)
    _run_checked(cluster, 8)
    leaders = cluster.leaders()
    assert len(leaders) == 1 and leaders[0] is not old and old.role != "leader"


@pytest.mark.parametrize("seed", SEEDS)
def test_member_bounced_during_an_election_keeps_its_promise(seed: int) -> None:
    """A follower that acknowledged the leader and restarts at once still refuses votes for an
    election timeout, so a member cut off from the leader cannot win behind its back."""
    cluster = _cluster(seed)
    leader = cluster.leaders()[0]
    lonely, other = (name for name in cluster.names if name != leader.name)
    cluster.network.partition([leader.name], [lonely])
    for _ in range(12):
        cluster.run(0.2)
        cluster.crash(other)
        cluster.start(other)
        cluster.invariants.check()
    _run_checked(cluster, 5)


def test_random_schedules_exercise_every_message() -> None:
    """A handful of CI seeds send every kind of Raft message, snapshots and transfers included;
    if the nemesis stops reaching some path, this says so."""
    sent: Counter[str] = Counter()
    for seed in range(12):
        for nodes in (3, 5):
            sent += run_simulation(seed, nodes, CI).network.sent
    kinds = {"RequestVote", "VoteReply", "AppendEntries", "AppendReply", "InstallSnapshot",
             "SnapshotReply", "TimeoutNow"}
    assert kinds <= {kind for kind, count in sent.items() if count}
