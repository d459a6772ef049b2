"""``licensectl demo``: a real one-member pool on 127.0.0.1, end to end, in seconds."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from .sandbox import make_sandbox

DEMO_FEATURES = {
    "cad-pro": {"version": "2.0", "count": 3, "expires": "never", "majority_rule": "yes", "lease_ttl": 60},
    "viewer": {"version": "1.0", "count": 10, "expires": "2099-12-31", "majority_rule": "no", "lease_ttl": 30},
}


def run_demo(directory: Path | None, keep: bool = False) -> int:
    """Generate keys and a signed license, start twistd, check seats out, print status."""
    root = Path(directory or tempfile.mkdtemp(prefix="licensing-demo-"))
    if root.exists() and any(root.iterdir()):
        root = root / time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"demo directory: {root}")
    box = make_sandbox(root, ("ls1",), features=DEMO_FEATURES)
    print("generated: private CA, server and client certificates, vendor key pair, signed license.lic")
    print("starting:  " + " ".join(box.command("ls1")))
    try:
        box.start("ls1")
        from twisted.internet import task

        from .cli import _react

        return _react(task, lambda reactor: _drive(reactor, box, keep))
    finally:
        box.stop_all()
        print(f"server stopped; its log is {root / 'logs' / 'ls1.log'}")


async def _drive(reactor: Any, box: Any, keep: bool) -> int:
    from .cli import format_status
    from .client import LicenseClient
    from .errors import NoSeats

    client = LicenseClient.from_config(reactor, box.ini, user="demo")
    try:
        leases = []
        for n in range(3):
            lease = await client.checkout("cad-pro", version="2.0")
            leases.append(lease)
            print(f"checkout {n + 1} of cad-pro 2.0: lease {lease.lease_id} from {lease.server}")
        try:
            await client.checkout("cad-pro", version="2.0")
        except NoSeats as e:
            print(f"checkout 4 of cad-pro: refused as expected ({e})")
        viewer = await client.checkout("viewer", count=2)
        print(f"checkout of 2 viewer seats: lease {viewer.lease_id}")
        print()
        print(format_status(await client.status(verbose=True), verbose=True))
        await leases[0].release()
        print()
        print(f"checked in {leases[0].lease_id}; cad-pro in use now: "
              f"{_in_use(await client.status(), 'cad-pro')} of 3")
        if keep:
            print(f"\nserver keeps running; try: licensectl --config {box.ini} status   (Ctrl-C stops)")
            from twisted.internet.defer import Deferred

            await Deferred()
    finally:
        client.close()
    return 0


def _in_use(doc: dict[str, Any], feature: str) -> int:
    return next(f["in_use"] for f in doc["features"] if f["name"] == feature)
