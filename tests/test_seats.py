"""Tests for licensing.seats.SeatTable: exact counts against the allocation, and expiry."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from licensing.errors import NoSeats
from licensing.records import Lease
from licensing.seats import SeatTable


def lease(n: int, feature: str = "cad", count: int = 1, expires_at: float = 100.0) -> Lease:
    """A lease with id derived from ``n``."""
    return Lease(f"{n:032x}", feature, "1.0", "client", "user", "host", count, "ls1", 0.0,
                 expires_at)


def test_unknown_feature_has_no_allocation() -> None:
    """A feature never allocated has zero seats, so nothing can be reserved."""
    table = SeatTable()
    assert table.allocation("cad") == 0
    assert table.free("cad") == 0
    with pytest.raises(NoSeats):
        table.reserve(lease(1))


def test_reserve_up_to_the_allocation_then_no_seats() -> None:
    """Exactly the allocated number of seats can be reserved; the next one is refused."""
    table = SeatTable()
    table.set_allocation("cad", 3)
    for n in range(3):
        table.reserve(lease(n))
    assert table.used("cad") == 3
    assert table.free("cad") == 0
    with pytest.raises(NoSeats, match="all 3 seats of 'cad'"):
        table.reserve(lease(9))
    assert len(table) == 3


def test_multi_seat_lease_counts_its_seats() -> None:
    """A lease of several seats takes them all, and does not fit if fewer are free."""
    table = SeatTable()
    table.set_allocation("cad", 5)
    table.reserve(lease(1, count=3))
    with pytest.raises(NoSeats):
        table.reserve(lease(2, count=3))
    table.reserve(lease(3, count=2))
    assert table.used("cad") == 5


def test_features_are_counted_apart() -> None:
    """Seats of one feature never count against another."""
    table = SeatTable()
    table.set_allocation("cad", 1)
    table.set_allocation("viewer", 1)
    table.reserve(lease(1, "cad"))
    table.reserve(lease(2, "viewer"))
    assert table.used("cad") == table.used("viewer") == 1
    assert table.allocations() == {"cad": 1, "viewer": 1}


def test_same_lease_id_twice_is_refused() -> None:
    """Reserving an id already held is a programming error, not a second seat."""
    table = SeatTable()
    table.set_allocation("cad", 5)
    table.reserve(lease(1))
    with pytest.raises(ValueError, match="already held"):
        table.reserve(lease(1))
    assert table.used("cad") == 1


def test_hold_ignores_the_allocation() -> None:
    """Leases loaded from the store are held even past the allocation; free stays >= 0."""
    table = SeatTable()
    table.set_allocation("cad", 1)
    table.hold(lease(1))
    table.hold(lease(2))
    assert table.used("cad") == 2
    assert table.free("cad") == 0
    with pytest.raises(NoSeats):
        table.reserve(lease(3))


def test_shrinking_the_allocation_keeps_leases() -> None:
    """A smaller allocation frees nothing that is held; it only stops new reservations."""
    table = SeatTable()
    table.set_allocation("cad", 3)
    table.reserve(lease(1))
    table.reserve(lease(2))
    table.set_allocation("cad", 1)
    assert table.used("cad") == 2
    assert table.free("cad") == 0
    with pytest.raises(NoSeats):
        table.reserve(lease(3))


def test_release_frees_seats_once() -> None:
    """Releasing returns the lease and frees its seats; a second release returns None."""
    table = SeatTable()
    table.set_allocation("cad", 2)
    held = lease(1, count=2)
    table.reserve(held)
    assert table.release(held.lease_id) == held
    assert table.used("cad") == 0
    assert table.release(held.lease_id) is None
    assert table.used("cad") == 0
    assert table.get(held.lease_id) is None


def test_renew_pushes_expiry_and_unknown_is_none() -> None:
    """Renewal replaces the expiry of a held lease; an unknown id is reported as None."""
    table = SeatTable()
    table.set_allocation("cad", 1)
    table.reserve(lease(1, expires_at=10.0))
    renewed = table.renew(lease(1).lease_id, 50.0)
    assert renewed is not None and renewed.expires_at == 50.0
    assert table.get(lease(1).lease_id).expires_at == 50.0
    assert table.renew(lease(2).lease_id, 50.0) is None


def test_expire_releases_at_or_before_now() -> None:
    """Expiry is inclusive of ``now``, returns the leases, and frees their seats."""
    table = SeatTable()
    table.set_allocation("cad", 3)
    table.reserve(lease(1, expires_at=10.0))
    table.reserve(lease(2, expires_at=20.0))
    table.reserve(lease(3, expires_at=30.0))
    assert table.expire(9.99) == []
    assert [x.lease_id for x in table.expire(20.0)] == [lease(1).lease_id, lease(2).lease_id]
    assert table.used("cad") == 1
    assert [x.lease_id for x in table.leases()] == [lease(3).lease_id]


def test_expire_skips_renewed_leases() -> None:
    """A renewed lease is not expired by the stale heap entry of its old expiry."""
    table = SeatTable()
    table.set_allocation("cad", 1)
    table.reserve(lease(1, expires_at=10.0))
    table.renew(lease(1).lease_id, 40.0)
    assert table.expire(15.0) == []
    assert table.used("cad") == 1
    assert len(table.expire(40.0)) == 1
    assert table.used("cad") == 0


def test_released_lease_is_not_expired_later() -> None:
    """A lease checked in before its expiry is not returned again by expire."""
    table = SeatTable()
    table.set_allocation("cad", 1)
    table.reserve(lease(1, expires_at=10.0))
    table.release(lease(1).lease_id)
    assert table.expire(100.0) == []
    assert table.used("cad") == 0


def test_many_renewals_keep_the_heap_bounded() -> None:
    """Stale heap entries from renewals are compacted, so memory does not grow per heartbeat."""
    table = SeatTable()
    table.set_allocation("cad", 2)
    table.reserve(lease(1, expires_at=1.0))
    table.reserve(lease(2, expires_at=1.0))
    for n in range(5000):
        table.renew(lease(1).lease_id, 10.0 + n)
        table.renew(lease(2).lease_id, 10.0 + n)
        table.expire(0.5)
    assert len(table._expiry) <= 4 * len(table) + 1024 + 1
    assert table.expire(5008.0) == []
    assert len(table.expire(5009.0)) == 2


class SeatMachine(RuleBasedStateMachine):
    """Random reserve/renew/release/expire/allocate sequences against a plain model.

    The model is a dict of held leases; the table must agree on what is held
    and on the count used, and a reservation succeeds exactly when it fits.
    """

    def __init__(self) -> None:
        super().__init__()
        self.table = SeatTable()
        self.model: dict[str, Lease] = {}
        self.allocation = {"a": 0, "b": 0}
        self.now = 0.0
        self.next_id = 0

    @rule(feature=st.sampled_from("ab"), seats=st.integers(0, 6))
    def allocate(self, feature: str, seats: int) -> None:
        self.table.set_allocation(feature, seats)
        self.allocation[feature] = seats

    @rule(feature=st.sampled_from("ab"), count=st.integers(1, 3), ttl=st.floats(0.5, 20))
    def reserve(self, feature: str, count: int, ttl: float) -> None:
        self.next_id += 1
        new = lease(self.next_id, feature, count, self.now + ttl)
        used = sum(x.count for x in self.model.values() if x.feature == feature)
        if used + count <= self.allocation[feature]:
            self.table.reserve(new)
            self.model[new.lease_id] = new
        else:
            with pytest.raises(NoSeats):
                self.table.reserve(new)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), ttl=st.floats(0.5, 20))
    def renew(self, data: st.DataObject, ttl: float) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.model)))
        renewed = self.table.renew(lease_id, self.now + ttl)
        self.model[lease_id] = renewed

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.model)))
        assert self.table.release(lease_id) == self.model.pop(lease_id)

    @rule(step=st.floats(0, 10))
    def expire(self, step: float) -> None:
        self.now += step
        gone = {x.lease_id for x in self.table.expire(self.now)}
        expected = {k for k, v in self.model.items() if v.expires_at <= self.now}
        assert gone == expected
        for k in gone:
            del self.model[k]

    @invariant()
    def agrees_with_model(self) -> None:
        assert {x.lease_id: x for x in self.table.leases()} == self.model
        for feature in "ab":
            used = sum(x.count for x in self.model.values() if x.feature == feature)
            assert self.table.used(feature) == used
            assert self.table.free(feature) == max(0, self.allocation[feature] - used)


TestSeatMachine = SeatMachine.TestCase
TestSeatMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestSeatMachine.__doc__ = "SeatTable agrees with a plain model under random operation sequences."
