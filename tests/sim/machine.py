"""The state machine the simulation replicates: a ledger of entries and a license sequence."""

from __future__ import annotations

import base64
import json

from zope.interface import implementer

from licensing.interfaces import IRecordStateMachine

LICENSE_PREFIX = b"license:"


def license_entry(sequence: int) -> bytes:
    """An entry installing a license file with ``sequence`` (kept only if higher)."""
    return LICENSE_PREFIX + str(sequence).encode()


class LicenseCell:
    """The license a member has installed in its store: survives its crashes.

    Mirrors the real server, which saves an installed license file durably
    before acting on it and reloads it at start-up.
    """

    def __init__(self) -> None:
        self.sequence = 0

    def install(self, sequence: int) -> None:
        self.sequence = max(self.sequence, sequence)


@implementer(IRecordStateMachine)
class LedgerMachine:
    """Remembers every applied (index, data) and the highest license sequence seen.

    Raises AssertionError if Raft breaks its side of the contract (a no-op
    passed in, an index applied twice or out of order).
    """

    def __init__(self, cell: LicenseCell) -> None:
        self._cell = cell
        self.history: list[tuple[int, bytes]] = []
        self.max_sequence = 0
        self.restores = 0

    @property
    def last_index(self) -> int:
        return self.history[-1][0] if self.history else 0

    def apply(self, index: int, data: bytes) -> object:
        if not data:
            raise AssertionError(f"no-op entry {index} was given to the state machine")
        if index <= self.last_index:
            raise AssertionError(f"entry {index} applied after {self.last_index}")
        self.history.append((index, data))
        if data.startswith(LICENSE_PREFIX):
            sequence = int(data[len(LICENSE_PREFIX):])
            if sequence > self.max_sequence:
                self.max_sequence = sequence
                self._cell.install(sequence)
        return len(self.history)

    def snapshot(self) -> bytes:
        return json.dumps({
            "history": [[index, base64.b64encode(data).decode()] for index, data in self.history],
            "max": self.max_sequence,
        }).encode()

    def restore(self, data: bytes) -> None:
        state = json.loads(data)
        self.history = [(index, base64.b64decode(text)) for index, text in state["history"]]
        self.max_sequence = state["max"]
        self._cell.install(self.max_sequence)
        self.restores += 1
