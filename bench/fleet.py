"""Several ``connload.py`` processes dialling one target, told what to do all at the same moment.

One Python process opens a few hundred TLS connections a second and holds a
few thousand; the ``connections`` and ``storm`` scenarios need ten thousand,
so the connections are split over several processes. ``ConnFleet`` writes each
command to every process's stdin and collects each one's JSON answer.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from typing import Any

from harness import BENCH, FEATURE, Bench, Target


def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` as even as can be."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


class ConnFleet:
    """``processes`` connload processes holding ``connections`` client connections to ``target``."""

    def __init__(self, bench: Bench, target: Target, connections: int, processes: int,
                 prefix: str = "conn-", feature: str = FEATURE) -> None:
        self.procs: list[subprocess.Popen] = []
        self.stderr: list[Any] = []
        self.lines: list[queue.Queue[dict[str, Any] | None]] = []
        pki = target.pki
        for i, n in enumerate(split(connections, processes)):
            if n == 0:
                continue
            err = tempfile.TemporaryFile(mode="w+")
            argv = [sys.executable, str(BENCH / "connload.py"), "--port", str(target.port),
                    "--server-name", target.server_name, "--ca", str(pki / "ca.pem"),
                    "--cert", str(pki / "client.pem"), "--key", str(pki / "client.key"),
                    "--connections", str(n), "--client-prefix", f"{prefix}{i}-", "--feature", feature]
            proc = bench.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
            lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
            threading.Thread(target=self._read, args=(proc, lines), daemon=True,
                             name=f"connload-{proc.pid}").start()
            self.procs.append(proc)
            self.stderr.append(err)
            self.lines.append(lines)
        self.gather("ready", 30.0)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @staticmethod
    def _read(proc: subprocess.Popen, lines: queue.Queue[dict[str, Any] | None]) -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.put(json.loads(line))
        except (OSError, ValueError):
            pass
        lines.put(None)

    def send(self, command: dict[str, Any]) -> None:
        """Write ``command`` to every process, one right after the other."""
        text = json.dumps(command) + "\n"
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(text)
            proc.stdin.flush()

    def gather(self, event: str, timeout: float) -> list[dict[str, Any]]:
        """Each process's next answer, which must be ``event``."""
        out = []
        for i, lines in enumerate(self.lines):
            try:
                doc = lines.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"connload {self.procs[i].pid} did not answer {event!r} "
                                   f"within {timeout} s") from None
            if doc is None or doc.get("event") != event:
                err = self.stderr[i]
                err.seek(0)
                raise RuntimeError(f"connload {self.procs[i].pid} answered {doc} instead of {event!r}: "
                                   f"{err.read()[-3000:]}")
            out.append(doc)
        return out

    def ask(self, command: dict[str, Any], event: str, timeout: float = 120.0) -> list[dict[str, Any]]:
        self.send(command)
        return self.gather(event, timeout)

    def close(self) -> None:
        """Ask every process to close its connections and exit; kill what does not within 15 s."""
        try:
            if all(p.poll() is None for p in self.procs):
                self.ask({"cmd": "quit"}, "bye", 15.0)
        except (OSError, RuntimeError, TimeoutError, ValueError):
            pass
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
        for err in self.stderr:
            err.close()
