"""A throwaway pool on 127.0.0.1: keys, certificates, a signed license, pool.ini, processes.

The demo, the integration tests, the chaos suite and the benchmarks all need
the same real setup; building it in one place keeps them speaking the same
configuration as an operator would write.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_FEATURES = {
    "cad-pro": {"version": "2.0", "count": 10, "expires": "never", "majority_rule": "yes", "lease_ttl": 60},
}


def free_ports(n: int) -> list[int]:
    """Ports the OS hands out now on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def license_text(sequence: int, features: Mapping[str, Mapping[str, Any]], licensee: str = "Demo Corp") -> str:
    """An unsigned license file in the documented format."""
    lines = ["[license]", f"sequence = {sequence}", f"licensee = {licensee}", ""]
    for name, keys in features.items():
        lines.append(f"[feature:{name}]")
        lines += [f"{k} = {v}" for k, v in keys.items()]
        lines.append("")
    return "\n".join(lines)


@dataclass
class Sandbox:
    """A pool directory: pki/, vendor keys, license.lic, pool.ini, data/, logs/."""

    root: Path
    members: tuple[str, ...]
    ini: Path
    ports: dict[str, dict[str, int]]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def sign(self, sequence: int, features: Mapping[str, Mapping[str, Any]] = DEFAULT_FEATURES,
             name: str | None = None) -> Path:
        """Write a signed license file with this sequence; returns its path."""
        from .license import sign_license
        from .vendor import load_private_key

        out = self.root / (name or f"license-{sequence}.lic")
        out.write_bytes(sign_license(license_text(sequence, features),
                                     load_private_key(self.root / "vendor.key")))
        return out

    def command(self, name: str) -> list[str]:
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                f"--logfile={self.root / 'logs' / (name + '.log')}",
                "licensing", "--config", str(self.ini), "--name", name]

    def start(self, name: str, wait: float = 20.0, licensed: bool = True) -> subprocess.Popen:
        """Start member ``name`` as a real ``twistd`` process and wait until it serves."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        (self.root / "logs").mkdir(exist_ok=True)
        # twistd reports what stops it before its log opens (a config error,
        # no plugin named licensing) on its stdout and stderr; a file, not a
        # pipe, so that nobody has to keep reading it.
        with self.console_path(name).open("ab") as console:
            proc = subprocess.Popen(self.command(name), cwd=self.root, env=env,
                                    stdout=console, stderr=console)
        self.processes[name] = proc
        if wait:
            try:
                self.wait_serving(name, wait, licensed)
            except BaseException:
                self.kill(name)
                raise
        return proc

    def status(self, name: str, verbose: bool = False, timeout: float = 2.0) -> dict[str, Any] | None:
        """The member's JSON status over HTTP, or None if it does not answer."""
        url = f"http://127.0.0.1:{self.ports[name]['http']}/api/status" + ("?verbose=1" if verbose else "")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return json.loads(response.read())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def wait_serving(self, name: str, timeout: float = 20.0, licensed: bool = True) -> dict[str, Any]:
        """Wait until the member answers, and (if ``licensed``) has a license installed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is not None:
                said = self.console_path(name).read_text(errors="replace")
                raise RuntimeError(f"{name} exited with {proc.returncode}: "
                                   f"{self.log(name)[-2000:]}{said[-2000:]}")
            doc = self.status(name, timeout=0.5)
            if doc is not None and doc["serving"] and (doc["license"] or not licensed):
                return doc
            time.sleep(0.05)
        raise TimeoutError(f"{name} did not start serving within {timeout} s: {self.log(name)[-2000:]}")

    def console_path(self, name: str) -> Path:
        """Where member ``name``'s stdout and stderr go."""
        return self.root / "logs" / f"{name}.console"

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def signal(self, name: str, sig: int) -> None:
        proc = self.processes[name]
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    def kill(self, name: str) -> None:
        """SIGKILL the member and reap it."""
        proc = self.processes.pop(name, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait(10)

    def stop(self, name: str, timeout: float = 10.0) -> int | None:
        """SIGTERM the member and wait for a clean exit (SIGKILL after ``timeout``)."""
        proc = self.processes.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)


def make_sandbox(root: Path, members: Sequence[str] = ("ls1",), *,
                 features: Mapping[str, Mapping[str, Any]] = DEFAULT_FEATURES, sequence: int = 1,
                 store: str = "sqlite", timings: Mapping[str, float] | None = None,
                 install_license: bool = True, proxied: bool = False) -> Sandbox:
    """Write a complete pool directory under ``root`` (which may exist and be empty).

    ``proxied`` leaves room for a proxy in front of every member: the member
    listens on ``client_bind``/``peer_bind`` (``ports[name]["client_bind"]``,
    ``["peer_bind"]``) while pool.ini tells everyone else to connect to
    ``client``/``peer``, ports where nothing listens until the proxy does.
    """
    from .pki import init_ca, issue_certificate
    from .vendor import generate_vendor_keys

    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    pki = root / "pki"
    init_ca(pki)
    for name in members:
        issue_certificate(pki, name)
    issue_certificate(pki, "client", client=True)
    generate_vendor_keys(root)
    kinds = ("client", "peer", "http", "client_bind", "peer_bind") if proxied else ("client", "peer", "http")
    ports_list = iter(free_ports(len(kinds) * len(members)))
    ports = {name: {kind: next(ports_list) for kind in kinds} for name in members}
    lines = ["[pool]", f"members = {', '.join(members)}", "ca = pki/ca.pem", "vendor_key = vendor.pub"]
    if install_license:
        lines.append("license = license.lic")
    for key, value in (timings or {}).items():
        lines.append(f"{key} = {value}")
    lines.append("")
    for i, name in enumerate(members):
        p = ports[name]
        store_spec = f"sqlite:data/{name}.db" if store == "sqlite" else "memory:"
        lines += [f"[server:{name}]", f"client = 127.0.0.1:{p['client']}", f"peer = 127.0.0.1:{p['peer']}",
                  f"http = 127.0.0.1:{p['http']}", f"cert = pki/{name}.pem", f"key = pki/{name}.key",
                  f"store = {store_spec}", f"preference = {i + 1}"]
        if proxied:
            lines += [f"client_bind = 127.0.0.1:{p['client_bind']}", f"peer_bind = 127.0.0.1:{p['peer_bind']}"]
        lines.append("")
    lines += ["[client]", "cert = pki/client.pem", "key = pki/client.key", ""]
    ini = root / "pool.ini"
    ini.write_text("\n".join(lines))
    box = Sandbox(root, tuple(members), ini, ports)
    if install_license:
        box.sign(sequence, features, name="license.lic")
    return box
