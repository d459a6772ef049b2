"""The messages pool members exchange to run Raft.

Each is a frozen dataclass; ``licensing.pool.codec`` turns any of them into
bytes for the peer transport. The sender of a message is not a field: the
transport knows who is on the other end (from the peer's TLS certificate) and
passes it to ``RaftNode.receive``.

Besides Raft's own fields, the leader's messages and the followers' replies
carry clock readings, so both sides can bound how long the other may still be
acting on their last exchange without comparing clocks:

- ``sent_at`` is the leader's clock when it built the message; replies echo
  it, which tells the leader that a follower heard from it at or after then
  (``RaftNode.acked_within``, the leader lease).
- ``time`` is the follower's clock when it built a reply. The leader hands
  the latest one it received back as ``peer_time``; replies echo that too,
  and the leader then returns it as ``lease_from``. A follower that sees
  ``lease_from`` knows the leader got a reply the follower sent at that time
  and answered it, so its allocation lease may run from there
  (``RaftNode.leader_contact_age``). See docs/pool.md, "Leases".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..records import LogEntry


@dataclass(frozen=True)
class RequestVote:
    """Ask for a vote in ``term``, or (``pre_vote``) whether one would be granted.

    A pre-vote carries the term the candidate would stand in, without the
    candidate moving to it. ``transfer`` marks an election the leader asked
    for (TimeoutNow), which voters honour even while they hear from a leader.
    """

    term: int
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    transfer: bool = False


@dataclass(frozen=True)
class VoteReply:
    """The answer to a RequestVote; ``time`` is the voter's clock when it answered."""

    term: int
    granted: bool
    pre_vote: bool
    time: float


@dataclass(frozen=True)
class AppendEntries:
    """Replicate ``entries`` after (``prev_index``, ``prev_term``); empty: a heartbeat.

    The entries' indices follow ``prev_index`` without gaps.
    """

    term: int
    prev_index: int
    prev_term: int
    entries: tuple[LogEntry, ...]
    commit: int
    sent_at: float
    peer_time: float | None = None
    lease_from: float | None = None


@dataclass(frozen=True)
class AppendReply:
    """The answer to an AppendEntries.

    On success ``match_index`` is the last index known to match the leader's
    log. On failure ``conflict_index`` and ``conflict_term`` (0: none) say where
    the follower's log stops agreeing, so the leader skips a whole term at a
    time instead of one entry per round trip.
    """

    term: int
    success: bool
    match_index: int
    conflict_index: int
    conflict_term: int
    sent_at: float
    peer_time: float | None
    time: float


@dataclass(frozen=True)
class InstallSnapshot:
    """One chunk (``data`` at ``offset``) of the leader's snapshot; ``done`` on the last."""

    term: int
    index: int
    snapshot_term: int
    offset: int
    data: bytes
    done: bool
    sent_at: float
    peer_time: float | None = None
    lease_from: float | None = None


@dataclass(frozen=True)
class SnapshotReply:
    """The answer to an InstallSnapshot chunk.

    ``received`` is how many bytes of that snapshot the follower holds (the
    next chunk starts there); ``installed`` says the whole snapshot is in place.
    """

    term: int
    index: int
    received: int
    installed: bool
    sent_at: float
    peer_time: float | None
    time: float


@dataclass(frozen=True)
class TimeoutNow:
    """The leader hands over: start an election now, ahead of any timeout."""

    term: int


Message = (
    RequestVote | VoteReply | AppendEntries | AppendReply | InstallSnapshot | SnapshotReply
    | TimeoutNow
)
