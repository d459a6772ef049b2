"""AMP argument types shared by the client and peer wire schemas.

AMP caps every value at 65,535 bytes; ``ChunkedBytes`` spreads one logical
value over numbered keys so snapshots, license files and status documents of
any size fit. ``Lines`` carries many short identifiers in one value without the
per-item box overhead of ``AmpList``, which matters on the heartbeat path.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

CHUNK = 60_000
MAX_CHUNKS = 1024


class ChunkedBytes(amp.Argument):
    """Bytes of any length (up to ``MAX_CHUNKS * CHUNK``), sent as numbered keys."""

    def toBox(self, name, strings, objects, proto):  # noqa: N802 - Twisted API
        value = self.retrieve(objects, amp._wireNameToPythonIdentifier(name), proto)
        if value is None and self.optional:
            return
        chunks = [value[i : i + CHUNK] for i in range(0, len(value), CHUNK)] or [b""]
        if len(chunks) > MAX_CHUNKS:
            raise ValueError(f"{name!r}: {len(value)} bytes is over the {MAX_CHUNKS * CHUNK} limit")
        strings[name] = str(len(chunks)).encode()
        for i, chunk in enumerate(chunks):
            strings[name + b"." + str(i).encode()] = chunk

    def fromBox(self, name, strings, objects, proto):  # noqa: N802 - Twisted API
        key = amp._wireNameToPythonIdentifier(name)
        count = strings.get(name)
        if count is None:
            if self.optional:
                objects[key] = None
                return
            raise KeyError(name)
        n = int(count)
        if not 0 < n <= MAX_CHUNKS:
            raise ValueError(f"{name!r}: bad chunk count {n}")
        objects[key] = b"".join(strings[name + b"." + str(i).encode()] for i in range(n))


class JSON(ChunkedBytes):
    """A JSON document of any size."""

    def toBox(self, name, strings, objects, proto):  # noqa: N802 - Twisted API
        key = amp._wireNameToPythonIdentifier(name)
        encoded = dict(objects)
        if encoded.get(key) is not None:
            encoded[key] = json.dumps(encoded[key], separators=(",", ":")).encode()
        super().toBox(name, strings, encoded, proto)

    def fromBox(self, name, strings, objects, proto):  # noqa: N802 - Twisted API
        super().fromBox(name, strings, objects, proto)
        key = amp._wireNameToPythonIdentifier(name)
        if objects[key] is not None:
            objects[key] = json.loads(objects[key])


class Lines(amp.Argument):
    """A list of short text items without newlines, one value on the wire."""

    def toString(self, inObject: list[str]) -> bytes:  # noqa: N802 - Twisted API
        return "\n".join(inObject).encode("utf-8")

    def fromString(self, inString: bytes) -> list[str]:  # noqa: N802 - Twisted API
        if not inString:
            return []
        return inString.decode("utf-8").split("\n")


class Rows(amp.Argument):
    """A list of tuples of short text fields (tab separated, one row a line)."""

    def toString(self, inObject: list[tuple[Any, ...]]) -> bytes:  # noqa: N802 - Twisted API
        return "\n".join("\t".join(str(f) for f in row) for row in inObject).encode("utf-8")

    def fromString(self, inString: bytes) -> list[tuple[str, ...]]:  # noqa: N802 - Twisted API
        if not inString:
            return []
        return [tuple(line.split("\t")) for line in inString.decode("utf-8").split("\n")]
