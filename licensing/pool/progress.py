"""What a leader knows about one follower: how far its log matches, what is in
flight, and the clock readings that bound the follower's leases."""

from __future__ import annotations

from dataclasses import dataclass

from ..records import Snapshot

# Batches a leader sends ahead of acknowledgements to a follower it believes
# in step, before waiting: enough to fill a round trip, few enough that a
# lost batch costs little.
MAX_INFLIGHT = 4


@dataclass
class Progress:
    """The leader's replication state for one follower, for one term.

    In *probing* mode the leader does not know where the follower's log stops
    matching: it sends one AppendEntries at a time and moves ``next_index``
    back on each refusal. Once one succeeds it *replicates*: it sends batches
    ahead (``next_index`` is optimistic) and, on every heartbeat, resends
    from ``match_index + 1`` whatever was not yet acknowledged.
    """

    next_index: int
    match_index: int = 0
    probing: bool = True
    inflight: int = 0
    commit_sent: int = 0
    # The snapshot being sent, and how many of its bytes the follower holds.
    snapshot: Snapshot | None = None
    snapshot_offset: int = 0
    # Clock readings (see licensing.pool.messages): the latest send time of
    # ours the follower acknowledged, the latest time of its own it stamped
    # on a reply we got, and the latest such time we know it saw us echo.
    acked: float | None = None
    peer_time: float | None = None
    lease_from: float | None = None

    def note_reply(self, sent_at: float, time: float, peer_time: float | None) -> None:
        """Record the clock readings of a reply from the follower."""
        self.acked = sent_at if self.acked is None else max(self.acked, sent_at)
        self.peer_time = time if self.peer_time is None else max(self.peer_time, time)
        if peer_time is not None:
            self.lease_from = (
                peer_time if self.lease_from is None else max(self.lease_from, peer_time)
            )
