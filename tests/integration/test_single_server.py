"""A real one-member pool: ``twistd licensing`` with a sqlite store on 127.0.0.1.

The server runs as a subprocess started by ``licensing.sandbox``; tests drive
it the two ways an operator and an application would: ``licensectl`` as a
subprocess, and ``LicenseClient`` in this process on the real reactor
(pytest-twisted). Every process a test starts is stopped by a fixture
finalizer, whatever the outcome.

One shared server (module scope) carries the tests that leave it as they
found it; tests that restart, kill or reconfigure a server get their own.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater

from licensing.client import Lease, LicenseClient, Unreachable
from licensing.errors import NoSeats, NotServing
from licensing.sandbox import Sandbox, make_sandbox

pytestmark = pytest.mark.integration

LICENSECTL = [str(Path(sys.executable).with_name("licensectl"))]
if not Path(LICENSECTL[0]).exists():
    LICENSECTL = [sys.executable, "-c", "from licensing.cli import main; main()"]

_FEATURE = {"version": "2.0", "expires": "never", "majority_rule": "no"}
FEATURES = {
    "cad-pro": {**_FEATURE, "count": 3, "lease_ttl": 60},
    "short": {**_FEATURE, "count": 1, "lease_ttl": 2},
    "many": {**_FEATURE, "count": 150, "lease_ttl": 60},
}


def licensectl(box: Sandbox, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the console script against the sandbox's pool.ini."""
    return subprocess.run([*LICENSECTL, "--config", str(box.ini), *args], capture_output=True,
                          text=True, timeout=60, cwd=box.root, check=False)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """A failed licensectl run: exit 1, nothing on stdout, one line on stderr."""
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("licensectl: ") and "Traceback" not in result.stderr
    return lines[0]


def feature_status(box: Sandbox, name: str) -> dict[str, Any]:
    doc = box.status("ls1")
    assert doc is not None, "the server does not answer its status"
    return next(f for f in doc["features"] if f["name"] == name)


def wait_for_log(box: Sandbox, text: str, timeout: float = 10.0) -> str:
    """The member's log once it contains ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = box.log("ls1")
        if text in log:
            return log
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in the log:\n{box.log('ls1')[-3000:]}")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """The shared server: licensed with ``FEATURES``, sqlite store."""
    box = make_sandbox(tmp_path_factory.mktemp("pool"), ("ls1",), features=FEATURES,
                       store="sqlite")
    try:
        box.start("ls1")
        yield box
    finally:
        box.stop_all()


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Callable[..., Sandbox]]:
    """``sandbox(**make_sandbox_kwargs)``: a private pool directory, stopped at teardown."""
    boxes: list[Sandbox] = []

    def make(**kwargs: Any) -> Sandbox:
        box = make_sandbox(tmp_path / f"pool{len(boxes)}", ("ls1",),
                           **{"features": FEATURES, "store": "sqlite", **kwargs})
        boxes.append(box)
        return box

    yield make
    for box in boxes:
        box.stop_all()


@pytest.fixture
def clients() -> Iterator[Callable[..., LicenseClient]]:
    """``clients(box, **kwargs)``: LicenseClients on the real reactor, closed at teardown."""
    from twisted.internet import reactor

    made: list[LicenseClient] = []

    def make(box: Sandbox, **kwargs: Any) -> LicenseClient:
        client = LicenseClient.from_config(reactor, box.ini, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


async def sleep(seconds: float) -> None:
    from twisted.internet import reactor

    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_checkout_to_the_count_then_no_seats(pool: Sandbox, clients) -> None:
    """Up to the count succeed by client and licensectl; one more is NoSeats; checkin frees.

    licensectl reports NoSeats in one line with exit 1, and ``status --json``
    shows the counts the server holds.
    """
    client = clients(pool)
    held = [await client.checkout("cad-pro") for _ in range(2)]
    result = licensectl(pool, "checkout", "cad-pro", "--json")
    assert result.returncode == 0, result.stderr
    cli_lease = json.loads(result.stdout)
    assert (cli_lease["server"], cli_lease["feature"], cli_lease["count"]) == ("ls1", "cad-pro", 1)

    message = one_error_line(licensectl(pool, "checkout", "cad-pro"))
    assert message.startswith("licensectl: NoSeats: all 3 seats of 'cad-pro'")
    with pytest.raises(NoSeats):
        await client.checkout("cad-pro")

    result = licensectl(pool, "status", "--json")
    assert result.returncode == 0, result.stderr
    cad = next(f for f in json.loads(result.stdout)["features"] if f["name"] == "cad-pro")
    assert (cad["count"], cad["in_use"], cad["free"]) == (3, 3, 0)

    result = licensectl(pool, "checkin", cli_lease["lease_id"])
    assert result.returncode == 0 and cli_lease["lease_id"] in result.stdout
    message = one_error_line(licensectl(pool, "checkin", cli_lease["lease_id"]))
    assert "no member holds lease" in message
    held.append(await client.checkout("cad-pro"))
    assert feature_status(pool, "cad-pro")["in_use"] == 3
    for lease in held:
        await lease.release()
    assert feature_status(pool, "cad-pro")["in_use"] == 0


@pytest_twisted.ensureDeferred
async def test_silent_lease_frees_its_seat_after_the_ttl(pool: Sandbox, clients) -> None:
    """A heartbeating lease outlives its 2 s TTL; once heartbeats stop its seat frees."""
    holder, other = clients(pool), clients(pool)
    lease = await holder.checkout("short")
    assert lease.heartbeat < lease.ttl == 2.0
    await sleep(2.5)
    assert lease.alive
    with pytest.raises(NoSeats):
        await other.checkout("short")
    holder.close()
    stopped = time.monotonic()
    while True:
        try:
            replacement = await other.checkout("short")
            break
        except NoSeats:
            assert time.monotonic() - stopped < 8.0, "the silent lease never expired"
            await sleep(0.2)
    assert time.monotonic() - stopped > 0.5
    await replacement.release()


@pytest_twisted.ensureDeferred
async def test_client_with_a_certificate_of_another_ca_is_refused(pool: Sandbox,
                                                                  tmp_path: Path) -> None:
    """The server's TLS refuses a client certificate its CA did not sign; no seat is issued."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import SSL4ClientEndpoint

    from licensing.pki import init_ca, issue_certificate
    from licensing.tls import client_tls_options

    init_ca(tmp_path / "rogue")
    cert, key = issue_certificate(tmp_path / "rogue", "client", client=True)
    options = client_tls_options("ls1", pool.root / "pki" / "ca.pem", cert, key)
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", pool.ports["ls1"]["client"], options)
    client = LicenseClient(reactor, {"ls1": endpoint})
    try:
        with pytest.raises(Unreachable):
            await client.checkout("cad-pro")
    finally:
        client.close()
    assert feature_status(pool, "cad-pro")["in_use"] == 0


@pytest_twisted.ensureDeferred
async def test_client_expecting_another_server_name_refuses_the_server(pool: Sandbox) -> None:
    """A client that dials ls1's address expecting member ls2 refuses ls1's certificate."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import SSL4ClientEndpoint

    from licensing.tls import client_tls_options

    pki = pool.root / "pki"
    options = client_tls_options("ls2", pki / "ca.pem", pki / "client.pem", pki / "client.key")
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", pool.ports["ls1"]["client"], options)
    client = LicenseClient(reactor, {"ls2": endpoint})
    try:
        with pytest.raises(Unreachable, match="VerificationError"):
            await client.checkout("cad-pro")
    finally:
        client.close()
    assert feature_status(pool, "cad-pro")["in_use"] == 0


def test_license_push_installs_higher_and_refuses_lower(pool: Sandbox) -> None:
    """`license push` of a higher sequence installs it; a lower one is refused clearly."""
    current = pool.status("ls1")["license"]["sequence"]
    newer = pool.sign(current + 1, FEATURES)
    result = licensectl(pool, "license", "push", str(newer))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"the pool installed license sequence {current + 1}"
    assert pool.status("ls1")["license"]["sequence"] == current + 1

    older = pool.sign(current, FEATURES, name="older.lic")
    message = one_error_line(licensectl(pool, "license", "push", str(older)))
    assert f"license sequence {current} is not newer than the installed sequence " \
           f"{current + 1}" in message
    assert pool.status("ls1")["license"]["sequence"] == current + 1


@pytest_twisted.ensureDeferred
async def test_exact_counts_under_200_concurrent_checkouts(pool: Sandbox, clients) -> None:
    """200 checkouts at once from 40 connections for 150 seats: exactly 150 succeed."""
    fleet = [clients(pool, client_id=f"app-{n}") for n in range(40)]
    attempts = [Deferred.fromCoroutine(c.checkout("many")) for c in fleet for _ in range(5)]
    results = await DeferredList(attempts, consumeErrors=True)
    leases: list[Lease] = [value for ok, value in results if ok]
    refusals = [value for ok, value in results if not ok]
    assert len(leases) == 150
    assert len(refusals) == 50 and all(f.check(NoSeats) for f in refusals)
    assert len({lease.lease_id for lease in leases}) == 150
    assert feature_status(pool, "many")["in_use"] == 150
    await DeferredList([Deferred.fromCoroutine(lease.release()) for lease in leases])
    assert feature_status(pool, "many")["in_use"] == 0


@pytest_twisted.ensureDeferred
async def test_sigkill_and_restart_keep_issued_leases(sandbox, clients) -> None:
    """Leases acknowledged before a SIGKILL are held again after the restart (sqlite).

    The client that held them reconnects at its next heartbeat and finds them
    renewed, not converted: the restarted server still knows they are its own.
    """
    box = sandbox()
    box.start("ls1")
    client = clients(box)
    leases = [await client.checkout("cad-pro") for _ in range(2)]
    box.kill("ls1")
    box.start("ls1")
    doc = box.status("ls1", verbose=True)
    assert {x["lease_id"] for x in doc["leases"]} == {lease.lease_id for lease in leases}
    assert feature_status(box, "cad-pro")["in_use"] == 2
    from twisted.internet import reactor

    before = reactor.seconds()
    await client.heartbeat_now()
    assert all(lease.alive and lease.converted == 0 and lease.server == "ls1"
               and lease.renewed_at >= before for lease in leases)
    again = clients(box)
    await again.checkout("cad-pro")
    with pytest.raises(NoSeats):
        await again.checkout("cad-pro")


def test_license_install_into_a_stopped_store(sandbox) -> None:
    """`license install` writes into a stopped member's sqlite store; the start serves it.

    An older file is refused by install with one line, and a tampered
    configured file at the next start is logged and does not replace the
    stored license.
    """
    box = sandbox()
    box.start("ls1")
    assert box.stop("ls1") in (0, -signal.SIGTERM)  # twistd exits by the signal it shut down on
    result = licensectl(box, "license", "install", "--name", "ls1", str(box.sign(5, FEATURES)))
    assert result.returncode == 0, result.stderr
    assert "installed sequence 5 into ls1's store" in result.stdout
    message = one_error_line(licensectl(box, "license", "install", str(box.sign(3, FEATURES))))
    assert "already holds sequence 5" in message

    signed = box.sign(6, FEATURES, name="license.lic")
    signed.write_bytes(signed.read_bytes().replace(b"count = 3", b"count = 300"))
    box.start("ls1")
    assert box.status("ls1")["license"]["sequence"] == 5
    log = wait_for_log(box, "license file refused")
    assert "changed after it was signed" in log
    assert box.status("ls1")["license"]["sequence"] == 5


def test_a_member_that_cannot_start_says_why(sandbox) -> None:
    """A config error stops twistd before its log opens: the sandbox's error carries what
    twistd wrote (on stdout, as it happens), naming the file, section and key, and no store is created."""
    box = sandbox()
    box.ini.write_text(box.ini.read_text().replace("preference = 1", "preference = first"))
    with pytest.raises(RuntimeError) as caught:
        box.start("ls1")
    message = str(caught.value)
    assert "ls1 exited with 1" in message
    assert str(box.ini) in message and "[server:ls1]" in message and "preference" in message
    assert not (box.root / "data" / "ls1.db").exists()


@pytest_twisted.ensureDeferred
async def test_tampered_license_on_a_fresh_server(sandbox, clients) -> None:
    """With only a tampered license the server starts, logs why, and issues nothing."""
    box = sandbox()
    lic = box.root / "license.lic"
    lic.write_bytes(lic.read_bytes().replace(b"count = 150", b"count = 1500"))
    box.start("ls1", licensed=False)
    log = wait_for_log(box, "license file refused")
    assert "changed after it was signed" in log
    doc = box.status("ls1")
    assert doc["serving"] and doc["license"] is None and doc["features"] == []
    with pytest.raises(NotServing, match="no license installed"):
        await clients(box).checkout("cad-pro")


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`licensectl demo` starts a server, hits NoSeats as designed, and stops it again."""
    result = subprocess.run([*LICENSECTL, "demo", "--dir", str(tmp_path)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "checkout 4 of cad-pro: refused as expected" in result.stdout
    assert "cad-pro in use now: 2 of 3" in result.stdout
    assert "server stopped" in result.stdout
