"""The chaos suite's fault-injecting proxy, against a plain echo server (a few seconds).

These are not marked ``chaos``: they check the tool, not the product, and
they are fast. A proxy that silently fails to inject a fault would make the
whole suite pass for the wrong reason.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .proxy import ProxyProcess, Rule, _member_name, start_proxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[ProxyProcess, int]]:
    """A proxy process with one route, ``client:echo``, in front of an echo server; yields (proxy, port)."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        listen = s.getsockname()[1]
    proxy = start_proxy(tmp_path, [{"name": "client:echo", "listen": listen,
                                    "target": server.server_address[1]}])
    try:
        yield proxy, listen
    finally:
        proxy.stop()
        server.shutdown()
        server.server_close()


def echo(port: int, data: bytes = b"ping", timeout: float = 2.0) -> bytes:
    """Send ``data`` through the proxy and read the echo (b"" if the connection closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_passes_bytes_through_until_a_rule_says_otherwise(proxied) -> None:
    """Without rules the proxy is a transparent pipe."""
    _, port = proxied
    assert echo(port, b"x" * 100_000) == b"x" * 100_000


def test_cut_resets_new_and_open_connections_until_healed(proxied) -> None:
    """``cut`` closes what is open and turns new connections away; healing lets them through."""
    proxy, port = proxied
    held = socket.create_connection(("127.0.0.1", port), timeout=2)
    held.sendall(b"a")
    assert held.recv(1) == b"a"
    rule = proxy.control.add("cut", route="client:*")
    with pytest.raises(OSError):
        held.sendall(b"b")
        if held.recv(1) == b"":
            raise ConnectionResetError
    held.close()
    with pytest.raises(OSError):
        if echo(port) == b"":
            raise ConnectionResetError
    proxy.control.remove(rule)
    assert echo(port) == b"ping"


def test_oneway_discards_one_direction_and_keeps_the_connection(proxied) -> None:
    """``oneway`` up: what the connecting side sends never arrives, and nothing closes."""
    proxy, port = proxied
    proxy.control.add("oneway", route="client:echo", direction="up")
    with pytest.raises(socket.timeout):
        echo(port, timeout=0.5)
    proxy.control.heal()
    assert echo(port) == b"ping"
    assert proxy.control.stats()["stats"]["dropped_bytes"] >= 4


def test_delay_and_slow_hold_bytes_back(proxied) -> None:
    """``delay`` adds its milliseconds each way; ``slow`` caps the rate."""
    proxy, port = proxied
    rule = proxy.control.add("delay", route="client:echo", ms=150)
    started = time.monotonic()
    assert echo(port) == b"ping"
    assert time.monotonic() - started >= 0.3
    proxy.control.remove(rule)
    proxy.control.add("slow", route="client:echo", direction="down", bps=20_000)
    started = time.monotonic()
    assert echo(port, b"y" * 10_000) == b"y" * 10_000
    assert time.monotonic() - started >= 0.4


def test_rules_are_validated() -> None:
    """A malformed rule is refused at once, not applied half-way."""
    with pytest.raises(ValueError):
        Rule.from_doc({"kind": "explode"})
    with pytest.raises(ValueError):
        Rule.from_doc({"kind": "slow"})
    with pytest.raises(ValueError):
        Rule.from_doc({"kind": "drop", "p": 2})
    assert Rule.from_doc({"kind": "oneway", "route": "peer:*", "source": "ls1", "direction": "up"}) \
        .matches("peer:ls2", "ls1")


def test_member_name_comes_from_the_twistd_command_line() -> None:
    """Peer connections are attributed by ``--name`` in the owning process's command line."""
    argv = b"\0".join([b"python", b"-n", b"licensing", b"--config", b"pool.ini", b"--name", b"ls2", b""])
    assert _member_name(argv) == "ls2"
    assert _member_name(b"python\0-m\0pytest\0") is None
