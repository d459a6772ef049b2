"""Checks every backend applies the same way, so they cannot drift apart."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import StoreError
from ..records import LogEntry


def check_append(last_index: int, entries: Sequence[LogEntry]) -> None:
    """Refuse entries that do not continue the log right after ``last_index``.

    A gap or an overlap would silently break Raft's log matching later, far
    from the bug that caused it; failing the write points at the caller.
    ``last_index`` is the last stored entry, or the snapshot's index when the
    log after it is empty, or 0 for an empty store.
    """
    expected = last_index + 1
    for entry in entries:
        if entry.index > expected:
            raise StoreError(
                f"log entry {entry.index} cannot be appended: the next index is {expected}"
            )
        if entry.index < expected:
            raise StoreError(
                f"log entry {entry.index} cannot be appended: the log already holds it; "
                f"call truncate_log({entry.index}) first to replace entries"
            )
        expected += 1
