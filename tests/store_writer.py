"""Child process of test_store_durability: writes to an SQLiteStore until killed.

``python tests/store_writer.py PATH`` runs several writers at once on the real
reactor and thread pool. Each writer puts a lease, prints ``put ID`` once the
put's Deferred fired, and every third lease removes an older one of its own:
it prints ``removing ID`` before the call and ``removed ID`` after it fired.
The parent kills the process with SIGKILL and checks that every acknowledged
line is true of the file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.interfaces import IReactorCore

from licensing.records import Lease
from licensing.store.sqlite import SQLiteStore

WRITERS = 8


def say(line: str) -> None:
    """Print one line and push it into the pipe at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def write_forever(store: SQLiteStore, writer: int) -> None:
    """Put leases one after the other, removing every third one's predecessor."""
    number = 0
    while True:
        lease_id = f"w{writer}-{number}"
        await store.put_leases(
            [Lease(lease_id, "cad-pro", "2.0", f"c{writer}", "ada", "ws", 1, "ls1", 0.0, 60.0)]
        )
        say(f"put {lease_id}")
        if number % 3 == 2:
            old = f"w{writer}-{number - 1}"
            say(f"removing {old}")
            await store.remove_leases([old])
            say(f"removed {old}")
        number += 1


def main(reactor: IReactorCore, path: str) -> Deferred[list[None]]:
    """Run the writers until the process is killed."""
    store = SQLiteStore(Path(path), reactor)
    return gatherResults([ensureDeferred(write_forever(store, n)) for n in range(WRITERS)])


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
