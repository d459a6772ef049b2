"""Check a seat out of a licensing pool, hold it for a while, give it back.

Run a pool first (``licensectl demo --dir /tmp/lic --keep`` prints its
pool.ini), then::

    python docs/examples/checkout.py /tmp/lic/pool.ini cad-pro 2.0 10
"""

from __future__ import annotations

import sys

from twisted.internet import task
from twisted.internet.defer import Deferred

from licensing.client import LicenseClient, LeaseLost
from licensing.errors import NoSeats, RequestError


async def main(reactor, config: str, feature: str, version: str, hold: str) -> None:
    client = LicenseClient.from_config(reactor, config)
    try:
        lease = await client.checkout(feature, version=version)
    except NoSeats:
        print(f"every seat of {feature} is in use; try again later")
        return
    except RequestError as e:
        print(f"refused: {type(e).__name__}: {e}")
        return
    print(f"got lease {lease.lease_id} from {lease.server}; heartbeat every {lease.heartbeat} s")

    def lost(why: LeaseLost) -> None:
        # Never silent: the application decides what losing the seat means.
        print(f"lost the seat: {why}")

    lease.add_loss_callback(lost)
    await task.deferLater(reactor, float(hold), lambda: None)
    await lease.release()
    print("released")
    client.close()


if __name__ == "__main__":
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, *sys.argv[1:5])))
