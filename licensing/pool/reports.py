"""Lease reports (F3): each member tells the leader which leases it holds.

A member sends the difference between the leases in its seat table and the
leases the record says it holds; the leader merges it through the log and
acknowledges it once committed. One report is in flight at a time, sent
again if no acknowledgement came within a few status periods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from ..errors import BadRequest
from ..records import Lease
from . import record as entries
from .notes import LeaseReport, ReportAck

if TYPE_CHECKING:
    from ..config import Timings
    from ..interfaces import IPeerNetwork
    from ..seats import SeatTable
    from .raft import RaftNode
    from .record import Record

log = Logger()

MAX_REPORT = 1000
"""Leases per report entry (about 250 KB): a busy member's first report takes a few entries."""


def lease_doc(lease: Lease) -> dict[str, Any]:
    """The fields of ``lease`` that the record keeps, as report and adoption entries carry them."""
    return {k: getattr(lease, k) for k in entries.LEASE_FIELDS}


def _check_lease_doc(doc: Any, server: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise BadRequest("a reported lease must be an object")
    out = {}
    for key in entries.LEASE_FIELDS:
        value = doc.get(key)
        if key == "count":
            if not isinstance(value, int) or not 1 <= value <= 10_000:
                raise BadRequest("reported lease count out of range")
        elif not isinstance(value, str) or len(value) > 256:
            raise BadRequest(f"reported lease {key} must be short text")
        out[key] = value
    out["server"] = server
    return out


class LeaseReports:
    """A member's side of the lease reports (sending its own) and the leader's (merging others').

    ``propose`` puts an entry in the log and fires with its index once
    committed, or with None if this member could not propose it.
    """

    def __init__(
        self,
        name: str,
        node: RaftNode,
        record: Record,
        seats: SeatTable,
        network: IPeerNetwork,
        clock: Any,
        timings: Timings,
        propose: Callable[[bytes], Deferred[int]],
    ) -> None:
        self._name = name
        self._node = node
        self._record = record
        self._seats = seats
        self._network = network
        self._clock = clock
        self._timings = timings
        self._propose = propose
        self._report_id = 0
        self._in_flight: LeaseReport | None = None
        self._in_flight_at = 0.0
        self._clean: tuple[int, int] | None = None
        """(seat table changes, applied index) when a comparison last found nothing to report."""

    def report(self) -> None:
        """Send the leader what changed since the record last heard, unless a report is in flight."""
        leader = self._node.leader
        if leader is None:
            return
        now = self._clock.seconds()
        if self._in_flight is not None and now - self._in_flight_at < 3 * self._timings.status_report:
            return
        # Neither the seat table nor the record changed since a comparison
        # found them equal: skip comparing them. With 100,000 leases the
        # comparison holds the reactor for tens of milliseconds every status
        # period (bench scale scenario), which delayed peer messages until
        # allocation leases lapsed and members answered NoQuorum.
        state = (self._seats.changes, self._node.last_applied)
        if self._in_flight is None and state == self._clean:
            return
        # The difference between what this member holds and what the record
        # says it holds: also right after a restart, when the record still
        # lists leases that ended while this member was down.
        current = {lease.lease_id: lease for lease in self._seats.leases()}
        recorded = self._record.held_by(self._name)
        added = [lease_doc(current[k]) for k in sorted(current.keys() - recorded.keys())][:MAX_REPORT]
        removed = sorted(recorded.keys() - current.keys())[:MAX_REPORT]
        if not added and not removed:
            self._in_flight = None
            self._clean = state
            return
        self._report_id += 1
        report = LeaseReport(self._report_id, added, removed)
        self._in_flight, self._in_flight_at = report, now
        if leader == self._name:
            if self._node.role == "leader":
                rid = report.report_id
                self._propose(entries.report_entry(self._name, added, removed)).addCallback(
                    lambda index: index is not None and self.acked(rid))
        else:
            self._network.send(leader, report)

    def acked(self, report_id: int) -> None:
        """Report ``report_id`` is in the committed record: the next one may go."""
        report = self._in_flight
        if report is not None and report.report_id == report_id:
            self._in_flight = None

    def forget_in_flight(self) -> None:
        """The leader changed: the next status period reports again, to the new one."""
        self._in_flight = None

    def merge(self, sender: str, report: LeaseReport) -> None:
        """Leader: put ``sender``'s report in the log and acknowledge it once committed."""
        if self._node.role != "leader":
            return
        try:
            added = [_check_lease_doc(doc, sender) for doc in report.added[:MAX_REPORT]]
            removed = [r for r in report.removed[:MAX_REPORT] if isinstance(r, str)]
        except BadRequest as e:
            log.warn("lease report from {sender} refused: {error}", sender=sender, error=str(e))
            return
        rid = report.report_id
        self._propose(entries.report_entry(sender, added, removed)).addCallback(
            lambda index: index is not None and self._network.send(sender, ReportAck(rid)))
