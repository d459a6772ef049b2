"""The license server: the domain object behind the client listener and the web page.

Data flows one way: the AMP responders and the web resources call into
``LicenseServer``; it asks its pool (``IPool``) whether it may issue, takes
seats from its ``SeatTable`` and makes every issued lease durable in its store
before answering.
"""

from __future__ import annotations

import datetime
import gc
import random
import re
from dataclasses import asdict, replace
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import commands
from .errors import (
    BadRequest,
    LicenseExpired,
    LicenseFileError,
    NoQuorum,
    NoSeats,
    NotServing,
    StaleLicense,
    StoreError,
    UnknownFeature,
)
from .interfaces import ILicenseStore, IPool
from .license import Feature, License, verify_license
from .records import Lease
from .seats import SeatTable

log = Logger()

MAX_TEXT = 256
MAX_FEATURE = 64
MAX_COUNT = 10_000
MAX_LEASES_PER_CALL = 2000
MAX_CLAIM_WAIT = 2.0
"""Seconds a leader holds a heartbeat's claims waiting for seats, at most (Heartbeat.claim_wait)."""
CLAIM_POLL = 0.05
"""Seconds between a held claim's attempts: about a local commit, far below a peer heartbeat."""
EXPIRE_PER_SWEEP = 2000
"""Leases freed per one-second sweep at most, so a mass expiry never stalls the
reactor for long; the rest go in the next sweeps (later, which is the safe side)."""
MAX_VERSION = 32
MAX_JUDGED = 1024
"""Feature judgments cached per (name, requested version) at most; versions come
from the network, so a client cycling through them only empties the cache."""
DAY = 86_400.0
_ID_TIME_MASK = (1 << 40) - 1
_ID_RANDOM_MASK = (1 << 88) - 1
# Whole-string matches: one C call checks both the length and the characters
# (``match`` with ``$`` would also let a trailing newline through).
_FEATURE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}").fullmatch
_LEASE_RE = re.compile(r"[0-9a-f]{32}").fullmatch
_TEXT_RE = re.compile(rf"[^\t\n\r\0]{{0,{MAX_TEXT}}}").fullmatch
_VERSION_RE = re.compile(rf"[^\t\n\r\0]{{0,{MAX_VERSION}}}").fullmatch

GC_YOUNG_THRESHOLD = 10_000
"""Allocations between collections of CPython's youngest generation, at least.

The default (700) suits programs whose objects die young. A server with
hundreds of checkouts waiting for a store commit holds their requests' boxes,
Deferreds and rows alive across many young collections: each promoted them,
and the promotions triggered full collections that walk every lease held. At
50 connections x 4 calls that cost about as much CPU per checkout as the
checkout itself; with this threshold the requests mostly die before a young
collection sees them."""

Claim = tuple[str, str, str, int, str, str]
"""A client's description of a lease it holds: id, feature, version, count, user, host."""


def _text(name: str, value: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit or any(c in value for c in "\t\n\r\0"):
        raise BadRequest(f"{name} must be text of at most {limit} characters without tabs or newlines")
    return value


def check_lease_id(lease_id: str) -> str:
    """Lease ids are 32 lowercase hex digits; anything else is a bad request."""
    if not isinstance(lease_id, str) or not _LEASE_RE(lease_id):
        raise BadRequest(f"lease id {str(lease_id)[:40]!r} is not 32 lowercase hex digits")
    return lease_id


def check_checkout(feature: str, version: str, client_id: str, user: str, host: str, count: int) -> None:
    """Validate a checkout's arguments before anything is looked up or reserved.

    On the hot path of every checkout: the usual, valid request costs one
    precompiled whole-string match per argument; only a refused one pays for
    finding out which rule it broke.
    """
    if (
        type(feature) is str and _FEATURE_RE(feature)
        and type(version) is str and _VERSION_RE(version)
        and type(client_id) is str and client_id and _TEXT_RE(client_id)
        and type(user) is str and _TEXT_RE(user)
        and type(host) is str and _TEXT_RE(host)
        and type(count) is int and 1 <= count <= MAX_COUNT
    ):
        return
    if not isinstance(feature, str) or not _FEATURE_RE(feature):
        raise BadRequest(f"feature {str(feature)[:80]!r} is not a valid feature name")
    _text("version", version, MAX_VERSION)
    _text("client_id", client_id)
    if not client_id:
        raise BadRequest("client_id must not be empty")
    _text("user", user)
    _text("host", host)
    if not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
        raise BadRequest(f"count must be an integer from 1 to {MAX_COUNT}, got {count!r}")


def collect_less_often() -> None:
    """Raise the young generation's threshold to ``GC_YOUNG_THRESHOLD`` (never lower it).

    Process-wide, so the program that owns the process calls it (``twistd
    licensing`` does), not a LicenseServer an application embeds.
    """
    young, middle, old = gc.get_threshold()
    if 0 < young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


class LicenseServer:
    """One member's license service: its seats, its leases, and its license."""

    def __init__(
        self,
        name: str,
        store: ILicenseStore,
        clock: IReactorTime,
        rng: random.Random,
        vendor_key: Any,
        client_heartbeat: float = 10.0,
    ) -> None:
        self.name = name
        self.store = store
        self.clock = clock
        self.rng = rng
        self.vendor_key = vendor_key
        self.client_heartbeat = client_heartbeat
        self.seats = SeatTable()
        self.license: License | None = None
        self.pool: IPool | None = None
        self.serving = False
        self._restarted_at: float | None = None
        self._grace: float | None = None
        self.stored_sequence = 0
        self._day = datetime.date.min
        self._day_start = self._day_end = 0.0
        self._judged: dict[tuple[str, str | None], Feature] = {}
        self._judged_license: License | None = None
        self._judged_day = datetime.date.min
        self._sweeper = LoopingCall(self.expire_leases)
        self._sweeper.clock = clock

    # -- life cycle -------------------------------------------------------

    async def start(self, pool: IPool, license_file: bytes | None) -> None:
        """Load the store, join the pool, then offer the stored and configured licenses.

        The offers are not awaited: in a pool they complete only once a leader
        commits them, and the server answers (NotServing) meanwhile.
        """
        self.pool = pool
        state = await self.store.load()
        now = self.clock.seconds()
        offers = []
        if state.license is not None:
            self.stored_sequence = state.license.sequence
            offers.append(state.license.data)
            try:
                self.license = self.parse_license(state.license.data)
            except LicenseFileError as e:
                log.error("the license in the store is not valid: {error}", error=str(e))
        for lease in state.leases:
            # Clients could not heartbeat while we were down; give each stored
            # lease one TTL from now so its holder can come back.
            feature = self.license.feature(lease.feature) if self.license else None
            ttl = feature.lease_ttl if feature else 0.0
            self.seats.hold(replace(lease, expires_at=max(lease.expires_at, now + ttl)))
        await pool.start()
        if license_file is not None:
            offers.append(license_file)
        if not self.store.durable:
            self._restarted_at = now
            wait = self.max_lease_ttl()
            if wait:
                log.warn(
                    "store is not durable: issuing seats resumes in {wait} s, once every lease "
                    "issued before the restart has expired",
                    wait=wait,
                )
        self._sweeper.start(1.0, now=False).addErrback(
            lambda f: log.failure("lease sweeper stopped", f)
        )
        self.serving = True
        log.info("license server {name} serving", name=self.name)
        for data in offers:
            maybeDeferred(pool.offer_license, data).addCallbacks(
                lambda sequence: log.info("license sequence {sequence} installed", sequence=sequence),
                self._offer_refused,
            )

    def _offer_refused(self, failure: Failure) -> None:
        if failure.check(StaleLicense):
            log.info("license not installed: {error}", error=str(failure.value))
        elif failure.check(LicenseFileError):
            log.error("license file refused: {error}", error=str(failure.value))
        else:
            log.failure("license offer failed", failure)

    def stop(self) -> None:
        self.serving = False
        if self._sweeper.running:
            self._sweeper.stop()

    @property
    def issue_after(self) -> float:
        """When a server whose store forgot its leases may issue seats again.

        One lease TTL after the start, the TTL of the first license served
        after it: that license usually arrives after ``start`` (configured
        file, or from the pool), so a grace fixed at start from an empty store
        would be zero; and a license installed later, with a longer TTL, must
        not stop a server that already served its grace.
        """
        if self._restarted_at is None:
            return 0.0
        if self._grace is None:
            if self.license is None:
                return self._restarted_at
            self._grace = self.max_lease_ttl()
        return self._restarted_at + self._grace

    def max_lease_ttl(self) -> float:
        if self.license is None:
            return 0.0
        return max((f.lease_ttl for f in self.license.features.values()), default=0.0)

    def today(self) -> datetime.date:
        """The UTC date now; worked out again only when the clock leaves the day it is cached for."""
        now = self.clock.seconds()
        if not self._day_start <= now < self._day_end:
            day = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
            self._day = day
            self._day_start = datetime.datetime(day.year, day.month, day.day, tzinfo=datetime.UTC).timestamp()
            self._day_end = self._day_start + DAY
        return self._day

    def verify(self, data: bytes) -> License:
        """Check a signed license file against the vendor key, expiry included."""
        return verify_license(data, self.vendor_key, today=self.today())

    def parse_license(self, data: bytes) -> License:
        """Check a file's signature only: expiry is judged per feature at checkout,
        so an installed file stays readable after its features expire."""
        return verify_license(data, self.vendor_key, today=None)

    def install_license(self, data: bytes) -> License:
        """Make a verified file the one this server serves (the pool decides when)."""
        self.license = self.parse_license(data)
        return self.license

    # -- requests ---------------------------------------------------------

    def _serving_feature(self, name: str, version: str | None) -> Feature:
        """The feature a request for ``name`` at ``version`` may use now, or raise why not.

        What the license says (feature, version, expiry) only changes with the
        license or the date, so a judgment that passed is kept for both; the
        pool's say (quorum) is asked every time.
        """
        if not self.serving or self.pool is None:
            raise NotServing(f"server {self.name} is starting up; retry shortly")
        lic = self.license
        if lic is None:
            raise NotServing(f"server {self.name} has no license installed")
        today = self.today()
        if self._judged_license is not lic or self._judged_day != today:
            self._judged = {}
            self._judged_license = lic
            self._judged_day = today
        key = (name, version)
        feature = self._judged.get(key)
        if feature is None:
            feature = self._judge_feature(lic, name, version, today)
            if len(self._judged) >= MAX_JUDGED:
                self._judged.clear()
            self._judged[key] = feature
        self.pool.check_issue(feature)
        return feature

    @staticmethod
    def _judge_feature(lic: License, name: str, version: str | None, today: datetime.date) -> Feature:
        feature = lic.feature(name)
        if feature is None:
            raise UnknownFeature(f"the license has no feature {name!r}")
        if version and not feature.version_satisfies(version):
            raise UnknownFeature(
                f"feature {name!r} is licensed up to version {feature.version}, not {version!r}"
            )
        if feature.expired(today):
            raise LicenseExpired(f"feature {name!r} expired on {feature.expires}")
        return feature

    def _check_may_issue(self) -> None:
        if self._restarted_at is None:
            return
        wait = self.issue_after - self.clock.seconds()
        if wait > 0:
            raise NotServing(
                f"server {self.name} restarted without a durable lease table; "
                f"it issues seats again in {wait:.0f} s"
            )

    def new_lease_id(self) -> str:
        """32 hex digits: the issue time in milliseconds (10), then 88 random bits (22).

        The random part keeps ids unguessable; the time in front makes the
        ids of a batch of checkouts neighbours in the store's lease table, so
        a group commit writes one or two table pages instead of a page per
        lease (random ids cost a 4 KiB WAL frame per checkout). Wraps every
        34 years, which only costs locality. It draws 128 bits, as it always
        did, so a seeded simulation consumes its random stream the same way.
        """
        ms = int(self.clock.seconds() * 1000) & _ID_TIME_MASK
        return f"{ms:010x}{self.rng.getrandbits(128) & _ID_RANDOM_MASK:022x}"

    def checkout(
        self, feature: str, version: str, client_id: str, user: str, host: str, count: int = 1
    ) -> Deferred[Lease]:
        """Issue ``count`` seats from this server's allocation; fires once the lease is durable.

        Plain Deferred callbacks rather than a coroutine: this is the path
        every checkout takes, and each coroutine layer costs a Deferred and a
        resumption per call. Every refusal arrives as a failed Deferred.
        """
        try:
            check_checkout(feature, version, client_id, user, host, count)
            f = self._serving_feature(feature, version)
            self._check_may_issue()
            now = self.clock.seconds()
            lease = Lease(self.new_lease_id(), feature, version or f.version, client_id, user, host,
                          count, self.name, now, now + f.lease_ttl)
            return self._issue(lease)
        except Exception:
            return fail()

    def _issue(self, lease: Lease) -> Deferred[Lease]:
        """Reserve the lease's seats (NoSeats is raised at once), then store it.

        The Deferred fires with the lease once it is durable, or fails with
        NotServing, the seats given back, if the store cannot write it.
        """
        assert self.pool is not None
        seats = self.seats
        if seats.allocation(lease.feature) < seats.used(lease.feature) + lease.count:
            self.pool.request_seats(lease.feature, lease.count)
        seats.reserve(lease)
        stored = self.store.put_leases([lease])
        stored.addCallbacks(self._stored, self._not_stored, callbackArgs=(lease,), errbackArgs=(lease,))
        return stored

    def _stored(self, _: object, lease: Lease) -> Lease:
        assert self.pool is not None
        self.pool.leases_changed()
        return lease

    def _not_stored(self, failure: Failure, lease: Lease) -> Failure:
        if not failure.check(StoreError):
            return failure
        self.seats.release(lease.lease_id)
        log.error("lease not stored, seat given back: {error}", error=str(failure.value))
        raise NotServing(f"server {self.name} cannot write its store; try another server")

    def heartbeat_interval(self, feature: Feature) -> float:
        return min(self.client_heartbeat, feature.lease_ttl / 3)

    async def heartbeat(
        self, client_id: str, lease_ids: Sequence[str], claims: Sequence[Claim] = (),
        claim_wait: float = 0.0,
    ) -> list[tuple[str, str, float]]:
        """Renew what this server holds; convert claimed leases it does not hold, if it leads.

        A claim the leader cannot convert yet, but will once seats it is
        moving here arrive, is held up to ``claim_wait`` seconds in all.
        """
        _text("client_id", client_id)
        if len(lease_ids) + len(claims) > MAX_LEASES_PER_CALL:
            raise BadRequest(f"at most {MAX_LEASES_PER_CALL} leases per heartbeat")
        if not 0.0 <= claim_wait <= MAX_CLAIM_WAIT:
            raise BadRequest(f"claim_wait must be between 0 and {MAX_CLAIM_WAIT:g} seconds")
        if not self.serving or self.pool is None:
            raise NotServing(f"server {self.name} is starting up; retry shortly")
        now = self.clock.seconds()
        today = self.today()
        answers: list[tuple[str, str, float]] = []
        # Judged once per feature per call: a heartbeat carries up to
        # MAX_LEASES_PER_CALL leases, mostly of one or two features.
        usable: dict[str, Feature | None] = {}
        get = self.seats.get
        for lease_id in lease_ids:
            check_lease_id(lease_id)
            lease = get(lease_id)
            if lease is None or lease.client_id != client_id or lease.expires_at <= now:
                answers.append((lease_id, commands.UNKNOWN, 0.0))
                continue
            name = lease.feature
            if name in usable:
                feature = usable[name]
            else:
                feature = self.license.feature(name) if self.license else None
                if feature is not None and feature.expired(today):
                    feature = None
                if feature is not None:
                    self.pool.check_issue(feature)
                usable[name] = feature
            if feature is None:
                self.seats.release(lease_id)
                self.forget([lease_id])
                answers.append((lease_id, commands.LOST, 0.0))
                continue
            lease.expires_at = now + feature.lease_ttl
            answers.append((lease_id, commands.RENEWED, feature.lease_ttl))
        deadline = self.clock.seconds() + claim_wait
        for claim in claims:
            answers.append(await self._convert(client_id, claim, deadline))
        return answers

    async def _convert(self, client_id: str, claim: Claim, deadline: float) -> tuple[str, str, float]:
        """F8: issue a claimed lease anew under its own id, if this server leads.

        Until ``deadline``, a claim that only waits for seats the pool moves
        here, or for this new leader's first commit (NoQuorum), is tried
        again every CLAIM_POLL: borrowing takes a few peer heartbeats, far
        less than the retry-after the client would otherwise sleep through.
        So is a claim that reaches a follower while the pool has no live
        leader (the leader died, an election is on): answered unknown at
        once, its client would sleep a failover round before it asked again;
        held, it is converted here the moment this member wins, or answered
        unknown the moment another member leads, and the client goes on to
        that member at once.
        """
        assert self.pool is not None
        while True:
            try:
                answer, seats_coming = await self._convert_once(client_id, claim)
            except NoQuorum:
                if not self._may_hold(deadline) or self.pool.role != "leader":
                    raise
            else:
                electing = answer[1] == commands.UNKNOWN and self.pool.awaiting_leader()
                if not (seats_coming or electing) or not self._may_hold(deadline):
                    return answer
            await deferLater(self.clock, CLAIM_POLL)

    def _may_hold(self, deadline: float) -> bool:
        return self.clock.seconds() + CLAIM_POLL <= deadline

    async def _convert_once(self, client_id: str, claim: Claim) -> tuple[tuple[str, str, float], bool]:
        """The answer to one claim, and whether the pool is moving seats here for it."""
        assert self.pool is not None
        lease_id, feature_name, version, count, user, host = claim
        check_lease_id(lease_id)
        check_checkout(feature_name, version, client_id, user, host, count)
        held = self.seats.get(lease_id)
        if held is not None:
            if held.client_id != client_id:
                return ((lease_id, commands.LOST, 0.0), False)
            # Renewed as in heartbeat(): by the feature the lease was issued
            # for, not the one claimed, and lost (not an error for the whole
            # call) once that feature has left the license or expired.
            try:
                feature = self._serving_feature(held.feature, None)
            except (UnknownFeature, LicenseExpired):
                self.seats.release(lease_id)
                self.forget([lease_id])
                return ((lease_id, commands.LOST, 0.0), False)
            self.seats.renew(lease_id, self.clock.seconds() + feature.lease_ttl)
            return ((lease_id, commands.RENEWED, feature.lease_ttl), False)
        if self.pool.role != "leader":
            return ((lease_id, commands.UNKNOWN, 0.0), False)
        try:
            feature = self._serving_feature(feature_name, version)
            self._check_may_issue()
        except (UnknownFeature, LicenseExpired):
            return ((lease_id, commands.LOST, 0.0), False)
        except NotServing:
            wait = max(1.0, self.issue_after - self.clock.seconds())
            return ((lease_id, commands.RETRY_AFTER, wait), False)
        now = self.clock.seconds()
        lease = Lease(lease_id, feature_name, version or feature.version, client_id, user, host,
                      count, self.name, now, now + feature.lease_ttl)
        try:
            await self._issue(lease)
        except NoSeats:
            wait = self.pool.retry_after(feature_name, lease_id=lease_id)
            if wait == 0:
                # The pool made room just now (seats it keeps for the clients
                # of a member whose allocation it reclaimed): convert at once.
                return await self._convert_once(client_id, claim)
            if wait is not None:
                return ((lease_id, commands.RETRY_AFTER, wait), True)
            if self._held_elsewhere(feature_name):
                return ((lease_id, commands.UNKNOWN, 0.0), False)
            return ((lease_id, commands.LOST, 0.0), False)
        self.pool.lease_adopted(lease)
        log.info("lease {lease_id} of {client_id} converted", lease_id=lease_id, client_id=client_id)
        return ((lease_id, commands.CONVERTED, feature.lease_ttl), False)

    def _held_elsewhere(self, feature: str) -> bool:
        """Whether other members hold seats of ``feature`` (as far as the record knows).

        A claim this leader cannot convert is then not lost: the lease may
        be one of those, still renewed by its holder once the holder's
        allocation lease is confirmed again (a member answers NoQuorum for a
        moment after every change of leader), or about to move here when an
        adoption or a pledge commits. Answered unknown, the client keeps the
        lease and tries its holder and the leader again at its next
        heartbeat, until the lease's TTL runs out.
        """
        assert self.pool is not None
        return any(use["used"] > 0 for member, use in self.pool.usage(feature).items()
                   if member != self.name)

    async def checkin(self, lease_id: str) -> bool:
        """Give a lease's seats back; False if this server does not hold it."""
        check_lease_id(lease_id)
        lease = self.seats.release(lease_id)
        if lease is None:
            return False
        try:
            await self.store.remove_leases([lease_id])
        except StoreError as e:
            # The seat is free here already; a stale row only returns after a
            # restart, where it expires after one TTL: safe, so not an error to the client.
            log.error("checked-in lease not removed from the store: {error}", error=str(e))
        assert self.pool is not None
        self.pool.leases_changed()
        return True

    def expire_leases(self) -> list[Lease]:
        """Free the seats of leases whose heartbeats stopped for a TTL."""
        expired = self.seats.expire(self.clock.seconds(), limit=EXPIRE_PER_SWEEP)
        if expired:
            # One line per sweep: a mass expiry must not stall the reactor in logging.
            log.info("{n} lease(s) expired: {lease_ids}", n=len(expired),
                     lease_ids=" ".join(lease.lease_id for lease in expired[:20]))
            self.forget([lease.lease_id for lease in expired])
            if self.pool is not None:
                self.pool.leases_changed()
        return expired

    def forget(self, lease_ids: list[str]) -> None:
        """Drop leases from the store in the background (they no longer hold seats here)."""
        self.store.remove_leases(lease_ids).addErrback(
            lambda f: log.error("expired leases not removed from store: {error}", error=str(f.value))
        )

    # -- views --------------------------------------------------------------

    def locate(self) -> tuple[str, str | None, list[tuple[str, str, int]]]:
        if self.pool is None:
            raise NotServing(f"server {self.name} is starting up; retry shortly")
        members = [(m["name"], m["client_host"], m["client_port"]) for m in self.pool.members()]
        return self.name, self.pool.leader, members

    def _acting(self, feature: Feature, today: datetime.date) -> bool:
        """Whether this member acts on its allocation of ``feature`` now (it renews leases).

        A member cut off from the leader still lists the leases it holds, but
        renews none of them: an observer adding up the seats in use across
        the pool counts a member's leases only while this is true.
        """
        if not self.serving or self.pool is None or feature.expired(today):
            return False
        try:
            self.pool.check_issue(feature)
        except (NoQuorum, NotServing):
            return False
        return True

    def status(self, verbose: bool = False) -> dict[str, Any]:
        """This server's view of the pool, its license and its seats (JSON-ready)."""
        pool = self.pool
        lic = self.license
        doc: dict[str, Any] = {
            "server": self.name,
            "serving": self.serving,
            "role": pool.role if pool else "starting",
            "leader": pool.leader if pool else None,
            "term": pool.term if pool else 0,
            "members": pool.members() if pool else [],
            "license": None,
            "features": [],
        }
        if lic is not None:
            doc["license"] = {"sequence": lic.sequence, "licensee": lic.licensee}
            today = self.today()
            for f in lic.features.values():
                usage = pool.usage(f.name) if pool else {}
                in_use = sum(u["used"] for u in usage.values())
                doc["features"].append({
                    "name": f.name,
                    "version": f.version,
                    "count": f.count,
                    "in_use": in_use,
                    "free": max(0, f.count - in_use),
                    "expires": f.expires.isoformat() if f.expires else "never",
                    "expired": f.expired(today),
                    "majority_rule": f.majority_rule,
                    "lease_ttl": f.lease_ttl,
                    "acting": self._acting(f, today),
                    "members": usage,
                })
        if verbose:
            doc["leases"] = [
                asdict(lease) for lease in sorted(self.seats.leases(), key=lambda x: x.issued_at)
            ]
        return doc
