"""The record state machine: deterministic, idempotent where reports repeat, never over the count."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from zope.interface.verify import verifyObject

from licensing.interfaces import IRecordStateMachine
from licensing.license import sign_license, verify_license
from licensing.pool import record as entries
from licensing.pool.record import Record
from licensing.sandbox import license_text

MEMBERS = ("ls1", "ls2", "ls3")


@pytest.fixture
def vendor():
    return Ed25519PrivateKey.generate()


def signed(vendor, sequence: int, count: int = 10, distribution: str | None = None) -> bytes:
    feature = {"version": "2.0", "count": count, "expires": "never"}
    if distribution:
        feature["distribution"] = distribution
    return sign_license(license_text(sequence, {"cad-pro": feature}), vendor)


def make_record(vendor) -> Record:
    pub = vendor.public_key()
    return Record(MEMBERS, lambda data: verify_license(data, pub))


def lease(lease_id: str, server: str = "ls2", count: int = 1) -> dict:
    return {"lease_id": lease_id, "feature": "cad-pro", "version": "2.0", "client_id": "c1",
            "user": "u", "host": "h", "count": count, "server": server}


def test_provides_interface(vendor):
    """The record is the state machine the consensus core drives."""
    assert verifyObject(IRecordStateMachine, make_record(vendor))


def test_license_installs_and_splits_evenly(vendor):
    """The first license sets every member's allocation to an even split of the count."""
    rec = make_record(vendor)
    rec.apply(1, entries.license_entry(1, signed(vendor, 1, count=10)))
    assert rec.sequence == 1
    assert rec.allocations["cad-pro"] == {"ls1": 4, "ls2": 3, "ls3": 3}


def test_license_distribution_is_used(vendor):
    """A distribution in the license file decides the first allocations."""
    rec = make_record(vendor)
    rec.apply(1, entries.license_entry(1, signed(vendor, 1, 10, "ls1:2, ls2:2, ls3:6")))
    assert rec.allocations["cad-pro"] == {"ls1": 2, "ls2": 2, "ls3": 6}


def test_lower_or_equal_sequence_never_wins(vendor):
    """F9: a lower or equal sequence number never replaces a newer file."""
    rec = make_record(vendor)
    rec.apply(1, entries.license_entry(2, signed(vendor, 2, count=10)))
    rec.apply(2, entries.license_entry(1, signed(vendor, 1, count=50)))
    rec.apply(3, entries.license_entry(2, signed(vendor, 2, count=50)))
    assert rec.sequence == 2
    assert sum(rec.allocations["cad-pro"].values()) == 10


def test_new_count_refits_allocations_within_count(vendor):
    """A newer file with a smaller count shrinks the allocations to fit it."""
    rec = make_record(vendor)
    rec.apply(1, entries.license_entry(1, signed(vendor, 1, count=10)))
    rec.apply(2, entries.license_entry(2, signed(vendor, 2, count=4)))
    assert sum(rec.allocations["cad-pro"].values()) == 4
    rec.apply(3, entries.license_entry(3, signed(vendor, 3, count=9)))
    assert sum(rec.allocations["cad-pro"].values()) == 9


@pytest.mark.allow_logged_errors
def test_forged_license_entry_is_skipped(vendor):
    """An entry whose file does not verify changes nothing."""
    rec = make_record(vendor)
    other = Ed25519PrivateKey.generate()
    rec.apply(1, entries.license_entry(1, signed(other, 1)))
    assert rec.license is None


@pytest.mark.allow_logged_errors
def test_allocation_entry_never_exceeds_count(vendor):
    """An allocation change that would exceed the count is refused."""
    rec = make_record(vendor)
    rec.apply(1, entries.license_entry(1, signed(vendor, 1, count=10)))
    rec.apply(2, entries.allocation_entry("cad-pro", {"ls1": 8}))
    assert rec.allocations["cad-pro"]["ls1"] == 4
    rec.apply(3, entries.allocation_entry("cad-pro", {"ls2": 0}))
    assert rec.unassigned("cad-pro") == 3
    assert rec.shrunk_at["ls2"] == 3
    rec.apply(4, entries.allocation_entry("cad-pro", {"ls1": 7}))
    assert rec.allocations["cad-pro"] == {"ls1": 7, "ls2": 0, "ls3": 3}


def test_allocation_entry_decided_on_old_state_is_void(vendor):
    """Two changes decided on the same allocation can never both take effect."""
    rec = make_record(vendor)
    rec.apply(1, entries.license_entry(1, signed(vendor, 1, count=10)))
    move = entries.allocation_entry("cad-pro", {"ls2": 1, "ls1": 6}, expect={"ls2": 3, "ls1": 4})
    rec.apply(2, move)
    rec.apply(3, move)
    assert rec.allocations["cad-pro"] == {"ls1": 6, "ls2": 1, "ls3": 3}


def test_reports_merge_and_repeat_idempotently(vendor):
    """F3: reports add and remove a member's leases; a repeated report changes nothing."""
    rec = make_record(vendor)
    report = entries.report_entry("ls2", [lease("a"), lease("b")], [])
    rec.apply(1, report)
    rec.apply(2, report)
    assert set(rec.held_by("ls2")) == {"a", "b"}
    rec.apply(3, entries.report_entry("ls2", [], ["a"]))
    assert set(rec.held_by("ls2")) == {"b"}
    assert rec.used("cad-pro", "ls2") == 1


def test_report_cannot_remove_another_members_lease(vendor):
    """A member's report only touches that member's leases."""
    rec = make_record(vendor)
    rec.apply(1, entries.report_entry("ls2", [lease("a")], []))
    rec.apply(2, entries.report_entry("ls3", [], ["a"]))
    assert set(rec.held_by("ls2")) == {"a"}


def test_adopt_moves_lease(vendor):
    """F8: an adopted lease moves to the leader in the record."""
    rec = make_record(vendor)
    rec.apply(1, entries.report_entry("ls2", [lease("a")], []))
    rec.apply(2, entries.adopt_entry(lease("a"), "ls2", "ls1"))
    assert rec.leases["a"].server == "ls1"


def test_snapshot_restore_round_trip(vendor):
    """A restored snapshot is the same record."""
    rec = make_record(vendor)
    rec.apply(1, entries.license_entry(1, signed(vendor, 1, count=10)))
    rec.apply(2, entries.report_entry("ls2", [lease("a")], []))
    copy = make_record(vendor)
    copy.restore(rec.snapshot())
    assert copy.snapshot() == rec.snapshot()
    assert copy.sequence == 1
    assert copy.leases == rec.leases
    assert copy.used("cad-pro", "ls2") == 1


def test_restores_a_snapshot_that_lists_leases_as_objects(vendor):
    """Snapshots taken before leases became tuples still restore: members upgrade one at a time."""
    rec = make_record(vendor)
    rec.apply(1, entries.license_entry(1, signed(vendor, 1, count=10)))
    rec.apply(2, entries.report_entry("ls2", [lease("a", count=2)], []))
    old = json.loads(rec.snapshot())
    old["leases"] = {"a": lease("a", count=2)}
    copy = make_record(vendor)
    copy.restore(json.dumps(old).encode())
    assert copy.leases == rec.leases
    assert copy.used("cad-pro", "ls2") == 2


def test_used_follows_reports_adoptions_and_full_reports(vendor):
    """The per-member seat counts the steward reads stay equal to a count over the leases."""
    rec = make_record(vendor)
    rec.apply(1, entries.report_entry("ls2", [lease("a"), lease("b", count=3)], []))
    rec.apply(2, entries.report_entry("ls3", [lease("c")], []))
    assert (rec.used("cad-pro", "ls2"), rec.used("cad-pro", "ls3")) == (4, 1)
    rec.apply(3, entries.adopt_entry(lease("b", count=3), "ls2", "ls1"))
    assert (rec.used("cad-pro", "ls1"), rec.used("cad-pro", "ls2")) == (3, 1)
    rec.apply(4, entries.report_entry("ls2", [lease("a", count=2)], []))
    assert rec.used("cad-pro", "ls2") == 2
    rec.apply(5, entries.report_entry("ls3", [lease("d")], [], full=True))
    assert set(rec.held_by("ls3")) == {"d"}
    assert rec.used("cad-pro", "ls3") == 1
    rec.apply(6, entries.report_entry("ls1", [], ["b"]))
    assert rec.used("cad-pro", "ls1") == 0
    for member in MEMBERS:
        assert rec.used("cad-pro", member) == sum(v.count for v in rec.held_by(member).values())


@pytest.mark.allow_logged_errors
def test_garbage_entry_is_skipped(vendor):
    """Malformed entries are logged and skipped, never raised."""
    rec = make_record(vendor)
    rec.apply(1, b"not json")
    rec.apply(2, b'{"t": "nonsense"}')
    assert rec.applied == 2
    assert rec.license is None


def test_highest_since_bounds_what_a_member_may_act_on(vendor):
    """The leader may hand out seats above the highest allocation a member had since the
    last entry it is known to have applied: that member acts on no more than that."""
    rec = make_record(vendor)
    rec.apply(1, entries.license_entry(1, signed(vendor, 1, count=10)))
    start = rec.allocation("cad-pro", "ls2")
    ls1 = rec.allocation("cad-pro", "ls1")
    rec.apply(2, entries.allocation_entry("cad-pro", {"ls2": start + 2, "ls1": ls1 - 2}))
    rec.apply(3, entries.allocation_entry("cad-pro", {"ls2": 1}))
    assert rec.allocation("cad-pro", "ls2") == 1
    assert rec.highest_since("cad-pro", "ls2", 0) == start + 2
    assert rec.highest_since("cad-pro", "ls2", 1) == start + 2
    assert rec.highest_since("cad-pro", "ls2", 2) == start + 2
    assert rec.highest_since("cad-pro", "ls2", 3) == 1
    assert rec.highest_since("cad-pro", "ls3", 0) == rec.allocation("cad-pro", "ls3")


def test_highest_since_is_unknown_before_a_restored_snapshot(vendor):
    """A restored record has no history before its snapshot: unknown, so the leader waits."""
    rec = make_record(vendor)
    rec.apply(1, entries.license_entry(1, signed(vendor, 1, count=10)))
    rec.apply(2, entries.allocation_entry("cad-pro", {"ls2": 0}))
    copy = make_record(vendor)
    copy.restore(rec.snapshot())
    assert copy.highest_since("cad-pro", "ls2", 1) is None
    assert copy.highest_since("cad-pro", "ls2", 2) == 0
    copy.apply(3, entries.allocation_entry("cad-pro", {"ls2": 2}))
    assert copy.highest_since("cad-pro", "ls2", 2) == 2


def test_highest_since_is_unknown_past_the_history_it_keeps(vendor):
    rec = make_record(vendor)
    rec.apply(1, entries.license_entry(1, signed(vendor, 1, count=10)))
    for index in range(2, 2 + entries.HISTORY + 1):
        rec.apply(index, entries.allocation_entry("cad-pro", {"ls2": index % 2}))
    assert rec.highest_since("cad-pro", "ls2", 1) is None
    assert rec.highest_since("cad-pro", "ls2", index - 1) == 1
