"""The peer links' codec: consensus messages and pool notes on one link, told apart by a tag.

``b"R"`` leads a consensus message (:mod:`licensing.pool.codec`), ``b"N"`` a
pool note (:mod:`licensing.pool.notes`). Both the real peer transport and the
seat simulation use it, so the simulation sends exactly the bytes production
sends.
"""

from __future__ import annotations

from typing import Any

from ..errors import BadRequest
from . import codec
from .notes import NOTES, decode_note, encode_note


def tagged_codec() -> tuple[Any, Any]:
    """encode/decode for the peer links: consensus messages and pool notes, told apart by a tag."""

    def encode(message: object) -> bytes:
        if type(message).__name__ in NOTES:
            return b"N" + encode_note(message)
        return b"R" + codec.encode(message)

    def decode(data: bytes) -> object:
        if data[:1] == b"N":
            return decode_note(data[1:])
        if data[:1] == b"R":
            return codec.decode(data[1:])
        raise BadRequest("peer message with an unknown tag")

    return encode, decode
