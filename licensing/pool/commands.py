"""The peer wire schema: AMP commands that pool members send each other.

The consensus core is sans-IO and speaks in message objects; on the wire
every message is one opaque, codec-encoded payload. Keeping a single command
means the transport never changes when the protocol grows a message type,
and the codec alone decides what a valid message is. A snapshot can be many
megabytes, so the payload is chunked.

These commands are served only on the peer listener; the client listener does
not register them, so a client that sends one gets an unknown-command error.
"""

from __future__ import annotations

from twisted.protocols import amp

from ..errors import BadRequest, NotPeer
from ..wire import ChunkedBytes

PEER_ERRORS = {
    BadRequest: b"BAD_REQUEST",
    NotPeer: b"NOT_PEER",
}


class PeerMessage(amp.Command):
    """One consensus message from the sending member; answered once delivered."""

    commandName = b"peer-message"
    arguments = [(b"payload", ChunkedBytes())]
    response: list[tuple[bytes, amp.Argument]] = []
    errors = PEER_ERRORS
