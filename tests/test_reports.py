"""Tests for licensing.pool.reports: what a member reports, and when it skips the comparison.

The node, record and network are small stand-ins (the seat simulation runs
the real ones); the seat table is the real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.task import Clock

from licensing.config import Timings
from licensing.pool.notes import LeaseReport
from licensing.pool.reports import LeaseReports
from licensing.records import Lease
from licensing.seats import SeatTable


@dataclass
class Node:
    leader: str = "ls1"
    role: str = "follower"
    last_applied: int = 7


@dataclass
class Record:
    held: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparisons: int = 0

    def held_by(self, member: str) -> dict[str, dict[str, Any]]:
        self.comparisons += 1
        return dict(self.held)


@dataclass
class Network:
    sent: list[tuple[str, object]] = field(default_factory=list)

    def send(self, to: str, message: object) -> None:
        self.sent.append((to, message))


def lease(n: int) -> Lease:
    return Lease(f"{n:032x}", "cad-pro", "2.0", f"app-{n}", "alice", "ws1", 1, "ls2", 0.0, 60.0)


def reporter() -> tuple[LeaseReports, Node, Record, Network, SeatTable]:
    node, record, network, seats = Node(), Record(), Network(), SeatTable()
    seats.set_allocation("cad-pro", 10)
    reports = LeaseReports("ls2", node, record, seats, network, Clock(), Timings(),
                           propose=lambda data: None)
    return reports, node, record, network, seats


def test_nothing_changed_skips_the_comparison() -> None:
    """Once a comparison found nothing to report, the next periods do not compare the
    whole table again until a lease comes or goes or the record applies an entry.

    Regression (bench scale scenario, 100,000 leases): the comparison ran every
    second and held the reactor for tens of milliseconds.
    """
    reports, node, record, network, seats = reporter()
    reports.report()
    reports.report()
    assert record.comparisons == 1 and network.sent == []
    node.last_applied += 1
    reports.report()
    assert record.comparisons == 2


def test_a_new_lease_is_reported_and_then_the_table_is_compared_again() -> None:
    """A lease added after a clean comparison is reported at the next period."""
    reports, node, record, network, seats = reporter()
    reports.report()
    seats.reserve(lease(1))
    reports.report()
    assert record.comparisons == 2
    [(to, message)] = network.sent
    assert to == "ls1" and isinstance(message, LeaseReport)
    assert [doc["lease_id"] for doc in message.added] == [lease(1).lease_id]
    reports.acked(message.report_id)
    record.held[lease(1).lease_id] = {"server": "ls2"}
    node.last_applied += 1
    reports.report()
    assert len(network.sent) == 1 and record.comparisons == 3
    seats.release(lease(1).lease_id)
    reports.report()
    assert network.sent[-1][1].removed == [lease(1).lease_id]


def test_seat_table_counts_every_lease_added_or_dropped() -> None:
    """Renewals leave the change count alone; holding and releasing move it."""
    seats = SeatTable()
    seats.set_allocation("cad-pro", 2)
    before = seats.changes
    seats.reserve(lease(1))
    seats.renew(lease(1).lease_id, 120.0)
    assert seats.changes == before + 1
    seats.release(lease(1).lease_id)
    seats.release(lease(1).lease_id)
    assert seats.changes == before + 2
