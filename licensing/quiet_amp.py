"""AMP connections that log their coming and going at debug level, not info.

``amp.AMP`` logs two info lines per connection. A member serving thousands
of clients spends a seventh of its CPU on them during a reconnection storm
(py-spy profile, docs/benchmarks.md), and they drown what an operator needs
in its log; the client library would do the same in every application's
log at each failover.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.protocols import amp

log = Logger()


class QuietAMP(amp.AMP):
    """``amp.AMP`` less the per-connection info lines (the same steps otherwise)."""

    def makeConnection(self, transport: Any) -> None:  # noqa: N802 - Twisted API
        log.debug("{cls} connected to {peer}", cls=type(self).__name__, peer=transport.getPeer())
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 - Twisted API
        log.debug("{cls} connection lost: {reason}", cls=type(self).__name__, reason=reason.value)
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None
