"""The Raft message codec: exact round trips, compactness, and nothing but BadRequest on garbage."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from licensing.errors import BadRequest
from licensing.pool import codec
from licensing.pool.codec import decode, encode
from licensing.pool.messages import (
    AppendEntries,
    AppendReply,
    InstallSnapshot,
    RequestVote,
    SnapshotReply,
    TimeoutNow,
    VoteReply,
)
from licensing.records import LogEntry

uints = st.integers(min_value=0, max_value=2**63 - 1)
small = st.integers(min_value=0, max_value=10_000)
times = st.floats(allow_nan=False, allow_infinity=False)
optional_times = st.none() | times
blobs = st.binary(max_size=200)


@st.composite
def append_entries(draw: st.DrawFn) -> AppendEntries:
    prev_index = draw(small)
    data = draw(st.lists(st.tuples(small, blobs), max_size=5))
    entries = tuple(LogEntry(prev_index + offset, term, payload)
                    for offset, (term, payload) in enumerate(data, start=1))
    return AppendEntries(draw(uints), prev_index, draw(uints), entries, draw(uints),
                         draw(times), draw(optional_times), draw(optional_times))


messages = st.one_of(
    st.builds(RequestVote, uints, uints, uints, st.booleans(), st.booleans()),
    st.builds(VoteReply, uints, st.booleans(), st.booleans(), times),
    append_entries(),
    st.builds(AppendReply, uints, st.booleans(), uints, uints, uints, times, optional_times, times),
    st.builds(InstallSnapshot, uints, uints, uints, uints, blobs, st.booleans(), times,
              optional_times, optional_times),
    st.builds(SnapshotReply, uints, uints, uints, st.booleans(), times, optional_times, times),
    st.builds(TimeoutNow, uints),
)


@given(messages)
def test_round_trip(message: object) -> None:
    """Every message decodes to an equal message."""
    assert decode(encode(message)) == message  # type: ignore[arg-type]


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_garbage_raises_only_bad_request(data: bytes) -> None:
    """Arbitrary bytes either decode, re-encoding to the very same bytes, or raise BadRequest."""
    try:
        message = decode(data)
    except BadRequest:
        return
    assert encode(message) == data


@given(messages, st.data())
@settings(max_examples=300)
def test_mangled_messages_raise_only_bad_request(message: object, data: st.DataObject) -> None:
    """A real message with bytes flipped, cut or appended decodes canonically or fails cleanly."""
    raw = bytearray(encode(message))  # type: ignore[arg-type]
    how = data.draw(st.sampled_from(("flip", "truncate", "extend")))
    if how == "flip":
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=8))
    try:
        decoded = decode(bytes(raw))
    except BadRequest:
        return
    assert encode(decoded) == bytes(raw)


def test_heartbeat_is_compact() -> None:
    """A heartbeat with small numbers fits in a few dozen bytes."""
    heartbeat = AppendEntries(7, 1200, 7, (), 1200, 12.5, 12.25, 12.0)
    assert len(encode(heartbeat)) < 40


@pytest.mark.parametrize("data, reason", [
    (b"", "truncated"),
    (b"\x02\x07\x01", "version"),
    (b"\x01\x63\x01", "unknown"),
    (b"\x01\x07\x01\x00", "trailing"),
    (b"\x01\x07\x81\x00", "non-minimal"),
    (b"\x01\x07" + b"\xff" * 10 + b"\x01", "too long"),
    (b"\x01\x07\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "out of range"),
    (b"\x01\x01\x01\x01\x01\x02\x00", "boolean"),
    (b"\x01\x02\x01\x00\x00" + struct.pack(">d", float("nan")), "non-finite"),
    (b"\x01\x03\x01\x00\x00\xff\xff\xff\xff\x0f", "truncated"),
])
def test_specific_garbage(data: bytes, reason: str) -> None:
    """Each kind of malformation is refused with a message that says which."""
    with pytest.raises(BadRequest, match=reason):
        decode(data)


def test_non_bytes_is_bad_request() -> None:
    """A transport bug that hands over a str still gets BadRequest, not TypeError."""
    with pytest.raises(BadRequest):
        decode("\x01\x07\x01")  # type: ignore[arg-type]


@pytest.mark.parametrize("message", [
    TimeoutNow(-1),
    RequestVote(1, 0, 0, pre_vote=1),  # type: ignore[arg-type]
    VoteReply(1, True, False, float("inf")),
    AppendEntries(1, 5, 1, (LogEntry(7, 1, b"x"),), 0, 0.0),
    InstallSnapshot(1, 1, 1, 0, "text", True, 0.0),  # type: ignore[arg-type]
    "not a message",
])
def test_encode_refuses_malformed_messages(message: object) -> None:
    """Encoding our own malformed message is a bug, reported as ValueError."""
    with pytest.raises(ValueError):
        encode(message)  # type: ignore[arg-type]


def test_version_byte_leads() -> None:
    """The first byte is the format version, so a future format can be told apart."""
    assert encode(TimeoutNow(3))[0] == codec.VERSION
