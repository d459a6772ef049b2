"""Raft messages to bytes and back, for the peer transport.

The format is small and strict rather than self-describing: a version byte,
a message-type byte, then the message's fields in declaration order.
Unsigned integers are LEB128 varints, floats are 8-byte IEEE doubles,
optional floats have a presence byte, byte strings are length-prefixed, and
log entries inside AppendEntries are (term, data) pairs whose indices follow
``prev_index``. Every value has exactly one encoding, so
``encode(decode(b)) == b`` for any ``b`` that decodes.

``decode`` is fed whatever a peer sent: it raises ``BadRequest`` for anything
that is not one well-formed message of this version, and no other exception.
``encode`` is only fed our own messages; a malformed one is a bug and raises
``ValueError``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import fields
from typing import Any

from ..errors import BadRequest
from ..records import LogEntry
from .messages import (
    AppendEntries,
    AppendReply,
    InstallSnapshot,
    Message,
    RequestVote,
    SnapshotReply,
    TimeoutNow,
    VoteReply,
)

VERSION = 1

_MAX_UINT = 2**63 - 1
_DOUBLE = struct.Struct(">d")

# Field kinds.
_UINT = "uint"
_BOOL = "bool"
_FLOAT = "float"
_OPTIONAL_FLOAT = "optional float"
_BYTES = "bytes"
_ENTRIES = "entries"

_KINDS: dict[str, str] = {
    "int": _UINT,
    "bool": _BOOL,
    "float": _FLOAT,
    "float | None": _OPTIONAL_FLOAT,
    "bytes": _BYTES,
    "tuple[LogEntry, ...]": _ENTRIES,
}

# Type tags are part of the wire format: never renumber, only add.
_TAGS: dict[type, int] = {
    RequestVote: 1,
    VoteReply: 2,
    AppendEntries: 3,
    AppendReply: 4,
    InstallSnapshot: 5,
    SnapshotReply: 6,
    TimeoutNow: 7,
}


def _schema(cls: type) -> tuple[tuple[str, str], ...]:
    return tuple((f.name, _KINDS[str(f.type)]) for f in fields(cls))


_SCHEMAS: dict[type, tuple[tuple[str, str], ...]] = {cls: _schema(cls) for cls in _TAGS}
_BY_TAG: dict[int, type] = {tag: cls for cls, tag in _TAGS.items()}


def encode(message: Message) -> bytes:
    """The bytes of ``message``; ValueError if it is not a well-formed message."""
    cls = type(message)
    tag = _TAGS.get(cls)
    if tag is None:
        raise ValueError(f"not a Raft message: {message!r}")
    out = bytearray((VERSION, tag))
    for name, kind in _SCHEMAS[cls]:
        value = getattr(message, name)
        if kind == _ENTRIES:
            _put_entries(out, value, message.prev_index)  # type: ignore[union-attr]
        else:
            _put(out, kind, value, name)
    return bytes(out)


def decode(data: bytes) -> Message:
    """The message ``data`` encodes; BadRequest if it is anything else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRequest("a Raft message must be bytes")
    reader = _Reader(bytes(data))
    version = reader.byte()
    if version != VERSION:
        raise BadRequest(f"unsupported Raft message version {version}")
    cls = _BY_TAG.get(reader.byte())
    if cls is None:
        raise BadRequest("unknown Raft message type")
    values: dict[str, Any] = {}
    for name, kind in _SCHEMAS[cls]:
        if kind == _ENTRIES:
            values[name] = reader.entries(values["prev_index"])
        else:
            values[name] = reader.value(kind)
    if not reader.at_end():
        raise BadRequest("trailing bytes after a Raft message")
    return cls(**values)


def _put(out: bytearray, kind: str, value: object, name: str) -> None:
    if kind == _UINT:
        _put_uint(out, value, name)
    elif kind == _BOOL:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a bool, not {value!r}")
        out.append(int(value))
    elif kind == _FLOAT:
        _put_float(out, value, name)
    elif kind == _OPTIONAL_FLOAT:
        if value is None:
            out.append(0)
        else:
            out.append(1)
            _put_float(out, value, name)
    elif kind == _BYTES:
        if not isinstance(value, bytes):
            raise ValueError(f"{name} must be bytes, not {type(value).__name__}")
        _put_uint(out, len(value), name)
        out += value


def _put_uint(out: bytearray, value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_UINT:
        raise ValueError(f"{name} must be an int in [0, 2**63), not {value!r}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_float(out: bytearray, value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float, not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, not {value!r}")
    out += _DOUBLE.pack(float(value))


def _put_entries(out: bytearray, entries: object, prev_index: int) -> None:
    if not isinstance(entries, tuple):
        raise ValueError("entries must be a tuple of LogEntry")
    _put_uint(out, len(entries), "entries")
    for offset, entry in enumerate(entries, start=1):
        if not isinstance(entry, LogEntry) or entry.index != prev_index + offset:
            raise ValueError(f"entries must follow prev_index {prev_index} without gaps")
        _put_uint(out, entry.term, "entry term")
        _put(out, _BYTES, entry.data, "entry data")


class _Reader:
    """A cursor over untrusted bytes that fails with BadRequest, never IndexError."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def byte(self) -> int:
        if self._pos >= len(self._data):
            raise BadRequest("truncated Raft message")
        value = self._data[self._pos]
        self._pos += 1
        return value

    def take(self, count: int) -> bytes:
        if count > len(self._data) - self._pos:
            raise BadRequest("truncated Raft message")
        chunk = self._data[self._pos : self._pos + count]
        self._pos += count
        return chunk

    def uint(self) -> int:
        value = 0
        for shift in range(0, 70, 7):
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if byte == 0 and shift:
                    raise BadRequest("non-minimal integer in Raft message")
                if value > _MAX_UINT:
                    raise BadRequest("integer out of range in Raft message")
                return value
        raise BadRequest("integer too long in Raft message")

    def float(self) -> float:
        (value,) = _DOUBLE.unpack(self.take(_DOUBLE.size))
        if not math.isfinite(value):
            raise BadRequest("non-finite number in Raft message")
        return float(value)

    def value(self, kind: str) -> object:
        if kind == _UINT:
            return self.uint()
        if kind == _BOOL:
            flag = self.byte()
            if flag > 1:
                raise BadRequest("bad boolean in Raft message")
            return bool(flag)
        if kind == _FLOAT:
            return self.float()
        if kind == _OPTIONAL_FLOAT:
            present = self.byte()
            if present > 1:
                raise BadRequest("bad presence flag in Raft message")
            return self.float() if present else None
        return self.take(self.uint())

    def entries(self, prev_index: int) -> tuple[LogEntry, ...]:
        count = self.uint()
        # Each entry takes at least two bytes: refuse absurd counts up front.
        if count * 2 > len(self._data) - self._pos:
            raise BadRequest("truncated Raft message")
        if prev_index + count > _MAX_UINT:
            raise BadRequest("log index out of range in Raft message")
        return tuple(
            LogEntry(prev_index + offset, self.uint(), self.take(self.uint()))
            for offset in range(1, count + 1)
        )
