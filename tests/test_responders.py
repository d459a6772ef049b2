"""Tests for licensing.responders over real AMP in memory (iosim).

The client side is a plain ``amp.AMP`` speaking the wire schema of
``licensing.commands``, so these tests pin what any client sees: answers,
errors arriving as their own types, and that no input, however malformed,
drops the connection or logs a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test import iosim

from licensing import commands
from licensing.errors import (
    BadRequest,
    Busy,
    LicenseExpired,
    LicenseFileError,
    NoSeats,
    NotServing,
    StaleLicense,
    UnknownFeature,
)
from licensing.responders import MAX_OUTSTANDING, ClientFactory, ClientLocator, Refused

from .conftest import FEATURES, Solo, resolve
from .test_server import FlakyStore


class Reply:
    """The outcome of one remote call, caught as soon as it arrives."""

    def __init__(self, d: Deferred[dict[str, Any]]) -> None:
        self._outcome: list[Any] = []
        d.addBoth(self._outcome.append)

    def result(self) -> dict[str, Any]:
        """The answer, or raise the error the server sent."""
        return resolve(succeed_or_fail(self._outcome))


def succeed_or_fail(outcome: list[Any]) -> Deferred[Any]:
    assert outcome, "no reply arrived"
    return fail(outcome[0]) if isinstance(outcome[0], Failure) else succeed(outcome[0])


@dataclass
class Wire:
    """One client connection to a server, and the pump that moves its bytes."""

    client: amp.AMP
    pump: iosim.IOPump
    factory: ClientFactory

    def send(self, command: type[amp.Command], **kwargs: Any) -> Reply:
        """Send a command and move the bytes; the reply is caught before any flush,
        because AMP drops a connection whose error reached a Deferred with no errback."""
        reply = Reply(self.client.callRemote(command, **kwargs))
        self.pump.flush()
        return reply

    def call(self, command: type[amp.Command], **kwargs: Any) -> dict[str, Any]:
        return self.send(command, **kwargs).result()

    @property
    def connected(self) -> bool:
        transport = self.client.transport
        return transport is not None and not transport.disconnecting


def connect(solo: Solo, factory: ClientFactory | None = None) -> Wire:
    factory = factory or ClientFactory(solo.server)
    client, _, pump = iosim.connectedServerAndClient(
        lambda: factory.buildProtocol(None), amp.AMP, clock=solo.clock
    )
    return Wire(client, pump, factory)


CHECKOUT = {"feature": "cad-pro", "version": "", "client_id": "c1", "user": "alice",
            "host": "ws1", "count": 1}


@pytest.fixture
def wire(solo: Solo) -> Wire:
    return connect(solo)


def test_checkout_answer(wire: Wire, solo: Solo) -> None:
    """A checkout answers the lease id, the server, the TTL and the heartbeat interval."""
    answer = wire.call(commands.Checkout, **CHECKOUT)
    assert answer == {"lease_id": answer["lease_id"], "server": "ls1", "ttl": 30.0,
                      "heartbeat": 10.0}
    assert solo.server.seats.get(answer["lease_id"]).client_id == "c1"


def test_no_seats_arrives_as_no_seats(wire: Wire) -> None:
    """The checkout after the last seat fails with NoSeats on the client."""
    for _ in range(3):
        wire.call(commands.Checkout, **CHECKOUT)
    with pytest.raises(NoSeats, match="all 3 seats"):
        wire.call(commands.Checkout, **CHECKOUT)
    assert wire.connected


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"feature": "cam"}, UnknownFeature),
        ({"version": "9"}, UnknownFeature),
        ({"feature": "old"}, LicenseExpired),
        ({"feature": "no such feature!"}, BadRequest),
        ({"count": 0}, BadRequest),
        ({"client_id": ""}, BadRequest),
    ],
)
def test_checkout_errors_arrive_typed(wire: Wire, changes: dict, error: type) -> None:
    """Each refusal reaches the client as its own exception type; the link stays up."""
    with pytest.raises(error):
        wire.call(commands.Checkout, **{**CHECKOUT, **changes})
    assert wire.connected


def test_not_serving_arrives_as_not_serving(wire: Wire, solo: Solo) -> None:
    """A stopped server refuses every lease command with NotServing."""
    lease = wire.call(commands.Checkout, **CHECKOUT)
    solo.server.stop()
    with pytest.raises(NotServing):
        wire.call(commands.Checkout, **CHECKOUT)
    with pytest.raises(NotServing):
        wire.call(commands.Heartbeat, client_id="c1", leases=[lease["lease_id"]])


def test_checkout_answer_survives_a_license_change_during_the_write(make_solo,
                                                                   make_license) -> None:
    """A license without the feature installed while the lease is being stored still
    gets the checkout answered, with the TTL the lease was issued with.

    Regression: the responder looked the feature up again after the write and
    failed on None, which AMP logged and answered as an unknown error.
    """
    store = FlakyStore()
    s = make_solo(store=store)
    w = connect(s)
    store.hold_puts = True
    reply = w.send(commands.Checkout, **{**CHECKOUT, "feature": "viewer"})
    store.hold_puts = False
    resolve(s.pool.offer_license(make_license(2, {"cad-pro": FEATURES["cad-pro"]})))
    store.pending[0][0].callback(None)
    w.pump.flush()
    answer = reply.result()
    assert (answer["ttl"], answer["heartbeat"]) == (60.0, 10.0)


def test_heartbeat_and_claims_round_trip(wire: Wire) -> None:
    """Heartbeat rows come back per lease; a claimed lease is converted under its id."""
    lease_id = wire.call(commands.Checkout, **CHECKOUT)["lease_id"]
    claimed = "a" * 32
    answer = wire.call(commands.Heartbeat, client_id="c1", leases=[lease_id, "b" * 32],
                       claims=[(claimed, "cad-pro", "2.0", 1, "alice", "ws1")])
    assert answer["statuses"] == [
        (lease_id, "renewed", "30.0"),
        ("b" * 32, "unknown", "0.0"),
        (claimed, "converted", "30.0"),
    ]


def test_heartbeat_with_malformed_claims_is_bad_request(wire: Wire) -> None:
    """Claims with the wrong number of fields or a non-numeric count are BadRequest."""
    with pytest.raises(BadRequest, match="6 fields"):
        wire.call(commands.Heartbeat, client_id="c1", leases=[], claims=[("a" * 32, "cad-pro")])
    with pytest.raises(BadRequest, match="not an integer"):
        wire.call(commands.Heartbeat, client_id="c1", leases=[],
                  claims=[("a" * 32, "cad-pro", "", "many", "u", "h")])
    assert wire.connected


def test_heartbeat_claim_wait_on_the_wire(wire: Wire) -> None:
    """``claim_wait`` is optional; out of range it is a BadRequest that names it."""
    claim = ("a" * 32, "cad-pro", "2.0", 1, "alice", "ws1")
    answer = wire.call(commands.Heartbeat, client_id="c1", leases=[], claims=[claim], claim_wait=1.0)
    assert answer["statuses"] == [("a" * 32, "converted", "30.0")]
    with pytest.raises(BadRequest, match="claim_wait"):
        wire.call(commands.Heartbeat, client_id="c1", leases=[], claims=[claim], claim_wait=60.0)
    assert wire.connected


def test_checkin(wire: Wire) -> None:
    """Checkin answers whether this server held the lease; a bad id is BadRequest."""
    lease_id = wire.call(commands.Checkout, **CHECKOUT)["lease_id"]
    assert wire.call(commands.Checkin, lease_id=lease_id) == {"released": True}
    assert wire.call(commands.Checkin, lease_id=lease_id) == {"released": False}
    with pytest.raises(BadRequest):
        wire.call(commands.Checkin, lease_id="x")


def test_locate(wire: Wire) -> None:
    """Locate answers this member, the leader and every member's client address."""
    assert wire.call(commands.Locate) == {
        "server": "ls1", "leader": "ls1", "members": [("ls1", "127.0.0.1", "7070")]}


def test_status_larger_than_one_amp_value(wire: Wire, make_solo, make_license) -> None:
    """A verbose status of many leases is well over 64 KiB and still arrives whole."""
    s = make_solo(license=make_license(1, {"big": {**FEATURES["cad-pro"], "count": 1000}}))
    w = connect(s)
    for n in range(400):
        resolve(s.server.checkout("big", "", f"client-{n:04d}", "user" * 10, "host" * 10, 1))
    doc = w.call(commands.Status, verbose=True)["status"]
    assert len(doc["leases"]) == 400
    assert doc["features"][0]["in_use"] == 400
    assert len(repr(doc)) > 65_535


def test_push_a_newer_license(wire: Wire, solo: Solo, make_license) -> None:
    """InstallLicense answers the sequence the pool installed."""
    assert wire.call(commands.InstallLicense, license=make_license(2)) == {"sequence": 2}
    assert solo.server.license.sequence == 2


def test_push_a_license_larger_than_one_amp_value(wire: Wire, solo: Solo,
                                                  make_license) -> None:
    """A license file over 64 KiB is chunked on the wire and installed."""
    features = {f"feature-{n:04d}": dict(FEATURES["viewer"]) for n in range(700)}
    data = make_license(2, features)
    assert len(data) > 65_535
    assert wire.call(commands.InstallLicense, license=data) == {"sequence": 2}
    assert len(solo.server.license.features) == 700


def test_push_of_a_stale_license_arrives_as_stale(wire: Wire, make_license) -> None:
    """An older file is refused with StaleLicense (not just the LicenseFileError base)."""
    wire.call(commands.InstallLicense, license=make_license(3))
    with pytest.raises(StaleLicense, match="not newer"):
        wire.call(commands.InstallLicense, license=make_license(2))


def test_push_of_a_forged_license_is_refused(wire: Wire, solo: Solo, make_license) -> None:
    """A tampered file is a LicenseFileError on the client and changes nothing."""
    data = make_license(2).replace(b"count = 3", b"count = 300")
    with pytest.raises(LicenseFileError, match="changed after it was signed"):
        wire.call(commands.InstallLicense, license=data)
    assert solo.server.license.sequence == 1


def test_busy_past_the_outstanding_limit(make_solo, make_license) -> None:
    """A connection with too many requests in flight is told Busy; others are unaffected."""
    store = FlakyStore()
    s = make_solo(license=make_license(1, {"big": {**FEATURES["cad-pro"], "count": 1000}}),
                  store=store)
    store.hold_puts = True
    w = connect(s)
    args = {**CHECKOUT, "feature": "big"}
    pending = [w.send(commands.Checkout, **args) for _ in range(MAX_OUTSTANDING)]
    with pytest.raises(Busy):
        w.call(commands.Checkout, **args)
    other = connect(s, w.factory)
    assert other.call(commands.Locate)["server"] == "ls1"
    for d, _ in store.pending:
        d.callback(None)
    w.pump.flush()
    assert all(reply.result()["server"] == "ls1" for reply in pending)
    store.hold_puts = False
    assert w.call(commands.Checkout, **args)["server"] == "ls1"


def test_connection_limit(solo: Solo) -> None:
    """Connections over the limit are closed at once; a closed one makes room again."""
    factory = ClientFactory(solo.server, max_connections=1)
    first = connect(solo, factory)
    second = connect(solo, factory)
    assert isinstance(second.pump.server, Refused)
    assert not second.connected
    assert factory.connections == 1
    first.client.transport.loseConnection()
    first.pump.flush()
    assert factory.connections == 0
    assert connect(solo, factory).call(commands.Locate)["server"] == "ls1"


def test_connections_come_and_go_without_info_lines(solo: Solo) -> None:
    """Two info lines per connection cost a seventh of a member's CPU in a reconnection
    storm: the server's client connections log them at debug level only."""
    from twisted.logger import LogLevel, globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        factory = ClientFactory(solo.server)
        wire = connect(solo, factory)
        assert wire.call(commands.Locate)["server"] == "ls1"
        wire.client.transport.loseConnection()
        wire.pump.flush()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert factory.connections == 0
    server_side = [e for e in events if "ClientConnection" in str(e.get("cls", ""))]
    assert server_side and all(e["log_level"] == LogLevel.debug for e in server_side)


# -- junk: nothing a client sends may crash the server or drop the link -----------------

_junk_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
_text = st.one_of(st.sampled_from(["", "cad-pro", "viewer", "old", "2.0", "c1", "a" * 32]),
                  _junk_text)
_count = st.one_of(st.integers(-3, 5), st.integers(-(2**70), 2**70))
_EXPECTED = (BadRequest, NoSeats, UnknownFeature, LicenseExpired, NotServing)

_junk_settings = settings(max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])


def _answer_or_expected(wire: Wire, command: type[amp.Command], **kwargs: Any) -> None:
    try:
        wire.call(command, **kwargs)
    except _EXPECTED + (LicenseFileError,):
        pass
    assert wire.connected
    assert wire.call(commands.Locate)["server"] == "ls1"


@_junk_settings
@given(feature=_text, version=_text, client_id=_text, user=_text, host=_text, count=_count)
def test_junk_checkout(wire: Wire, feature, version, client_id, user, host, count) -> None:
    """Any checkout arguments get an answer or a typed error, never a dropped link."""
    _answer_or_expected(wire, commands.Checkout, feature=feature, version=version,
                        client_id=client_id, user=user, host=host, count=count)


_row = st.lists(_text, max_size=8).map(tuple)


@_junk_settings
@given(client_id=_text, leases=st.lists(_text, max_size=5),
       claims=st.one_of(st.none(), st.lists(_row, max_size=4)))
def test_junk_heartbeat(wire: Wire, client_id, leases, claims) -> None:
    """Any heartbeat arguments get an answer or a typed error."""
    _answer_or_expected(wire, commands.Heartbeat, client_id=client_id, leases=leases,
                        claims=claims)


@_junk_settings
@given(lease_id=_text)
def test_junk_checkin(wire: Wire, lease_id) -> None:
    """Any checkin argument gets an answer or a typed error."""
    _answer_or_expected(wire, commands.Checkin, lease_id=lease_id)


@_junk_settings
@given(data=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode),
                      st.integers(0, 400).flatmap(lambda n: st.binary(min_size=1, max_size=3).map(
                          lambda b, n=n: (n, b)))))
def test_junk_license_push(wire: Wire, solo: Solo, make_license, data) -> None:
    """Random bytes, and a signed file with bytes overwritten, never install or crash."""
    if isinstance(data, tuple):
        n, patch = data
        signed = make_license(5)
        data = signed[:n] + patch + signed[n + len(patch):]
        if data == signed:
            return
    _answer_or_expected(wire, commands.InstallLicense, license=data)
    assert solo.server.license.sequence == 1


@pytest.mark.parametrize(
    "box",
    [
        {b"feature": b"cad-pro", b"version": b"", b"client_id": b"c", b"user": b"u",
         b"host": b"h", b"count": b"many"},
        {b"feature": b"\xff\xfe", b"version": b"", b"client_id": b"c", b"user": b"u",
         b"host": b"h", b"count": b"1"},
        {b"feature": b"cad-pro"},
    ],
    ids=["non-integer count", "invalid utf-8", "missing arguments"],
)
def test_malformed_boxes_are_bad_requests(wire: Wire, box: dict) -> None:
    """Values that do not even parse are answered BadRequest, not a logged traceback."""
    reply = Reply(wire.client.callRemoteString(b"checkout", **{k.decode(): v
                                                              for k, v in box.items()}))
    wire.pump.flush()
    with pytest.raises(amp.RemoteAmpError) as caught:
        reply.result()
    assert caught.value.errorCode == b"BAD_REQUEST"
    assert wire.connected
    assert wire.call(commands.Locate)["server"] == "ls1"


# -- checkout_box against AMP's own schema handling -------------------------------------

class SchemaLocator(ClientLocator):
    """Checkout through ``CommandLocator``'s schema handling and ``checkout``: the reference."""

    def locateResponder(self, name: bytes) -> Any:  # noqa: N802 - Twisted API
        responder = amp.CommandLocator.locateResponder(self, name)

        def parse_or_refuse(box: amp.AmpBox) -> Any:
            try:
                return responder(box)
            except (KeyError, ValueError, TypeError) as e:
                return fail(amp.RemoteAmpError(b"BAD_REQUEST", f"malformed arguments: {e}"[:200]))

        return parse_or_refuse


class SchemaFactory(ClientFactory):
    """Client connections whose checkout goes through ``SchemaLocator``."""

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 - Twisted API
        connection = super().buildProtocol(addr)
        connection.locator = SchemaLocator(self.server, connection)
        return connection


def _raw_outcome(wire: Wire, box: dict[bytes, bytes]) -> tuple[str, Any]:
    reply = Reply(wire.client.callRemoteString(b"checkout", **{k.decode(): v for k, v in box.items()}))
    wire.pump.flush()
    try:
        return ("answer", dict(reply.result()))
    except amp.RemoteAmpError as e:
        return ("error", (e.errorCode, e.description))


_VALID_BOX = {b"feature": b"cad-pro", b"version": b"", b"client_id": b"c1", b"user": b"alice",
              b"host": b"ws1", b"count": b"1"}
_box_value = st.one_of(
    st.none(),
    st.sampled_from([b"cad-pro", b"viewer", b"old", b"", b"1", b"2", b"3", b"0", b"-1", b" 2 ",
                     b"1_0", b"2.0", b"9.9", b"many", b"\xff\xfe", b"a\tb", b"cad-pro\n"]),
    st.binary(max_size=12),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(st.dictionaries(st.sampled_from([*_VALID_BOX, b"extra"]), _box_value,
                                        max_size=3), min_size=1, max_size=5))
def test_checkout_box_answers_as_the_schema_does(make_solo, changes) -> None:
    """Box for box, the hand-written checkout gives the bytes and errors AMP's schema would."""
    import random

    fast, schema = make_solo(), make_solo()
    fast.server.rng, schema.server.rng = random.Random(7), random.Random(7)
    fast_wire, schema_wire = connect(fast), connect(schema, SchemaFactory(schema.server))
    for change in changes:
        box = {**_VALID_BOX, **change}
        box = {k: v for k, v in box.items() if v is not None}
        assert _raw_outcome(fast_wire, box) == _raw_outcome(schema_wire, box)
        assert fast_wire.connected and schema_wire.connected
