"""The baseline: a bare AMP responder over the member's own mutual-TLS setup.

It serves the client wire schema's own ``Checkout``, ``Heartbeat`` and
``Checkin`` command classes, so every argument and answer has exactly the
shape and the size of the real server's; the responders do nothing but build
an answer. The gap between this process and a real member under the same load
is therefore the cost of the license server itself, not of AMP, TLS, the
reactor or the load generator.

Usage: ``python bench/baseline_server.py --ca CA --cert CERT --key KEY``; it
prints ``{"port": N, "pid": P}`` on stdout once it listens on 127.0.0.1.
By default it listens as a member does (Twisted's backlog of 50);
``--backlog`` tries what a longer accept queue would change (see
docs/benchmarks.md, the storm scenario).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from licensing import commands
from licensing.tls import server_tls_options

TTL = 3600.0
HEARTBEAT = 10.0


class BareLocator(amp.CommandLocator):
    """Answers with the right shapes and does no work."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    @commands.Checkout.responder
    def checkout(self, feature, version, client_id, user, host, count):
        return {"lease_id": os.urandom(16).hex(), "server": self.name, "ttl": TTL, "heartbeat": HEARTBEAT}

    @commands.Heartbeat.responder
    def heartbeat(self, client_id, leases, claims=None, claim_wait=None):
        return {"statuses": [(lease_id, commands.RENEWED, TTL) for lease_id in leases]}

    @commands.Checkin.responder
    def checkin(self, lease_id):
        return {"released": True}


class BareFactory(Factory):
    """One plain AMP protocol per connection."""

    def __init__(self, name: str) -> None:
        self.name = name

    def buildProtocol(self, addr):  # noqa: N802 - Twisted API
        return amp.AMP(locator=BareLocator(self.name))


def main(argv: list[str] | None = None) -> None:
    """Listen, say where, and serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ca", type=Path, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--name", default="ls1", help="server name put in Checkout answers")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=50, help="listen backlog (Twisted's default: 50)")
    args = parser.parse_args(argv)

    options = server_tls_options(args.ca, args.cert, args.key)
    endpoint = SSL4ServerEndpoint(reactor, args.port, options, backlog=args.backlog, interface="127.0.0.1")

    def listening(port) -> None:
        sys.stdout.write(json.dumps({"port": port.getHost().port, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()

    def failed(failure) -> None:
        sys.stderr.write(f"baseline server cannot listen: {failure.getErrorMessage()}\n")
        reactor.stop()

    endpoint.listen(BareFactory(args.name)).addCallbacks(listening, failed)
    reactor.run()


if __name__ == "__main__":
    main()
