"""Shared fixtures for the whole suite.

Two things here apply to every test:

- a test fails if anything logged a failure or an error through
  ``twisted.logger`` while it ran, because STYLE.md treats a logged failure as
  a bug (an unmapped AMP error, a fire-and-forget Deferred that died). A test
  that provokes such a log on purpose says so with
  ``@pytest.mark.allow_logged_errors`` and can inspect the events through the
  ``logged_errors`` fixture;
- Hypothesis runs with the profile named by ``HYPOTHESIS_PROFILE`` ("ci" has
  no deadline, since a shared CI machine has noisy timing).

The other fixtures build the parts most tests need: a clock at a fixed date,
an in-memory vendor key, signed license files, and a started one-member
license server on a memory store.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, settings
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from licensing.license import sign_license
from licensing.pool.solo import SoloPool
from licensing.sandbox import license_text
from licensing.server import LicenseServer
from licensing.store.memory import MemoryStore

settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: 2030-06-15 12:00 UTC: every unit test's "now", so expiry dates are stable.
NOW = datetime.datetime(2030, 6, 15, 12, 0, tzinfo=datetime.UTC).timestamp()

FEATURES: Mapping[str, Mapping[str, Any]] = {
    "cad-pro": {"version": "2.0", "count": 3, "expires": "never", "majority_rule": "yes",
                "lease_ttl": 30},
    "viewer": {"version": "1.0", "count": 10, "expires": "2031-01-01", "majority_rule": "no",
               "lease_ttl": 60},
    "old": {"version": "1.0", "count": 5, "expires": "2030-01-01", "majority_rule": "no",
            "lease_ttl": 30},
}
"""The license most unit tests serve: a small count, a wide one, and an expired feature."""

_ERROR_LEVELS = (LogLevel.error, LogLevel.critical)


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker that lets a test log errors on purpose."""
    config.addinivalue_line(
        "markers",
        "allow_logged_errors: the test provokes logged failures/errors on purpose; "
        "read them through the logged_errors fixture",
    )


@pytest.fixture(autouse=True)
def logged_errors(request: pytest.FixtureRequest) -> Iterator[list[dict[str, Any]]]:
    """Every event logged at error level or with a failure during the test.

    Unless the test is marked ``allow_logged_errors``, any such event fails it.
    The young garbage generations are collected before the check so that a
    Deferred that died with an unhandled error in a reference cycle is
    reported against the test that dropped it; a full collection would cost
    about 0.1 s per test.
    """
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("log_level") in _ERROR_LEVELS:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
        gc.collect(1)
    finally:
        globalLogPublisher.removeObserver(observe)
    if events and request.node.get_closest_marker("allow_logged_errors") is None:
        pytest.fail("logged during the test:\n" + "\n".join(describe_event(e) for e in events),
                    pytrace=False)


def describe_event(event: dict[str, Any]) -> str:
    """One logged event as text, with the traceback of its failure if it has one."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return text


def resolve(work: Deferred[Any] | Coroutine[Any, Any, Any]) -> Any:
    """The result of work that must already be complete (memory store, Clock).

    Raises what the work failed with, and fails the test if it is still
    waiting: under a ``Clock`` nothing can complete it later by itself.
    """
    d = Deferred.fromCoroutine(work) if not isinstance(work, Deferred) else work
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the operation did not complete synchronously"
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


class DurableMemoryStore(MemoryStore):
    """A memory store that says it is durable, so a fresh server issues at once.

    A real-reactor test cannot wait a whole lease TTL for the start-up grace
    that a non-durable store forces on the server.
    """

    durable = True


@pytest.fixture
def clock() -> Clock:
    """A Clock standing at ``NOW``."""
    c = Clock()
    c.advance(NOW)
    return c


@pytest.fixture(scope="session")
def vendor_key() -> Ed25519PrivateKey:
    """The vendor signing key of the unit tests (in memory only)."""
    return Ed25519PrivateKey.generate()


LicenseMaker = Callable[..., bytes]


@pytest.fixture(scope="session")
def make_license(vendor_key: Ed25519PrivateKey) -> LicenseMaker:
    """``make_license(sequence=1, features=FEATURES)``: a signed license file's bytes."""

    def make(sequence: int = 1, features: Mapping[str, Mapping[str, Any]] = FEATURES,
             licensee: str = "Test Corp") -> bytes:
        return sign_license(license_text(sequence, features, licensee), vendor_key)

    return make


@dataclass
class Solo:
    """A started one-member license server and the parts it was built from."""

    server: LicenseServer
    pool: SoloPool
    store: MemoryStore
    clock: Clock


@dataclass(frozen=True)
class Addr:
    """The client address a SoloPool reports for its only member."""

    host: str = "127.0.0.1"
    port: int = 7070


SoloMaker = Callable[..., Solo]


@pytest.fixture
def make_solo(clock: Clock, vendor_key: Ed25519PrivateKey, make_license: LicenseMaker) -> SoloMaker:
    """``make_solo(license=..., store=..., ready=True)``: start a server on a memory store.

    With ``ready`` (the default) the clock is moved past the start-up grace a
    non-durable store imposes, so checkouts are accepted at once.
    """
    import itertools
    import random

    seeds = itertools.count(1)

    def make(license: bytes | None = None, store: MemoryStore | None = None, ready: bool = True,
             name: str = "ls1", client_heartbeat: float = 10.0) -> Solo:
        store = store if store is not None else MemoryStore()
        server = LicenseServer(name, store, clock, random.Random(next(seeds)),
                               vendor_key.public_key(), client_heartbeat=client_heartbeat)
        pool = SoloPool(server, Addr())
        resolve(server.start(pool, make_license() if license is None else license))
        if ready:
            clock.advance(max(0.0, server.issue_after - clock.seconds()))
        return Solo(server, pool, store, clock)

    return make


@pytest.fixture
def solo(make_solo: SoloMaker) -> Iterator[Solo]:
    """A serving one-member server with the ``FEATURES`` license, ready to issue."""
    s = make_solo()
    yield s
    s.server.stop()


@dataclass(frozen=True)
class PKI:
    """Certificates for in-process TLS tests: the pool CA, ls1, a client, and strangers."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    foreign_ca: Path
    foreign_client_cert: Path
    foreign_client_key: Path
    ls2_cert: Path
    ls2_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """A pool CA with servers ``ls1``, ``ls2`` and a client, plus a client of an unrelated CA."""
    from licensing.pki import init_ca, issue_certificate

    root = tmp_path_factory.mktemp("pki")
    ca, _ = init_ca(root / "pool")
    server_cert, server_key = issue_certificate(root / "pool", "ls1")
    client_cert, client_key = issue_certificate(root / "pool", "client", client=True)
    foreign_ca, _ = init_ca(root / "foreign")
    foreign_cert, foreign_key = issue_certificate(root / "foreign", "client", client=True)
    ls2_cert, ls2_key = issue_certificate(root / "pool", "ls2")
    return PKI(ca, server_cert, server_key, client_cert, client_key, foreign_ca, foreign_cert,
               foreign_key, ls2_cert, ls2_key)
