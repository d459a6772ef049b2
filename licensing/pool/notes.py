"""Messages members exchange beside consensus: status notes, lease reports, license offers.

They travel over the same peer links as the consensus messages, tagged so the
receiver can tell them apart. They are hints and requests, never decisions:
whatever they cause goes through the log.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import BadRequest


@dataclass(frozen=True)
class MemberNote:
    """A member's own state, broadcast every ``status_report`` seconds."""

    name: str
    role: str
    term: int
    commit_index: int
    license_sequence: int
    last_applied: int = 0
    pledges: dict[str, list[int]] = field(default_factory=dict)
    """feature -> [base allocation, seats]: seats this member stopped using, for the leader to move."""


@dataclass(frozen=True)
class LeaseReport:
    """A follower's lease changes since its last acknowledged report (F3)."""

    report_id: int
    added: list[dict[str, Any]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReportAck:
    """The leader merged report ``report_id`` into the committed record."""

    report_id: int


@dataclass(frozen=True)
class SeatRequest:
    """A member ran out of ``feature``: the leader should move ``count`` seats to it."""

    feature: str
    count: int


@dataclass(frozen=True)
class PledgeRequest:
    """The leader asks a member with free seats to stop using ``count`` of them."""

    feature: str
    count: int


@dataclass(frozen=True)
class LicenseOffer:
    """A member holds a license file newer than the record's; the leader should commit it."""

    data: str  # latin-1 text of the signed file bytes


NOTES: dict[str, type] = {
    cls.__name__: cls
    for cls in (MemberNote, LeaseReport, ReportAck, LicenseOffer, SeatRequest, PledgeRequest)
}


def encode_note(note: object) -> bytes:
    return json.dumps({"k": type(note).__name__, **asdict(note)}, separators=(",", ":")).encode()


def decode_note(data: bytes) -> object:
    """Parse a note; anything malformed is a BadRequest, never another exception."""
    try:
        doc = json.loads(data)
        cls = NOTES[doc.pop("k")]
        return cls(**doc)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise BadRequest(f"malformed pool note: {type(e).__name__}") from None
