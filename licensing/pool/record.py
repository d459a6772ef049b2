"""The authoritative record: the state machine every member applies from the log.

Entries are small JSON documents. Applying one is deterministic and never
raises for a well-formed entry, so every member that applies the same log
holds the same record: the license file and its sequence number, every
member's allocation of every feature, and the leases each member reported.
"""

from __future__ import annotations

import base64
import json
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from twisted.logger import Logger
from zope.interface import implementer

from ..errors import LicenseFileError
from ..interfaces import IRecordStateMachine
from ..license import License

log = Logger()

LICENSE = "license"
ALLOCATION = "allocation"
REPORT = "report"
ADOPT = "adopt"
APPLIED = "applied"
"""Observers hear this after every entry and snapshot, with the index now applied."""

HISTORY = 64
"""Allocation changes remembered per feature and member, for ``highest_since``."""

LEASE_FIELDS = ("lease_id", "feature", "version", "client_id", "user", "host", "count", "server")


class RecordLease(NamedTuple):
    """One lease as the record lists it.

    A tuple, not a dict, with its repeated text shared: every member keeps
    every lease of the pool, and a dict of nine fields costs more than the
    lease itself is worth (DESIGN.md, memory per lease).
    """

    lease_id: str
    feature: str
    version: str
    client_id: str
    user: str
    host: str
    count: int
    server: str

    @classmethod
    def from_doc(cls, doc: dict[str, Any], server: str) -> RecordLease:
        """From a lease document of a report or adoption entry, held by ``server``."""
        intern = sys.intern
        return cls(str(doc["lease_id"]), intern(doc["feature"]), intern(doc["version"]),
                   intern(doc["client_id"]), intern(doc["user"]), intern(doc["host"]), int(doc["count"]),
                   intern(server))

    @classmethod
    def from_snapshot(cls, lease_id: str, value: list[Any] | dict[str, Any]) -> RecordLease:
        """From a snapshot: the fields after ``lease_id`` in order, or a dict (older snapshots)."""
        if isinstance(value, dict):
            return cls.from_doc({**value, "lease_id": lease_id}, value["server"])
        feature, version, client_id, user, host, count, server = value
        intern = sys.intern
        return cls(str(lease_id), intern(feature), intern(version), intern(client_id), intern(user),
                   intern(host), int(count), intern(server))

    def snapshot_value(self) -> list[Any]:
        """What :meth:`from_snapshot` reads back: the fields after ``lease_id``."""
        return list(self[1:])


def license_entry(sequence: int, data: bytes) -> bytes:
    """A license file to install, if its sequence is higher than the record's."""
    return _encode({"t": LICENSE, "seq": sequence, "data": base64.b64encode(data).decode()})


def allocation_entry(feature: str, changes: dict[str, int], expect: dict[str, int] | None = None) -> bytes:
    """New allocations of one feature for some members (the rest unchanged).

    ``expect`` holds the allocations the leader based the change on; the
    entry is void if any differs when it is applied, so two changes decided
    on the same state can never both take effect.
    """
    return _encode({"t": ALLOCATION, "feature": feature, "set": changes, "if": expect or {}})


def report_entry(server: str, added: Sequence[dict[str, Any]], removed: Sequence[str],
                 full: bool = False) -> bytes:
    """A member's lease changes since its last merged report; ``full`` replaces its set."""
    return _encode({"t": REPORT, "server": server, "added": list(added), "removed": list(removed),
                    "full": full})


def adopt_entry(lease: dict[str, Any], source: str | None, to: str) -> bytes:
    """The leader converted a lease that ``source`` issued (F8)."""
    return _encode({"t": ADOPT, "lease": lease, "from": source, "to": to})


def _encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


@implementer(IRecordStateMachine)
class Record:
    """The record as one member holds it; ``verify`` parses a signed license file."""

    def __init__(self, members: Sequence[str], verify: Callable[[bytes], License]) -> None:
        self.members = tuple(members)
        self.verify = verify
        self.license: License | None = None
        self.license_data: bytes | None = None
        self.allocations: dict[str, dict[str, int]] = {}
        self.leases: dict[str, RecordLease] = {}
        self._used: dict[tuple[str, str], int] = {}
        """(feature, member) -> seats the member's leases in the record use."""
        self.applied = 0
        self.shrunk_at: dict[str, int] = {}
        self.shrinks: dict[str, dict[str, int]] = {}
        """feature -> member -> index of the last entry that lowered that allocation."""
        self.changes: dict[str, dict[str, int]] = {}
        """feature -> member -> index of the last entry that changed that allocation."""
        self._history: dict[tuple[str, str], deque[tuple[int, int]]] = {}
        """(feature, member) -> the latest (index, allocation after it) changes, oldest first."""
        self._history_from = 0
        """Changes before this index may be missing from the history (a restored snapshot)."""
        self.observers: list[Callable[[str, Any], None]] = []

    @property
    def sequence(self) -> int:
        return self.license.sequence if self.license else 0

    def allocation(self, feature: str, member: str) -> int:
        return self.allocations.get(feature, {}).get(member, 0)

    def held_by(self, member: str) -> dict[str, RecordLease]:
        return {k: v for k, v in self.leases.items() if v.server == member}

    def used(self, feature: str, member: str) -> int:
        return self._used.get((feature, member), 0)

    def _put(self, lease: RecordLease) -> None:
        self._drop(lease.lease_id)
        self.leases[lease.lease_id] = lease
        key = (lease.feature, lease.server)
        self._used[key] = self._used.get(key, 0) + lease.count

    def _drop(self, lease_id: str) -> None:
        lease = self.leases.pop(lease_id, None)
        if lease is not None:
            key = (lease.feature, lease.server)
            left = self._used[key] - lease.count
            if left:
                self._used[key] = left
            else:
                del self._used[key]

    def _notify(self, kind: str, detail: Any) -> None:
        for observer in self.observers:
            observer(kind, detail)

    def apply(self, index: int, data: bytes) -> object:
        self.applied = index
        result = self._apply(index, data)
        self._notify(APPLIED, index)
        return result

    def _apply(self, index: int, data: bytes) -> object:
        try:
            doc = json.loads(data)
            kind = doc["t"]
        except (ValueError, KeyError, TypeError):
            log.error("record entry {index} is not a valid entry; skipped", index=index)
            return None
        handler = getattr(self, f"_apply_{kind}", None)
        if handler is None:
            log.error("record entry {index} has unknown type {kind!r}; skipped", index=index, kind=kind)
            return None
        before = {f: dict(v) for f, v in self.allocations.items()}
        result = handler(doc)
        self._shrinks(index, before)
        return result

    def _shrinks(self, index: int, before: dict[str, dict[str, int]]) -> None:
        """Remember the last entry that lowered or changed each allocation.

        Moving seats waits until every member has applied the entry that
        lowered its allocation; a member's offer of seats counts only if it
        was made after the last change of its allocation.
        """
        for feature, shares in self.allocations.items():
            old = before.get(feature, {})
            for member, seats in shares.items():
                if seats < old.get(member, seats):
                    self.shrunk_at[member] = index
                    self.shrinks.setdefault(feature, {})[member] = index
                if seats != old.get(member, 0):
                    self.changes.setdefault(feature, {})[member] = index
                    history = self._history.get((feature, member))
                    if history is None:
                        history = self._history[(feature, member)] = deque(maxlen=HISTORY)
                    history.append((index, seats))

    def _apply_license(self, doc: dict[str, Any]) -> int:
        sequence = int(doc["seq"])
        if sequence <= self.sequence:
            log.info("license sequence {seq} is not newer than {current}; the record keeps {current}",
                     seq=sequence, current=self.sequence)
            return self.sequence
        data = base64.b64decode(doc["data"])
        try:
            lic = self.verify(data)
        except LicenseFileError as e:
            log.error("committed license sequence {seq} does not verify here: {error}",
                      seq=sequence, error=str(e))
            return self.sequence
        first = self.license is None
        self.license, self.license_data = lic, data
        for feature in lic.features.values():
            if first or feature.name not in self.allocations:
                self.allocations[feature.name] = feature.allocations(self.members)
            else:
                self._fit(feature.name, feature.count)
        for name in list(self.allocations):
            if name not in lic.features:
                del self.allocations[name]
        self._notify(LICENSE, lic)
        self._notify(ALLOCATION, None)
        return sequence

    def _fit(self, feature: str, count: int) -> None:
        """A new file changed a feature's count: shrink from the largest allocations,
        or give the surplus to the members in order. Growth waits for the
        shrink to be applied, because it is the same entry."""
        shares = self.allocations[feature]
        total = sum(shares.values())
        while total > count:
            member = max(shares, key=lambda m: (shares[m], m))
            shares[member] -= 1
            total -= 1
        i = 0
        while total < count:
            member = self.members[i % len(self.members)]
            shares[member] = shares.get(member, 0) + 1
            total += 1
            i += 1

    def _apply_allocation(self, doc: dict[str, Any]) -> bool:
        feature = doc["feature"]
        if self.license is None or self.license.feature(feature) is None:
            return False
        shares = dict(self.allocations.get(feature, {}))
        if any(shares.get(m, 0) != int(n) for m, n in doc.get("if", {}).items()):
            log.info("allocation change of {feature} is void: decided on an older allocation",
                     feature=feature)
            return False
        shares.update({m: int(n) for m, n in doc["set"].items() if m in self.members and int(n) >= 0})
        if sum(shares.values()) > self.license.features[feature].count:
            log.error("allocation entry for {feature} would exceed the count; skipped", feature=feature)
            return False
        self.allocations[feature] = shares
        self._notify(ALLOCATION, feature)
        return True

    def _apply_report(self, doc: dict[str, Any]) -> None:
        server = doc["server"]
        if doc.get("full"):
            for lease_id in [k for k, v in self.leases.items() if v.server == server]:
                self._drop(lease_id)
        for lease_id in doc["removed"]:
            held = self.leases.get(lease_id)
            if held is not None and held.server == server:
                self._drop(lease_id)
        for lease in doc["added"]:
            self._put(RecordLease.from_doc(lease, server))

    def _apply_adopt(self, doc: dict[str, Any]) -> None:
        lease = RecordLease.from_doc(doc["lease"], doc["to"])
        self._put(lease)
        self._notify(ADOPT, lease)

    def highest_since(self, feature: str, member: str, applied: int) -> int | None:
        """The most seats of ``feature`` that ``member`` may act on if it has applied
        ``applied``: its allocation at that index or after; None if that is not known.

        A member acts on the allocation of the last entry it applied, which
        only moves forward (after a restart it applies up to a commit the
        leader confirmed before it acts). While it has not yet applied a
        shrink, the leader can still hand out the seats above this bound.
        """
        history = self._history.get((feature, member), ())
        highest = self.allocation(feature, member)
        at_applied: int | None = None
        for index, seats in reversed(history):
            if index <= applied:
                at_applied = seats
                break
            highest = max(highest, seats)
        if at_applied is None:
            full = history.maxlen is not None and len(history) == history.maxlen
            if applied < self._history_from or full:
                return None
            at_applied = 0
        return max(highest, at_applied)

    def unassigned(self, feature: str) -> int:
        """Seats of ``feature`` that no member's allocation holds (reclaimed, not yet given)."""
        if self.license is None or self.license.feature(feature) is None:
            return 0
        return self.license.features[feature].count - sum(self.allocations.get(feature, {}).values())

    def snapshot(self) -> bytes:
        return _encode({
            "applied": self.applied,
            "license": base64.b64encode(self.license_data).decode() if self.license_data else None,
            "allocations": self.allocations,
            "shrunk_at": self.shrunk_at,
            "shrinks": self.shrinks,
            "changes": self.changes,
            "leases": {k: v.snapshot_value() for k, v in self.leases.items()},
        })

    def restore(self, data: bytes) -> None:
        doc = json.loads(data)
        self.applied = doc["applied"]
        self.allocations = {f: dict(v) for f, v in doc["allocations"].items()}
        self.leases = {}
        self._used = {}
        for lease_id, value in doc["leases"].items():
            self._put(RecordLease.from_snapshot(lease_id, value))
        self.shrunk_at = dict(doc.get("shrunk_at", {}))
        self.shrinks = {f: dict(v) for f, v in doc.get("shrinks", {}).items()}
        self.changes = {f: dict(v) for f, v in doc.get("changes", {}).items()}
        self._history_from = self.applied
        self._history = {(f, m): deque([(self.applied, shares.get(m, 0))], maxlen=HISTORY)
                         for f, shares in self.allocations.items() for m in self.members}
        self.license = self.license_data = None
        if doc["license"]:
            raw = base64.b64decode(doc["license"])
            try:
                self.license, self.license_data = self.verify(raw), raw
            except LicenseFileError as e:
                log.error("license in the snapshot does not verify here: {error}", error=str(e))
        if self.license is not None:
            self._notify(LICENSE, self.license)
        self._notify(ALLOCATION, None)
        self._notify(APPLIED, self.applied)
