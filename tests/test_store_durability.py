"""Nothing SQLiteStore acknowledged is lost when its process is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from twisted.internet.defer import maybeDeferred

from licensing.store.sqlite import SQLiteStore
from tests.test_store import result_now

ROOT = Path(__file__).resolve().parent.parent
WRITER = Path(__file__).resolve().parent / "store_writer.py"


@pytest.mark.integration
def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    """Kill a busy writer; every put and remove it printed as done is in the file.

    The writer prints a line only after the write's Deferred fired, so each
    printed ``put`` must be there unless a removal of it was started, and
    each printed ``removed`` must be gone.
    """
    path = tmp_path / "store.db"
    lines: list[str] = []
    with (tmp_path / "writer.err").open("w+") as errors:
        child = subprocess.Popen(
            [sys.executable, str(WRITER), str(path)],
            stdout=subprocess.PIPE,
            stderr=errors,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            text=True,
        )
        assert child.stdout is not None
        stdout = child.stdout
        reader = threading.Thread(target=lambda: lines.extend(stdout), daemon=True)
        try:
            reader.start()
            deadline = time.monotonic() + 20
            while not lines and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if lines:
                time.sleep(1.0)
            child.send_signal(signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(10)
            reader.join(10)
            stdout.close()
        errors.seek(0)
        assert child.returncode == -signal.SIGKILL, errors.read()
    assert not reader.is_alive()

    put, removing, removed = set(), set(), set()
    for line in lines:
        if not line.endswith("\n"):
            continue  # cut off mid-line by the kill: not acknowledged
        action, lease_id = line.split()
        {"put": put, "removing": removing, "removed": removed}[action].add(lease_id)
    assert len(put) > 20, "the writer acknowledged too little to prove anything"
    assert removed, "the writer never finished a removal"

    store = SQLiteStore(path, None, runner=maybeDeferred)
    stored = {lease.lease_id for lease in result_now(store.load()).leases}
    result_now(store.close())
    assert put - removing <= stored
    assert not removed & stored
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        raw.close()

