"""Tests for licensing.server.LicenseServer with a SoloPool, a memory store and a Clock.

Everything runs synchronously: the memory store fires its Deferreds at once
and time only moves when a test advances the Clock.
"""

from __future__ import annotations

import datetime
import gc
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import Deferred, fail

from licensing import commands
from licensing.errors import (
    BadRequest,
    LicenseExpired,
    LicenseFileExpired,
    LicenseFormatError,
    LicenseSignatureError,
    NoQuorum,
    NoSeats,
    NotServing,
    StaleLicense,
    StoreError,
    UnknownFeature,
)
from licensing.license import sign_license
from licensing.records import InstalledLicense
from licensing.sandbox import license_text
from licensing.server import (GC_YOUNG_THRESHOLD, MAX_COUNT, MAX_LEASES_PER_CALL, LicenseServer,
                              collect_less_often)
from licensing.store.memory import MemoryStore

from .conftest import FEATURES, DurableMemoryStore, Solo, resolve

#: Midnight UTC at the end of 2031-01-01, the last day of the "viewer" feature.
END_OF_VIEWER = datetime.datetime(2031, 1, 2, tzinfo=datetime.UTC).timestamp()


def checkout(solo: Solo, feature: str = "cad-pro", version: str = "", client: str = "c1",
             count: int = 1):
    """Check out synchronously (the memory store answers at once)."""
    return resolve(solo.server.checkout(feature, version, client, "alice", "ws1", count))


def stored_lease_ids(store: MemoryStore) -> set[str]:
    return {x.lease_id for x in resolve(store.load()).leases}


def tampered(data: bytes) -> bytes:
    """A signed file with one value changed after signing."""
    changed = data.replace(b"count = 3", b"count = 9")
    assert changed != data
    return changed


class FlakyStore(MemoryStore):
    """A memory store whose lease writes can be made to fail or to wait."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_puts = False
        self.fail_removes = False
        self.hold_puts = False
        self.pending: list[tuple[Deferred[None], list]] = []

    def put_leases(self, leases):
        if self.fail_puts:
            return fail(StoreError("disk full"))
        if self.hold_puts:
            d: Deferred[None] = Deferred()
            self.pending.append((d, leases))
            return d
        return super().put_leases(leases)

    def remove_leases(self, lease_ids):
        if self.fail_removes:
            return fail(StoreError("disk full"))
        return super().remove_leases(lease_ids)


# -- start-up and the license ------------------------------------------------------


def test_start_installs_the_configured_license(solo: Solo) -> None:
    """The configured file is verified, stored, and its counts become the allocation."""
    server = solo.server
    assert server.serving
    assert server.license is not None and server.license.sequence == 1
    assert resolve(solo.store.load()).license.sequence == 1
    assert server.seats.allocations() == {"cad-pro": 3, "viewer": 10, "old": 5}


def test_requests_before_start_are_not_served(clock, vendor_key) -> None:
    """A server that has not started answers NotServing, never an internal error."""
    import random

    server = LicenseServer("ls1", MemoryStore(), clock, random.Random(1), vendor_key.public_key())
    with pytest.raises(NotServing, match="starting"):
        resolve(server.checkout("cad-pro", "", "c1", "u", "h", 1))
    with pytest.raises(NotServing):
        resolve(server.heartbeat("c1", []))
    with pytest.raises(NotServing):
        server.locate()
    assert server.status()["role"] == "starting"


@pytest.mark.allow_logged_errors
def test_start_with_a_bad_license_serves_nothing(make_solo, logged_errors) -> None:
    """With no valid license anywhere the server runs, logs why, and refuses checkouts."""
    s = make_solo(license=b"not a license")
    assert s.server.serving and s.server.license is None
    with pytest.raises(NotServing, match="no license installed"):
        checkout(s)
    assert s.server.status()["license"] is None
    assert [e["log_format"] for e in logged_errors] == ["license file refused: {error}"]


def test_configured_license_older_than_stored_keeps_stored(make_solo, make_license, clock) -> None:
    """A restart with an older configured file keeps the newer file from the store."""
    store = MemoryStore()
    resolve(store.save_license(InstalledLicense(5, make_license(5))))
    s = make_solo(license=make_license(2), store=store)
    assert s.server.license.sequence == 5
    assert resolve(store.load()).license.sequence == 5


@pytest.mark.allow_logged_errors
def test_tampered_stored_license_is_logged_and_not_served(make_solo, make_license,
                                                          logged_errors) -> None:
    """A store holding a forged file: the server logs it, and the configured file wins."""
    store = MemoryStore()
    resolve(store.save_license(InstalledLicense(7, tampered(make_license(7)))))
    s = make_solo(license=make_license(1), store=store)
    assert s.server.license.sequence == 1
    assert [e["log_format"] for e in logged_errors] == [
        "the license in the store is not valid: {error}",
        "license file refused: {error}",
    ]
    assert all("changed after it was signed" in e["error"] for e in logged_errors)


def test_non_durable_store_waits_one_lease_ttl(make_solo) -> None:
    """A memory store lost its leases: no seats until every old lease must have expired.

    The store is empty, so the TTL is the one of the configured license that
    arrives after start-up (regression: the grace was computed before it and was 0).
    """
    s = make_solo(ready=False)
    assert s.server.issue_after == pytest.approx(s.clock.seconds() + 60.0)
    with pytest.raises(NotServing, match="issues seats again in 60 s"):
        checkout(s)
    s.clock.advance(59.0)
    with pytest.raises(NotServing):
        checkout(s)
    s.clock.advance(1.0)
    assert checkout(s).feature == "cad-pro"


def test_a_longer_ttl_license_after_the_grace_does_not_stop_issuing(make_solo,
                                                                    make_license) -> None:
    """The grace is one TTL of the license served after the restart, fixed once known."""
    s = make_solo()
    features = {**FEATURES, "viewer": {**FEATURES["viewer"], "lease_ttl": 3600}}
    resolve(s.pool.offer_license(make_license(2, features)))
    assert checkout(s).feature == "cad-pro"


def test_durable_store_issues_at_once(make_solo) -> None:
    """A durable lease table needs no start-up grace."""
    s = make_solo(store=DurableMemoryStore(), ready=False)
    assert checkout(s).server == "ls1"


def test_restart_keeps_stored_leases_for_a_ttl(make_solo, clock) -> None:
    """Leases in the store are held after a restart and get one TTL from the restart."""
    store = DurableMemoryStore()
    first = make_solo(store=store)
    leases = [checkout(first) for _ in range(3)]
    first.server.stop()
    clock.advance(25.0)
    second = make_solo(store=store)
    assert {x.lease_id for x in second.server.seats.leases()} == {x.lease_id for x in leases}
    with pytest.raises(NoSeats):
        checkout(second)
    for held in second.server.seats.leases():
        assert held.expires_at == pytest.approx(clock.seconds() + 30.0)
    answers = resolve(second.server.heartbeat("c1", [leases[0].lease_id]))
    assert answers == [(leases[0].lease_id, commands.RENEWED, 30.0)]


def test_stop_stops_serving(solo: Solo) -> None:
    """After stop() requests are refused and the sweeper no longer runs."""
    solo.server.stop()
    with pytest.raises(NotServing):
        checkout(solo)
    assert not solo.server._sweeper.running


# -- checkout ----------------------------------------------------------------------


def test_checkout_up_to_the_count_then_no_seats(solo: Solo) -> None:
    """Exactly ``count`` seats are issued; the next checkout is NoSeats."""
    leases = [checkout(solo, client=f"c{n}") for n in range(3)]
    assert len({x.lease_id for x in leases}) == 3
    with pytest.raises(NoSeats):
        checkout(solo, client="c9")
    assert solo.server.seats.used("cad-pro") == 3


def test_checkout_is_stored_before_it_returns(solo: Solo) -> None:
    """The lease the client is told about is already in the store."""
    lease = checkout(solo)
    assert stored_lease_ids(solo.store) == {lease.lease_id}


def test_checkout_fields(solo: Solo) -> None:
    """The lease records who holds it, where, and one TTL from now."""
    lease = checkout(solo, "viewer", "1.0", "c7", count=4)
    assert re.fullmatch(r"[0-9a-f]{32}", lease.lease_id)
    assert (lease.feature, lease.version, lease.client_id, lease.user, lease.host) == (
        "viewer", "1.0", "c7", "alice", "ws1")
    assert lease.count == 4 and lease.server == "ls1"
    assert lease.issued_at == solo.clock.seconds()
    assert lease.expires_at == solo.clock.seconds() + 60.0


def test_multi_seat_checkout(solo: Solo) -> None:
    """A checkout of several seats fits only if that many are free."""
    checkout(solo, count=2)
    with pytest.raises(NoSeats):
        checkout(solo, count=2)
    checkout(solo, count=1)


def test_version_rules(solo: Solo) -> None:
    """An older or equal version is served; a newer one is an unknown feature."""
    assert checkout(solo, version="").version == "2.0"
    assert checkout(solo, version="1.5").version == "1.5"
    with pytest.raises(UnknownFeature, match="up to version 2.0"):
        checkout(solo, version="2.1")
    with pytest.raises(UnknownFeature):
        checkout(solo, version="beta")


def test_unknown_feature(solo: Solo) -> None:
    """A feature the license does not list is UnknownFeature."""
    with pytest.raises(UnknownFeature, match="no feature 'cam'"):
        checkout(solo, "cam")


def test_expired_feature(solo: Solo) -> None:
    """A feature past its expiry date is LicenseExpired; on the day itself it is served."""
    with pytest.raises(LicenseExpired, match="2030-01-01"):
        checkout(solo, "old")
    solo.clock.advance((200 - 1) * 86400)  # 2030-12-31 12:00, viewer expires 2031-01-01
    checkout(solo, "viewer")
    solo.clock.advance(86400)
    checkout(solo, "viewer")
    solo.clock.advance(86400)
    with pytest.raises(LicenseExpired):
        checkout(solo, "viewer")


def test_feature_is_refused_from_the_first_second_after_its_expiry_day(solo: Solo) -> None:
    """The judgment of a feature kept between checkouts ends with the day it was made on."""
    solo.clock.advance(END_OF_VIEWER - 1 - solo.clock.seconds())
    checkout(solo, "viewer")
    checkout(solo, "viewer")
    solo.clock.advance(1)
    with pytest.raises(LicenseExpired):
        checkout(solo, "viewer")


def test_a_new_license_is_judged_anew(solo: Solo, make_license) -> None:
    """A feature served before is refused at once by a license that dropped it or lowered its version."""
    checkout(solo, "viewer", version="1.0")
    checkout(solo, "cad-pro", version="2.0")
    features = {k: v for k, v in FEATURES.items() if k != "viewer"}
    features["cad-pro"] = {**FEATURES["cad-pro"], "version": "1.0"}
    assert resolve(solo.pool.offer_license(make_license(2, features))) == 2
    with pytest.raises(UnknownFeature, match="no feature 'viewer'"):
        checkout(solo, "viewer", version="1.0")
    with pytest.raises(UnknownFeature, match="up to version 1.0"):
        checkout(solo, "cad-pro", version="2.0")


@pytest.mark.parametrize(
    "args",
    [
        ("bad feature", "", "c", "u", "h", 1),
        ("", "", "c", "u", "h", 1),
        ("f" * 65, "", "c", "u", "h", 1),
        ("cad-pro", "1" * 33, "c", "u", "h", 1),
        ("cad-pro", "", "", "u", "h", 1),
        ("cad-pro", "", "c" * 257, "u", "h", 1),
        ("cad-pro", "", "c", "a\tb", "h", 1),
        ("cad-pro", "", "c", "u", "h\n", 1),
        ("cad-pro", "", "c", "u\0", "h", 1),
        ("cad-pro", "", "c", "u", "h", 0),
        ("cad-pro", "", "c", "u", "h", -1),
        ("cad-pro", "", "c", "u", "h", MAX_COUNT + 1),
        ("cad-pro\n", "", "c", "u", "h", 1),
        ("cad-pro", "", "c", "u", "h", "1"),
    ],
)
def test_checkout_bad_arguments(solo: Solo, args) -> None:
    """Every malformed argument is a BadRequest, and nothing is reserved or stored."""
    with pytest.raises(BadRequest):
        resolve(solo.server.checkout(*args))
    assert len(solo.server.seats) == 0
    assert stored_lease_ids(solo.store) == set()


@pytest.mark.allow_logged_errors
def test_failed_store_write_gives_the_seat_back(make_solo, logged_errors) -> None:
    """A lease that could not be made durable is not issued, and its seat is free again."""
    store = FlakyStore()
    s = make_solo(store=store)
    store.fail_puts = True
    with pytest.raises(NotServing, match="cannot write its store"):
        checkout(s)
    assert s.server.seats.used("cad-pro") == 0
    assert "disk full" in logged_errors[0]["error"]
    store.fail_puts = False
    checkout(s)


@pytest.mark.allow_logged_errors
def test_concurrent_checkouts_never_exceed_the_count(make_solo, logged_errors) -> None:
    """Seats are reserved before the store write, so slow writes cannot over-issue.

    One of the writes fails (logged): its seat goes back and can be issued again.
    """
    store = FlakyStore()
    s = make_solo(store=store)
    store.hold_puts = True
    attempts = [s.server.checkout("cad-pro", "", f"c{n}", "u", "h", 1) for n in range(10)]
    outcomes: list = []
    for d in attempts:
        d.addBoth(outcomes.append)
    refused = [o for o in outcomes if o.check(NoSeats)]
    assert len(refused) == 7 and len(store.pending) == 3
    store.pending[0][0].errback(StoreError("disk full"))
    store.pending[1][0].callback(None)
    store.pending[2][0].callback(None)
    issued = [o for o in outcomes if not hasattr(o, "check")]
    assert len(issued) == 2 and s.server.seats.used("cad-pro") == 2
    assert [o for o in outcomes if hasattr(o, "check") and o.check(NotServing)]
    assert len(logged_errors) == 1
    store.hold_puts = False
    checkout(s)
    with pytest.raises(NoSeats):
        checkout(s)


# -- heartbeat, expiry, checkin ------------------------------------------------------


def test_heartbeat_renews(solo: Solo) -> None:
    """A heartbeat pushes the expiry one TTL from now and reports the TTL."""
    lease = checkout(solo)
    solo.clock.advance(20.0)
    answers = resolve(solo.server.heartbeat("c1", [lease.lease_id]))
    assert answers == [(lease.lease_id, commands.RENEWED, 30.0)]
    assert solo.server.seats.get(lease.lease_id).expires_at == solo.clock.seconds() + 30.0


def test_heartbeats_keep_a_lease_past_its_ttl(solo: Solo) -> None:
    """A lease that is renewed in time is never swept, however long it lives."""
    lease = checkout(solo)
    for _ in range(10):
        solo.clock.pump([1.0] * 10)
        resolve(solo.server.heartbeat("c1", [lease.lease_id]))
    assert solo.server.seats.get(lease.lease_id) is not None


def test_silent_lease_expires_after_its_ttl(solo: Solo) -> None:
    """Without heartbeats the sweeper frees the seat and forgets the lease in the store."""
    leases = [checkout(solo) for _ in range(3)]
    solo.clock.pump([1.0] * 29)
    with pytest.raises(NoSeats):
        checkout(solo)
    solo.clock.pump([1.0] * 2)
    assert solo.server.seats.used("cad-pro") == 0
    assert stored_lease_ids(solo.store) == set()
    answers = resolve(solo.server.heartbeat("c1", [leases[0].lease_id]))
    assert answers == [(leases[0].lease_id, commands.UNKNOWN, 0.0)]
    checkout(solo)


def test_heartbeat_unknown_and_foreign_leases(solo: Solo) -> None:
    """Ids the server does not hold, or holds for another client, come back unknown."""
    mine = checkout(solo, client="c1")
    theirs = checkout(solo, client="c2")
    stranger = "f" * 32
    answers = resolve(solo.server.heartbeat("c1", [mine.lease_id, theirs.lease_id, stranger]))
    assert [a[1] for a in answers] == [commands.RENEWED, commands.UNKNOWN, commands.UNKNOWN]


def test_heartbeat_bad_arguments(solo: Solo) -> None:
    """Malformed ids and oversized batches are BadRequest."""
    with pytest.raises(BadRequest, match="32 lowercase hex"):
        resolve(solo.server.heartbeat("c1", ["XYZ"]))
    with pytest.raises(BadRequest, match="at most"):
        resolve(solo.server.heartbeat("c1", ["0" * 32] * (MAX_LEASES_PER_CALL + 1)))
    with pytest.raises(BadRequest):
        resolve(solo.server.heartbeat("c\t1", []))


def test_heartbeat_of_a_feature_that_left_the_license_is_lost(solo: Solo, make_license) -> None:
    """A new license without the feature ends its leases: lost, seat and store row freed."""
    lease = checkout(solo, "viewer")
    features = {k: v for k, v in FEATURES.items() if k != "viewer"}
    assert resolve(solo.pool.offer_license(make_license(2, features))) == 2
    answers = resolve(solo.server.heartbeat("c1", [lease.lease_id]))
    assert answers == [(lease.lease_id, commands.LOST, 0.0)]
    assert solo.server.seats.get(lease.lease_id) is None
    assert stored_lease_ids(solo.store) == set()


def test_heartbeat_after_the_feature_expired_is_lost(make_solo, clock) -> None:
    """A lease renewed past the feature's expiry date is lost."""
    s = make_solo()
    clock.advance(END_OF_VIEWER - 30.0 - clock.seconds())
    lease = checkout(s, "viewer")
    clock.advance(20.0)
    assert resolve(s.server.heartbeat("c1", [lease.lease_id]))[0][1] == commands.RENEWED
    clock.advance(20.0)
    assert s.server.today().isoformat() == "2031-01-02"
    answers = resolve(s.server.heartbeat("c1", [lease.lease_id]))
    assert answers == [(lease.lease_id, commands.LOST, 0.0)]
    assert s.server.seats.used("viewer") == 0


def test_heartbeat_interval_is_at_most_a_third_of_the_ttl(solo: Solo) -> None:
    """Clients beat often enough to miss two heartbeats before a lease expires."""
    cad = solo.server.license.feature("cad-pro")
    viewer = solo.server.license.feature("viewer")
    assert solo.server.heartbeat_interval(cad) == 10.0
    assert solo.server.heartbeat_interval(viewer) == 10.0
    solo.server.client_heartbeat = 5.0
    assert solo.server.heartbeat_interval(cad) == 5.0


def test_checkin_frees_the_seat(solo: Solo) -> None:
    """Checkin frees the seat and removes the lease from the store; a second one is False."""
    leases = [checkout(solo) for _ in range(3)]
    assert resolve(solo.server.checkin(leases[1].lease_id)) is True
    assert stored_lease_ids(solo.store) == {leases[0].lease_id, leases[2].lease_id}
    checkout(solo)
    assert resolve(solo.server.checkin(leases[1].lease_id)) is False


def test_checkin_bad_id(solo: Solo) -> None:
    """A malformed lease id is a BadRequest."""
    with pytest.raises(BadRequest):
        resolve(solo.server.checkin("../../etc/passwd"))


@pytest.mark.allow_logged_errors
def test_checkin_survives_a_failed_store_delete(make_solo, logged_errors) -> None:
    """The seat is free even if the row could not be deleted; the failure is logged."""
    store = FlakyStore()
    s = make_solo(store=store)
    lease = checkout(s)
    store.fail_removes = True
    assert resolve(s.server.checkin(lease.lease_id)) is True
    assert s.server.seats.used("cad-pro") == 0
    assert len(logged_errors) == 1


# -- conversion (F8): claims of leases this server does not hold ----------------------


def claim(lease_id: str, feature: str = "cad-pro", count: int = 1):
    return (lease_id, feature, "", count, "alice", "ws1")


def test_leader_converts_a_claimed_lease_under_its_id(solo: Solo) -> None:
    """A claimed lease this leader did not issue is issued anew with the same id."""
    lease_id = "a" * 32
    answers = resolve(solo.server.heartbeat("c1", [], [claim(lease_id)]))
    assert answers == [(lease_id, commands.CONVERTED, 30.0)]
    held = solo.server.seats.get(lease_id)
    assert held.client_id == "c1" and held.server == "ls1"
    assert stored_lease_ids(solo.store) == {lease_id}
    again = resolve(solo.server.heartbeat("c1", [], [claim(lease_id)]))
    assert again == [(lease_id, commands.RENEWED, 30.0)]


def test_claims_that_cannot_be_converted_are_lost(solo: Solo) -> None:
    """Another client's lease, an unknown feature, or no free seat: the claim is lost."""
    theirs = checkout(solo, client="c2")
    answers = resolve(solo.server.heartbeat("c1", [], [claim(theirs.lease_id)]))
    assert answers == [(theirs.lease_id, commands.LOST, 0.0)]
    answers = resolve(solo.server.heartbeat("c1", [], [claim("b" * 32, "cam")]))
    assert answers == [("b" * 32, commands.LOST, 0.0)]
    checkout(solo, count=2)
    answers = resolve(solo.server.heartbeat("c1", [], [claim("c" * 32)]))
    assert answers == [("c" * 32, commands.LOST, 0.0)]
    assert solo.server.seats.used("cad-pro") == 3


def test_claim_without_a_free_seat_is_unknown_while_others_hold_seats(
        solo: Solo, monkeypatch) -> None:
    """No seat to convert into, but other members hold seats of the feature: unknown, not lost.

    Regression: the leader answered lost, and the client gave up a lease that
    its holder still honoured. In a full three-member pool this happened to
    the clients of a follower that answered NoQuorum for the moment after a
    change of leader, and to claims that arrived before the adoptions freeing
    seats had committed.
    """
    checkout(solo, count=3)
    usage = solo.pool.usage("cad-pro")
    monkeypatch.setattr(solo.pool, "usage", lambda feature: {
        **usage, "ls2": {"allocation": 2, "used": 1}})
    answers = resolve(solo.server.heartbeat("c1", [], [claim("c" * 32)]))
    assert answers == [("c" * 32, commands.UNKNOWN, 0.0)]
    assert solo.server.seats.get("c" * 32) is None
    assert solo.server.seats.used("cad-pro") == 3


def test_claim_of_a_held_lease_whose_feature_left_the_license_is_lost(
        solo: Solo, make_license) -> None:
    """Like a renewal, a claim of a held lease whose feature is gone answers lost.

    Regression: the claim raised UnknownFeature for the whole heartbeat, so
    the client's other leases in the same call got no answer either.
    """
    lease = checkout(solo, "viewer")
    other = checkout(solo, "cad-pro")
    resolve(solo.pool.offer_license(make_license(2, {"cad-pro": FEATURES["cad-pro"]})))
    answers = resolve(solo.server.heartbeat("c1", [other.lease_id],
                                            [claim(lease.lease_id, "viewer")]))
    assert answers == [(other.lease_id, commands.RENEWED, 30.0),
                       (lease.lease_id, commands.LOST, 0.0)]
    assert solo.server.seats.get(lease.lease_id) is None
    assert stored_lease_ids(solo.store) == {other.lease_id}


def test_claim_of_a_held_lease_renews_by_its_own_feature(solo: Solo) -> None:
    """A claim naming another feature cannot give a held lease that feature's TTL."""
    lease = checkout(solo, "cad-pro")
    answers = resolve(solo.server.heartbeat("c1", [], [claim(lease.lease_id, "viewer")]))
    assert answers == [(lease.lease_id, commands.RENEWED, 30.0)]


def test_claims_during_the_start_up_grace_are_retried(make_solo) -> None:
    """A leader that may not issue yet tells the client when to come back."""
    s = make_solo(ready=False)
    answers = resolve(s.server.heartbeat("c1", [], [claim("d" * 32)]))
    assert answers[0][:2] == ("d" * 32, commands.RETRY_AFTER)
    assert answers[0][2] == pytest.approx(60.0)


def _pending(work) -> list:
    d = Deferred.fromCoroutine(work)
    results: list = []
    d.addBoth(results.append)
    return results


def test_a_held_claim_converts_as_soon_as_seats_arrive(solo: Solo, monkeypatch) -> None:
    """With ``claim_wait`` the leader answers when the seats it is moving here arrive,
    not with a retry-after that would cost the client a whole guessed wait."""
    first = checkout(solo, count=3)
    monkeypatch.setattr(solo.pool, "retry_after", lambda feature, lease_id=None: 1.2)
    results = _pending(solo.server.heartbeat("c2", [], [claim("d" * 32)], claim_wait=1.0))
    solo.clock.advance(0.3)
    assert results == []
    resolve(solo.server.checkin(first.lease_id))
    solo.clock.advance(0.05)
    assert results == [[("d" * 32, commands.CONVERTED, 30.0)]]
    assert solo.server.seats.get("d" * 32).client_id == "c2"


def test_a_held_claim_answers_retry_after_at_its_deadline(solo: Solo, monkeypatch) -> None:
    """Held no longer than ``claim_wait``; without it, answered at once as before."""
    checkout(solo, count=3)
    monkeypatch.setattr(solo.pool, "retry_after", lambda feature, lease_id=None: 1.2)
    assert resolve(solo.server.heartbeat("c2", [], [claim("d" * 32)])) == [
        ("d" * 32, commands.RETRY_AFTER, 1.2)]
    results = _pending(solo.server.heartbeat("c2", [], [claim("d" * 32), claim("e" * 32)],
                                             claim_wait=0.5))
    solo.clock.advance(0.45)
    assert results == []
    solo.clock.advance(0.1)
    assert results == [[("d" * 32, commands.RETRY_AFTER, 1.2), ("e" * 32, commands.RETRY_AFTER, 1.2)]]


def test_a_new_leader_holds_claims_until_it_may_issue(solo: Solo, monkeypatch) -> None:
    """A leader answers NoQuorum until its first entry commits; a held claim waits that out."""
    check_issue = solo.pool.check_issue
    ready_at = solo.clock.seconds() + 0.2

    def not_yet(feature) -> None:
        if solo.clock.seconds() < ready_at:
            raise NoQuorum("not yet")
        check_issue(feature)

    monkeypatch.setattr(solo.pool, "check_issue", not_yet)
    with pytest.raises(NoQuorum):
        resolve(solo.server.heartbeat("c2", [], [claim("d" * 32)]))
    results = _pending(solo.server.heartbeat("c2", [], [claim("d" * 32)], claim_wait=1.0))
    solo.clock.advance(0.15)
    assert results == []
    solo.clock.advance(0.1)
    assert results == [[("d" * 32, commands.CONVERTED, 30.0)]]


def test_a_pool_of_one_provides_ipool(solo: Solo) -> None:
    from zope.interface.verify import verifyObject

    from licensing.interfaces import IPool

    assert verifyObject(IPool, solo.pool)
    assert not solo.pool.awaiting_leader()


@pytest.fixture
def electing(solo: Solo, monkeypatch) -> list[bool]:
    """Make the pool a follower that awaits a leader while ``electing[0]`` is true."""
    electing = [True]
    monkeypatch.setattr(solo.pool, "role", "follower")
    monkeypatch.setattr(solo.pool, "awaiting_leader", lambda: electing[0])
    return electing


def test_a_follower_holds_claims_while_the_pool_has_no_live_leader(
        solo: Solo, electing: list[bool], monkeypatch) -> None:
    """A claim reaching a follower during an election is converted the moment this member
    wins, not answered unknown for the client to ask again a failover round later."""
    results = _pending(solo.server.heartbeat("c2", [], [claim("d" * 32)], claim_wait=1.0))
    solo.clock.advance(0.3)
    assert results == []
    monkeypatch.setattr(solo.pool, "role", "leader")
    electing[0] = False
    solo.clock.advance(0.05)
    assert results == [[("d" * 32, commands.CONVERTED, 30.0)]]


def test_a_follower_answers_unknown_once_another_member_leads(solo: Solo, electing: list[bool]) -> None:
    """Held only while no member leads; then unknown at once, so the client goes on to the
    new leader; and never past ``claim_wait``. With a live leader: unknown at once."""
    results = _pending(solo.server.heartbeat("c2", [], [claim("d" * 32)], claim_wait=1.0))
    solo.clock.advance(0.2)
    assert results == []
    electing[0] = False
    solo.clock.advance(0.05)
    assert results == [[("d" * 32, commands.UNKNOWN, 0.0)]]

    electing[0] = True
    results = _pending(solo.server.heartbeat("c2", [], [claim("e" * 32)], claim_wait=0.5))
    solo.clock.advance(0.45)
    assert results == []
    solo.clock.advance(0.1)
    assert results == [[("e" * 32, commands.UNKNOWN, 0.0)]]

    electing[0] = False
    assert resolve(solo.server.heartbeat("c2", [], [claim("f" * 32)], claim_wait=1.0)) == [
        ("f" * 32, commands.UNKNOWN, 0.0)]


@pytest.mark.parametrize("wait", [-0.1, 2.5, float("nan")])
def test_claim_wait_out_of_range_is_a_bad_request(solo: Solo, wait: float) -> None:
    with pytest.raises(BadRequest, match="claim_wait"):
        resolve(solo.server.heartbeat("c2", [], [claim("d" * 32)], claim_wait=wait))


def test_bad_claims_are_bad_requests(solo: Solo) -> None:
    """A claim with a malformed id or count is refused as a whole request."""
    with pytest.raises(BadRequest):
        resolve(solo.server.heartbeat("c1", [], [claim("nothex")]))
    with pytest.raises(BadRequest):
        resolve(solo.server.heartbeat("c1", [], [claim("e" * 32, count=0)]))


# -- the pool of one: offering license files -----------------------------------------


def test_offer_of_a_higher_sequence_installs_it(solo: Solo, make_license) -> None:
    """A newer file replaces the license, the store copy and the allocation."""
    features = {**FEATURES, "cad-pro": {**FEATURES["cad-pro"], "count": 7}}
    assert resolve(solo.pool.offer_license(make_license(4, features))) == 4
    assert solo.server.license.sequence == 4
    assert resolve(solo.store.load()).license.sequence == 4
    assert solo.server.seats.allocation("cad-pro") == 7


@pytest.mark.parametrize("sequence", [2, 3])
def test_offer_of_an_equal_or_lower_sequence_is_stale(solo: Solo, make_license,
                                                      sequence: int) -> None:
    """A different file that is not newer is refused and the installed one stays."""
    resolve(solo.pool.offer_license(make_license(3)))
    with pytest.raises(StaleLicense, match="not newer than the installed sequence 3"):
        resolve(solo.pool.offer_license(make_license(sequence, licensee="Other Corp")))
    assert solo.server.license.sequence == 3
    assert solo.server.license.licensee == "Test Corp"


def test_offer_of_the_installed_file_is_a_no_op(solo: Solo, make_license) -> None:
    """Offering the very file installed (a restart, a retried push) just answers its sequence."""
    assert resolve(solo.pool.offer_license(make_license(1))) == 1


def test_offer_of_a_forged_file_is_refused(solo: Solo, make_license) -> None:
    """Changed after signing, or signed by another vendor key: refused, nothing changes."""
    with pytest.raises(LicenseSignatureError):
        resolve(solo.pool.offer_license(tampered(make_license(2))))
    stranger = sign_license(license_text(3, FEATURES), Ed25519PrivateKey.generate())
    with pytest.raises(LicenseSignatureError, match="signed by vendor key"):
        resolve(solo.pool.offer_license(stranger))
    with pytest.raises(LicenseFormatError):
        resolve(solo.pool.offer_license(b"\xff\xfe garbage"))
    assert solo.server.license.sequence == 1
    assert resolve(solo.store.load()).license.sequence == 1


def test_offer_of_an_expired_file_is_refused(solo: Solo, make_license) -> None:
    """A file whose every feature has expired is not installed."""
    expired = {"old": FEATURES["old"]}
    with pytest.raises(LicenseFileExpired):
        resolve(solo.pool.offer_license(make_license(2, expired)))
    assert solo.server.license.sequence == 1


# -- views ----------------------------------------------------------------------------


def test_status_counts_seats(solo: Solo) -> None:
    """The status document reports count, in use and free per feature, and the member."""
    checkout(solo, count=2)
    checkout(solo, "viewer")
    doc = solo.server.status()
    assert (doc["server"], doc["serving"], doc["role"], doc["leader"], doc["term"]) == (
        "ls1", True, "leader", "ls1", 0)
    assert doc["license"] == {"sequence": 1, "licensee": "Test Corp"}
    features = {f["name"]: f for f in doc["features"]}
    assert (features["cad-pro"]["count"], features["cad-pro"]["in_use"],
            features["cad-pro"]["free"]) == (3, 2, 1)
    assert features["cad-pro"]["members"] == {"ls1": {"allocation": 3, "used": 2}}
    assert features["viewer"]["expires"] == "2031-01-01" and not features["viewer"]["expired"]
    assert features["old"]["expired"]
    assert doc["members"][0]["license_sequence"] == 1
    assert "leases" not in doc


def test_status_says_whether_the_member_acts_on_each_feature(solo: Solo, monkeypatch) -> None:
    """``acting`` is true only while the member would renew the feature's leases.

    An observer adding up the seats honoured across a pool relies on it: a
    member cut off from its leader still lists its leases but renews none.
    """
    features = {f["name"]: f for f in solo.server.status()["features"]}
    assert features["cad-pro"]["acting"] and features["viewer"]["acting"]
    assert not features["old"]["acting"]

    def cut_off(feature) -> None:
        if feature.majority_rule:
            raise NoQuorum("cut off")

    monkeypatch.setattr(solo.pool, "check_issue", cut_off)
    features = {f["name"]: f for f in solo.server.status()["features"]}
    assert not features["cad-pro"]["acting"] and features["viewer"]["acting"]


def test_verbose_status_lists_leases(solo: Solo) -> None:
    """Verbose status lists every lease in issue order."""
    first = checkout(solo)
    solo.clock.advance(1)
    second = checkout(solo, "viewer", client="c2")
    leases = solo.server.status(verbose=True)["leases"]
    assert [x["lease_id"] for x in leases] == [first.lease_id, second.lease_id]
    assert leases[1]["client_id"] == "c2"


def test_locate_names_the_member_and_leader(solo: Solo) -> None:
    """Locate tells a client where every member listens and who leads."""
    assert solo.server.locate() == ("ls1", "ls1", [("ls1", "127.0.0.1", 7070)])


def test_collect_less_often_raises_the_young_threshold_only() -> None:
    """The young generation's GC threshold goes up to GC_YOUNG_THRESHOLD, never down,
    and a disabled collector stays disabled; a LicenseServer alone changes nothing."""
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        collect_less_often()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(GC_YOUNG_THRESHOLD * 2, 5, 5)
        collect_less_often()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD * 2, 5, 5)
        gc.set_threshold(0, 5, 5)
        collect_less_often()
        assert gc.get_threshold() == (0, 5, 5)
    finally:
        gc.set_threshold(*saved)


def test_lease_ids_are_distinct(solo: Solo) -> None:
    """Lease ids are 32 hex digits, distinct within one millisecond (88 random bits)."""
    ids = {solo.server.new_lease_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_lease_ids_sort_by_issue_time(solo: Solo) -> None:
    """A lease issued milliseconds later has a larger id, so the store appends it."""
    ids = []
    for _ in range(100):
        ids.append(solo.server.new_lease_id())
        solo.clock.advance(0.002)
    assert ids == sorted(ids)
    assert len({i[:10] for i in ids}) == 100
