"""Fault injection against a real three-member pool (docs/chaos.md).

Each test builds a proxied pool in its own directory, runs 16 clients in a
separate process, lets the nemesis (or a script) hurt the members and their
links, and fails with the observer's violations. The CI subset is three
seeds of 35 s and two scripted regressions (about four minutes together); the soak runs only when
``CHAOS_SOAK_MINUTES`` is set:

    CHAOS_SOAK_MINUTES=30 pytest tests/chaos -m chaos -k soak -s

``CHAOS_SEEDS=1,2,3`` and ``CHAOS_SECONDS=60`` change the CI subset;
``python -m tests.chaos.harness --seed N`` replays one seed from a shell.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from .harness import ChaosReport, run_chaos
from .nemesis import Nemesis

pytestmark = pytest.mark.chaos

CI_SEEDS = [int(s) for s in os.environ.get("CHAOS_SEEDS", "101,202,303").split(",")]
CI_SECONDS = float(os.environ.get("CHAOS_SECONDS", "35"))


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


def check(report: ChaosReport) -> None:
    print(report.summary())
    assert not report.violations, report.summary()


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_random_faults_keep_every_invariant(seed: int, tmp_path: Path) -> None:
    """A seeded nemesis (kills, freezes, cuts, one-way cuts, delay, drops, slow links; at most
    one member down at a time) for CI_SECONDS while 16 clients churn: no over-issued seat, no
    lost lease, one record and the highest license sequence everywhere after healing."""
    check(run_chaos(tmp_path, seed, CI_SECONDS, say=say))


@pytest.mark.soak
def test_soak(tmp_path: Path) -> None:
    """The long run: CHAOS_SOAK_MINUTES of random faults with one seed (CHAOS_SEED or random)."""
    minutes = os.environ.get("CHAOS_SOAK_MINUTES")
    if not minutes:
        pytest.skip("set CHAOS_SOAK_MINUTES to run the soak")
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1_000_000)))
    say(f"soak: seed {seed}, {minutes} minutes, work dir {tmp_path}")
    check(run_chaos(tmp_path, seed, float(minutes) * 60, say=say))


# -- regressions: scripted replays of faults that found bugs ------------------------------


def test_follower_frozen_about_as_long_as_its_allocation_lease_keeps_its_leases(tmp_path: Path) -> None:
    """Seed 1 (first run): a follower frozen for about 2 s wakes before the leader may reclaim
    its seats, and answers NoQuorum for a moment (its allocation lease is older than it may be).

    Its clients claimed their leases at the leader, which could not convert them (the seats are
    still the follower's) and answered ``lost``, although the follower, acting again a moment
    later, still honoured them: leases lost with the whole pool up (fixed in fd3dffc and
    4c8dc9f). Replayed as four freezes of 1.8-2.1 s of the follower that holds the most leases.
    """

    def script(nemesis: Nemesis) -> None:
        for hold in (1.8, 1.9, 2.0, 2.1):
            time.sleep(4)
            nemesis.episode("freeze", nemesis.member("follower"), hold)
        time.sleep(5)

    check(run_chaos(tmp_path, 1, 0, script=script, say=say))


def test_a_follower_that_cannot_hear_the_leader_leaves_no_seat_in_the_record(tmp_path: Path) -> None:
    """Seed 101 (first run): a deaf follower (it hears no other member, they hear it) issued a
    lease and reported it; the report was committed but its acknowledgement never reached the
    follower, which then dropped the lease (its allocation was reclaimed) without reporting
    the removal, since it had never seen the addition acknowledged. The record kept the seat
    in use for good: the members' usage never matched the record and the pool never drained
    (fixed in 7087cf3, reports against the record). Replayed as three 6 s deaf episodes.
    """

    def script(nemesis: Nemesis) -> None:
        for _ in range(3):
            time.sleep(4)
            nemesis.episode("deaf", nemesis.member("follower"), 6.0)
        time.sleep(5)

    check(run_chaos(tmp_path, 7, 0, script=script, say=say))


def test_a_member_restarted_with_a_newer_license_never_serves_an_older_one(tmp_path: Path) -> None:
    """Seed 42 (kill and freeze only): a member killed, given the next license sequence in its
    store (``licensectl license install``) and restarted served the new file at once, then the
    older one again while it replayed the pool's log (each committed license entry replaced the
    served file), then the new one once the pool committed it: its sequence went 4, 3, 4.
    Replayed as two such restarts of a follower.
    """

    def script(nemesis: Nemesis) -> None:
        nemesis.license_bump = 1.0
        for _ in range(2):
            time.sleep(3)
            nemesis.episode("kill", nemesis.member("follower"), 2.0)
        time.sleep(3)

    report = run_chaos(tmp_path, 42, 0, script=script, say=say)
    assert report.stats["expected_sequence"] == 3
    check(report)
