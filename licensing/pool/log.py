"""The in-memory copy of a member's Raft log: the entries after its snapshot.

The store holds the durable copy; ``RaftNode`` changes both in the same
order. Keeping this one separate lets Raft read terms and slices without a
round trip to the store.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..records import LogEntry

# What one entry costs on the wire beyond its data (index and term varints,
# length prefix): used to keep AppendEntries under the batch bound.
ENTRY_OVERHEAD = 24


def entry_cost(entry: LogEntry) -> int:
    """Bytes ``entry`` adds to an AppendEntries message, at most."""
    return len(entry.data) + ENTRY_OVERHEAD


class RaftLog:
    """Entries ``snapshot_index + 1 .. last_index`` and the snapshot's (index, term)."""

    def __init__(self, snapshot_index: int = 0, snapshot_term: int = 0) -> None:
        self.snapshot_index = snapshot_index
        self.snapshot_term = snapshot_term
        self._entries: list[LogEntry] = []

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self.snapshot_term

    def term_at(self, index: int) -> int | None:
        """The term of the entry at ``index``; None if compacted away or not there yet.

        Index 0 has term 0, so every log matches an empty prefix.
        """
        if index == self.snapshot_index:
            return self.snapshot_term
        if self.snapshot_index < index <= self.last_index:
            return self._entries[index - self.snapshot_index - 1].term
        return None

    def entry(self, index: int) -> LogEntry:
        """The entry at ``index``, which must be after the snapshot and in the log."""
        if not self.snapshot_index < index <= self.last_index:
            raise IndexError(f"log entry {index} is not held in memory")
        return self._entries[index - self.snapshot_index - 1]

    def entries_from(self, start: int, max_bytes: int) -> tuple[LogEntry, ...]:
        """Entries from ``start`` on, at least one if there is one, within ``max_bytes``."""
        first = start - self.snapshot_index - 1
        if first < 0:
            raise IndexError(f"log entry {start} was compacted into the snapshot")
        batch: list[LogEntry] = []
        size = 0
        for entry in self._entries[first:]:
            size += entry_cost(entry)
            if batch and size > max_bytes:
                break
            batch.append(entry)
        return tuple(batch)

    def append(self, entries: Iterable[LogEntry]) -> None:
        """Add entries that continue the log."""
        for entry in entries:
            if entry.index != self.last_index + 1:
                raise ValueError(f"entry {entry.index} does not follow {self.last_index}")
            self._entries.append(entry)

    def truncate_from(self, index: int) -> None:
        """Drop every entry at ``index`` and after (never the snapshot)."""
        if index <= self.snapshot_index:
            raise ValueError(f"cannot truncate at {index}: compacted up to {self.snapshot_index}")
        del self._entries[index - self.snapshot_index - 1 :]

    def compact_to(self, index: int, term: int) -> None:
        """The snapshot now covers everything up to ``index`` (whose entry had ``term``)."""
        if index <= self.snapshot_index:
            return
        del self._entries[: index - self.snapshot_index]
        self.snapshot_index = index
        self.snapshot_term = term

    def reset(self, index: int, term: int) -> None:
        """Drop every entry; the log now starts after a snapshot at (``index``, ``term``)."""
        self._entries = []
        self.snapshot_index = index
        self.snapshot_term = term

    def first_index_of_term(self, index: int) -> int:
        """The first index of the run of entries that share ``index``'s term, back to the snapshot."""
        term = self.term_at(index)
        while index - 1 > self.snapshot_index and self.term_at(index - 1) == term:
            index -= 1
        return index

    def last_index_of_term(self, term: int) -> int | None:
        """The last index held in memory whose entry has ``term``, if any."""
        for entry in reversed(self._entries):
            if entry.term == term:
                return entry.index
            if entry.term < term:
                return None
        return None
