"""The seats this server hands out: its allocation per feature and its leases.

Everything here is synchronous and in memory so that counts stay exact under
any number of concurrent checkouts: a seat is reserved here before the store
write starts, and given back if the write fails.
"""

from __future__ import annotations

import heapq
from .errors import NoSeats
from .records import Lease


class SeatTable:
    """Leases held by one server, checked against its allocation of each feature."""

    def __init__(self) -> None:
        self._allocation: dict[str, int] = {}
        self._used: dict[str, int] = {}
        self._leases: dict[str, Lease] = {}
        self._expiry: list[tuple[float, str]] = []
        self.changes = 0
        """Counts every lease added or dropped, so the pool's lease reports can tell
        in O(1) that nothing changed since they last compared the whole table."""

    def allocation(self, feature: str) -> int:
        """How many seats of ``feature`` this server may have in use."""
        return self._allocation.get(feature, 0)

    def set_allocation(self, feature: str, seats: int) -> None:
        """Change the allocation; leases already held stay (the pool shrinks only free seats)."""
        self._allocation[feature] = seats

    def allocations(self) -> dict[str, int]:
        return dict(self._allocation)

    def used(self, feature: str) -> int:
        """Seats of ``feature`` held by live leases here."""
        return self._used.get(feature, 0)

    def free(self, feature: str) -> int:
        return max(0, self.allocation(feature) - self.used(feature))

    def get(self, lease_id: str) -> Lease | None:
        return self._leases.get(lease_id)

    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    def __len__(self) -> int:
        return len(self._leases)

    def reserve(self, lease: Lease) -> None:
        """Take the lease's seats from the allocation, or raise NoSeats."""
        if lease.lease_id in self._leases:
            raise ValueError(f"lease {lease.lease_id} is already held")
        used = self.used(lease.feature)
        if used + lease.count > self.allocation(lease.feature):
            raise NoSeats(
                f"all {self.allocation(lease.feature)} seats of {lease.feature!r} that this server "
                f"may issue are in use; retry later or check in a lease"
            )
        self.hold(lease)

    def hold(self, lease: Lease) -> None:
        """Record a lease without checking the allocation (leases loaded from the store)."""
        self._leases[lease.lease_id] = lease
        self._used[lease.feature] = self.used(lease.feature) + lease.count
        self.changes += 1
        heapq.heappush(self._expiry, (lease.expires_at, lease.lease_id))

    def renew(self, lease_id: str, expires_at: float) -> Lease | None:
        """Push a held lease's expiry out; None if it is not held here.

        O(1) for the usual later deadline: the expiry heap keeps the old one,
        and ``expire`` moves the entry on when it finds the lease renewed since.
        """
        lease = self._leases.get(lease_id)
        if lease is None:
            return None
        if expires_at < lease.expires_at:
            # Rare (a new license with a shorter TTL): the heap must see the earlier deadline.
            heapq.heappush(self._expiry, (expires_at, lease_id))
        lease.expires_at = expires_at
        return lease

    def release(self, lease_id: str) -> Lease | None:
        """Drop a lease and free its seats; None if it was not held here."""
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            self._used[lease.feature] -= lease.count
            self.changes += 1
        return lease

    def expire(self, now: float, limit: int | None = None) -> list[Lease]:
        """Release and return leases whose expiry is at or before ``now`` (at most ``limit``).

        Heap entries of renewed leases are pushed on to their new deadline
        here rather than at every renewal; entries of released leases drop out.
        """
        expired: list[Lease] = []
        while self._expiry and self._expiry[0][0] <= now:
            if limit is not None and len(expired) >= limit:
                break
            when, lease_id = heapq.heappop(self._expiry)
            lease = self._leases.get(lease_id)
            if lease is None:
                continue
            if lease.expires_at > when:
                heapq.heappush(self._expiry, (lease.expires_at, lease_id))
                continue
            self.release(lease_id)
            expired.append(lease)
        if len(self._expiry) > 4 * len(self._leases) + 1024:
            self._expiry = [(lease.expires_at, lease.lease_id) for lease in self._leases.values()]
            heapq.heapify(self._expiry)
        return expired
