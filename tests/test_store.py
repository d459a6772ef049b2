"""The ILicenseStore contract, run against every backend, plus backend specifics.

``StoreContract`` holds the contract tests; each ``Test...`` class below says
how to open, reopen and wait for its backend. The memory and synchronous
sqlite classes need no reactor: their Deferreds must have fired by the time
the call returns. One class runs sqlite on its real thread pool under the
pytest-twisted reactor.
"""

from __future__ import annotations

import sqlite3
import threading
import functools
from collections.abc import Callable, Coroutine, Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, maybeDeferred, succeed
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from licensing.config import StoreSpec
from licensing.errors import StoreError
from licensing.interfaces import ILicenseStore
from licensing.records import InstalledLicense, Lease, LogEntry, Snapshot, StoredState
from licensing.store import MemoryStore, SQLiteStore, open_store


def make_lease(lease_id: str, **changes: Any) -> Lease:
    """A lease with plausible values; ``changes`` overrides fields."""
    values: dict[str, Any] = {
        "lease_id": lease_id,
        "feature": "cad-pro",
        "version": "2.0",
        "client_id": "client-1",
        "user": "ada",
        "host": "ws-17",
        "count": 1,
        "server": "ls1",
        "issued_at": 1000.25,
        "expires_at": 1060.5,
    }
    values.update(changes)
    return Lease(**values)


def make_entries(first: int, last: int, term: int = 1) -> list[LogEntry]:
    """Consecutive log entries ``first..last`` whose data names their index."""
    return [LogEntry(index, term, b"entry %d" % index) for index in range(first, last + 1)]


def result_now(deferred: Deferred[Any]) -> Any:
    """The result of a Deferred that must already have fired (raising its failure)."""
    outcome: list[Any] = []
    deferred.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def run_now(function: Callable[[], Any]) -> Deferred[Any]:
    """A store runner that does the work on the calling thread, at once."""
    return maybeDeferred(function)


ContractTest = Callable[..., Generator[Deferred[Any], Any, None]]


def contract(test: ContractTest) -> Callable[..., Deferred[None] | None]:
    """Turn a generator test into a test method that its class's ``drive`` runs."""

    @functools.wraps(test)
    def run(self: StoreContract, *args: Any, **kwargs: Any) -> Deferred[None] | None:
        return self.drive(test(self, *args, **kwargs))

    return run


def drive_now(test: Generator[Deferred[Any], Any, None]) -> None:
    """Run a generator test whose every Deferred must have fired when yielded."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            deferred = test.send(value) if error is None else test.throw(error)
        except StopIteration:
            return
        value, error = None, None
        try:
            value = result_now(deferred)
        except Exception as raised:
            error = raised


def drive_on_reactor(test: Generator[Deferred[Any], Any, None]) -> Deferred[None]:
    """Run a generator test on the reactor, resuming it as each Deferred fires."""

    async def run() -> None:
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                deferred = test.send(value) if error is None else test.throw(error)
            except StopIteration:
                return
            value, error = None, None
            try:
                value = await deferred
            except Exception as raised:
                error = raised

    coroutine: Coroutine[Any, Any, None] = run()
    return ensureDeferred(coroutine)


class SteppedRunner:
    """A store runner that holds each transaction until the test steps it.

    Lets a unit test put writes in the queue while a transaction is "on the
    thread", which is what group commit is about, without any thread.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, function: Callable[[], Any]) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.pending.append((function, done))
        return done

    def step(self) -> None:
        """Run the oldest held transaction and fire its Deferred."""
        function, done = self.pending.pop(0)
        maybeDeferred(function).chainDeferred(done)

    def run_all(self) -> None:
        """Step until nothing is held, including work queued while stepping."""
        while self.pending:
            self.step()


class RecordingReactor:
    """Just enough of IReactorCore to see what a store registers; never runs."""

    def __init__(self) -> None:
        self.when_running: list[Callable[[], object]] = []
        self.triggers: list[tuple[str, str, Callable[[], object]]] = []

    def callWhenRunning(self, function: Callable[[], object]) -> None:
        """Record a start-up hook."""
        self.when_running.append(function)

    def addSystemEventTrigger(
        self, phase: str, event: str, function: Callable[[], object]
    ) -> tuple[str, str, Callable[[], object]]:
        """Record a trigger and return it as its own handle."""
        trigger = (phase, event, function)
        self.triggers.append(trigger)
        return trigger

    def removeSystemEventTrigger(self, trigger: tuple[str, str, Callable[[], object]]) -> None:
        """Forget a recorded trigger."""
        self.triggers.remove(trigger)


class StoreContract:
    """Tests every ILicenseStore backend must pass.

    Each test is a generator that yields the Deferreds it waits for; the
    backend's class decides how they are waited for (``drive``).
    """

    def open(self) -> ILicenseStore:
        """A store on this test's storage (the same storage every call)."""
        raise NotImplementedError

    def reopen(self, store: ILicenseStore) -> Deferred[ILicenseStore]:
        """What a restarted server sees: close ``store`` and open the storage again."""
        raise NotImplementedError

    def drive(self, test: Generator[Deferred[Any], Any, None]) -> Deferred[None] | None:
        """Run a generator test, waiting for each Deferred it yields."""
        raise NotImplementedError

    def wait(self, deferred: Deferred[Any]) -> Any:
        """The result of ``deferred``, from fixture code (outside the reactor)."""
        raise NotImplementedError

    @pytest.fixture(autouse=True)
    def _storage(self, tmp_path: Path) -> Any:
        self.tmp_path = tmp_path
        self.opened: list[ILicenseStore] = []
        yield
        for store in self.opened:
            self.wait(store.close())

    def store(self) -> ILicenseStore:
        """Open a store and close it when the test ends."""
        store = self.open()
        self.opened.append(store)
        return store

    def test_provides_interface(self) -> None:
        """The backend provides every attribute and method of ILicenseStore."""
        assert verifyObject(ILicenseStore, self.store())

    @contract
    def test_empty_load(self) -> Generator[Deferred[Any], Any, None]:
        """A new store holds term 0, no vote, no log, snapshot, license or leases."""
        assert (yield self.store().load()) == StoredState()

    @contract
    def test_term_and_vote(self) -> Generator[Deferred[Any], Any, None]:
        """The last saved term and vote are loaded; a vote can be cleared with None."""
        store = self.store()
        yield store.save_term(3, "ls2")
        state = yield store.load()
        assert (state.term, state.voted_for) == (3, "ls2")
        yield store.save_term(4, None)
        state = yield store.load()
        assert (state.term, state.voted_for) == (4, None)

    @contract
    def test_append_loads_in_index_order(self) -> Generator[Deferred[Any], Any, None]:
        """Entries appended in several calls load as one log in index order."""
        store = self.store()
        yield store.append_entries(make_entries(1, 3))
        yield store.append_entries(make_entries(4, 5, term=2))
        yield store.append_entries([])
        assert (yield store.load()).log == make_entries(1, 3) + make_entries(4, 5, term=2)

    @contract
    def test_append_must_follow_the_last_entry(self) -> Generator[Deferred[Any], Any, None]:
        """Gaps, overlaps and out-of-order batches fail with StoreError and change nothing."""
        store = self.store()
        with pytest.raises(StoreError):
            yield store.append_entries(make_entries(2, 3))
        yield store.append_entries(make_entries(1, 2))
        with pytest.raises(StoreError):
            yield store.append_entries(make_entries(2, 3))
        with pytest.raises(StoreError):
            yield store.append_entries([LogEntry(3, 1, b"a"), LogEntry(5, 1, b"b")])
        assert (yield store.load()).log == make_entries(1, 2)

    @contract
    def test_truncate_then_replace(self) -> Generator[Deferred[Any], Any, None]:
        """truncate_log drops the entry at from_index and after; new entries can follow."""
        store = self.store()
        yield store.append_entries(make_entries(1, 5))
        yield store.truncate_log(3)
        assert (yield store.load()).log == make_entries(1, 2)
        yield store.append_entries(make_entries(3, 4, term=2))
        assert (yield store.load()).log == make_entries(1, 2) + make_entries(3, 4, term=2)

    @contract
    def test_truncate_past_the_end_changes_nothing(self) -> Generator[Deferred[Any], Any, None]:
        """Truncating beyond the last entry is harmless."""
        store = self.store()
        yield store.append_entries(make_entries(1, 2))
        yield store.truncate_log(7)
        assert (yield store.load()).log == make_entries(1, 2)

    @contract
    def test_snapshot_compacts_the_log(self) -> Generator[Deferred[Any], Any, None]:
        """A snapshot drops the entries it covers; appends continue after the last entry."""
        store = self.store()
        yield store.append_entries(make_entries(1, 5))
        snapshot = Snapshot(3, 1, b"record at 3")
        yield store.save_snapshot(snapshot)
        state = yield store.load()
        assert state.snapshot == snapshot
        assert state.log == make_entries(4, 5)
        yield store.append_entries(make_entries(6, 6))
        assert (yield store.load()).log == make_entries(4, 6)

    @contract
    def test_snapshot_past_the_log_empties_it(self) -> Generator[Deferred[Any], Any, None]:
        """A snapshot from the leader beyond the local log replaces the whole log."""
        store = self.store()
        yield store.append_entries(make_entries(1, 2))
        yield store.save_snapshot(Snapshot(10, 3, b"record at 10"))
        state = yield store.load()
        assert state.log == []
        with pytest.raises(StoreError):
            yield store.append_entries(make_entries(3, 3))
        yield store.append_entries(make_entries(11, 11, term=3))
        assert (yield store.load()).log == make_entries(11, 11, term=3)

    @contract
    def test_snapshot_replaces_the_previous_one(self) -> Generator[Deferred[Any], Any, None]:
        """Only the latest snapshot is kept."""
        store = self.store()
        yield store.save_snapshot(Snapshot(2, 1, b"old"))
        yield store.save_snapshot(Snapshot(5, 2, b"new"))
        assert (yield store.load()).snapshot == Snapshot(5, 2, b"new")

    @contract
    def test_large_snapshot(self) -> Generator[Deferred[Any], Any, None]:
        """A snapshot of several megabytes round-trips byte for byte."""
        store = self.store()
        data = bytes(range(256)) * (8 * 4096)
        yield store.save_snapshot(Snapshot(1, 1, data))
        assert (yield store.load()).snapshot == Snapshot(1, 1, data)

    @contract
    def test_license_replace(self) -> Generator[Deferred[Any], Any, None]:
        """save_license replaces the installed file, whatever its sequence."""
        store = self.store()
        yield store.save_license(InstalledLicense(4, b"license four"))
        yield store.save_license(InstalledLicense(7, b"license seven"))
        assert (yield store.load()).license == InstalledLicense(7, b"license seven")

    @contract
    def test_put_leases_replaces_by_id(self) -> Generator[Deferred[Any], Any, None]:
        """Putting a lease with a known id replaces it; every field round-trips."""
        store = self.store()
        yield store.put_leases([make_lease("a"), make_lease("b")])
        renewed = make_lease("a", expires_at=2000.75, count=3, host="ws-18")
        yield store.put_leases([renewed])
        assert (yield store.load()).leases == [renewed, make_lease("b")]

    @contract
    def test_remove_leases_ignores_unknown_ids(self) -> Generator[Deferred[Any], Any, None]:
        """Removing known and unknown ids removes the known ones and succeeds."""
        store = self.store()
        yield store.put_leases([make_lease("a"), make_lease("b"), make_lease("c")])
        yield store.remove_leases(["b", "nope"])
        yield store.remove_leases([])
        assert (yield store.load()).leases == [make_lease("a"), make_lease("c")]

    @contract
    def test_reopen_shows_everything(self) -> Generator[Deferred[Any], Any, None]:
        """Everything acknowledged is there after a restart."""
        store = self.store()
        yield store.save_term(9, "ls3")
        yield store.append_entries(make_entries(1, 4, term=9))
        yield store.save_snapshot(Snapshot(2, 9, b"record at 2"))
        yield store.save_license(InstalledLicense(2, b"license"))
        yield store.put_leases([make_lease("a"), make_lease("b")])
        yield store.remove_leases(["a"])
        reopened = yield self.reopen(store)
        self.opened.append(reopened)
        assert (yield reopened.load()) == StoredState(
            term=9,
            voted_for="ls3",
            snapshot=Snapshot(2, 9, b"record at 2"),
            log=make_entries(3, 4, term=9),
            license=InstalledLicense(2, b"license"),
            leases=[make_lease("b")],
        )

    @contract
    def test_writes_apply_and_fire_in_call_order(self) -> Generator[Deferred[Any], Any, None]:
        """Writes issued without waiting take effect, and are acknowledged, in call order."""
        store = self.store()
        fired: list[int] = []
        calls = [
            lambda: store.put_leases([make_lease("a", count=1)]),
            lambda: store.remove_leases(["a"]),
            lambda: store.put_leases([make_lease("a", count=2)]),
            lambda: store.append_entries(make_entries(1, 3)),
            lambda: store.truncate_log(2),
            lambda: store.append_entries(make_entries(2, 2, term=5)),
            lambda: store.save_term(1, "ls1"),
            lambda: store.save_term(2, None),
        ]
        pending = []
        for position, call in enumerate(calls):
            deferred = call()
            deferred.addCallback(lambda _, position=position: fired.append(position))
            pending.append(deferred)
        yield gatherResults(pending)
        assert fired == list(range(len(calls)))
        state = yield store.load()
        assert state.leases == [make_lease("a", count=2)]
        assert state.log == make_entries(1, 1) + make_entries(2, 2, term=5)
        assert (state.term, state.voted_for) == (2, None)

    @contract
    def test_load_sees_writes_called_before_it(self) -> Generator[Deferred[Any], Any, None]:
        """A load issued right after writes, without waiting for them, includes them."""
        store = self.store()
        writes = [store.put_leases([make_lease(f"l{n}")]) for n in range(5)]
        state = yield store.load()
        yield gatherResults(writes)
        assert [lease.lease_id for lease in state.leases] == [f"l{n}" for n in range(5)]

    @contract
    def test_hundred_back_to_back_writes_all_fire(self) -> Generator[Deferred[Any], Any, None]:
        """100 writes issued at once are all acknowledged and all stored."""
        store = self.store()
        yield gatherResults([store.put_leases([make_lease(f"l{n:03}")]) for n in range(100)])
        leases = (yield store.load()).leases
        assert [lease.lease_id for lease in leases] == [f"l{n:03}" for n in range(100)]

    @contract
    def test_loaded_state_is_a_copy(self) -> Generator[Deferred[Any], Any, None]:
        """Changing a loaded StoredState does not change the store."""
        store = self.store()
        yield store.append_entries(make_entries(1, 1))
        yield store.put_leases([make_lease("a")])
        state = yield store.load()
        state.log.clear()
        state.leases.clear()
        state = yield store.load()
        assert (state.log, state.leases) == (make_entries(1, 1), [make_lease("a")])

    @contract
    def test_close_finishes_pending_writes(self) -> Generator[Deferred[Any], Any, None]:
        """Writes called before close are acknowledged before close fires, and kept."""
        store = self.store()
        order: list[str] = []
        writes = [store.put_leases([make_lease(f"l{n}")]) for n in range(10)]
        for deferred in writes:
            deferred.addCallback(lambda _: order.append("write"))
        closed = store.close()
        closed.addCallback(lambda _: order.append("close"))
        yield closed
        assert order == ["write"] * 10 + ["close"]
        if store.durable:
            reopened = self.open()
            self.opened.append(reopened)
            assert len((yield reopened.load()).leases) == 10

    @contract
    def test_every_close_waits_for_the_pending_writes(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """A second close while the first is finishing also fires only after the writes."""
        store = self.store()
        order: list[str] = []
        store.put_leases([make_lease("a")]).addCallback(lambda _: order.append("write"))
        first = store.close().addCallback(lambda _: order.append("close"))
        second = store.close().addCallback(lambda _: order.append("close"))
        yield gatherResults([first, second])
        assert order == ["write", "close", "close"]
        yield store.close()

    @contract
    def test_calls_after_close_fail(self) -> Generator[Deferred[Any], Any, None]:
        """Every call after close fails with StoreError; closing again is harmless."""
        store = self.store()
        yield store.close()
        for call in (
            store.load,
            lambda: store.save_term(1, None),
            lambda: store.append_entries(make_entries(1, 1)),
            lambda: store.truncate_log(1),
            lambda: store.save_snapshot(Snapshot(1, 1, b"")),
            lambda: store.save_license(InstalledLicense(1, b"")),
            lambda: store.put_leases([make_lease("a")]),
            lambda: store.remove_leases(["a"]),
        ):
            with pytest.raises(StoreError):
                yield call()
        yield store.close()


class TestMemoryStore(StoreContract):
    """The contract against MemoryStore; a restart keeps the same store object."""

    def open(self) -> ILicenseStore:
        """A new memory store (memory has no shared storage to reopen)."""
        return MemoryStore()

    def reopen(self, store: ILicenseStore) -> Deferred[ILicenseStore]:
        """The simulation restarts a server with the very same store object."""
        return succeed(store)

    def drive(self, test: Generator[Deferred[Any], Any, None]) -> None:
        """Memory writes have always fired already."""
        drive_now(test)

    def wait(self, deferred: Deferred[Any]) -> Any:
        """Memory writes have always fired already."""
        return result_now(deferred)

    def test_not_durable(self) -> None:
        """The memory store says it loses its contents with the process."""
        assert MemoryStore().durable is False

    def test_writes_fire_synchronously(self) -> None:
        """Every call has fired when it returns, so a task.Clock simulation needs no reactor."""
        store = MemoryStore()
        for deferred in (
            store.save_term(1, None),
            store.append_entries(make_entries(1, 1)),
            store.put_leases([make_lease("a")]),
            store.load(),
            store.close(),
        ):
            assert deferred.called


class SQLiteContract(StoreContract):
    """Opens SQLiteStore on one file per test; subclasses choose the runner."""

    def runner(self) -> Callable[[Callable[[], Any]], Deferred[Any]] | None:
        """The store's runner; None means its own thread pool."""
        raise NotImplementedError

    def reactor(self) -> Any:
        """The reactor handed to the store."""
        return None

    def open(self) -> ILicenseStore:
        """A store on ``store.db`` in the test's temporary directory."""
        return SQLiteStore(self.tmp_path / "store.db", self.reactor(), runner=self.runner())

    def reopen(self, store: ILicenseStore) -> Deferred[ILicenseStore]:
        """Close the store, then open a new one on the same file."""
        return store.close().addCallback(lambda _: self.open())


class TestSQLiteStore(SQLiteContract):
    """The contract against SQLiteStore with the work done on the calling thread."""

    def runner(self) -> Callable[[Callable[[], Any]], Deferred[Any]]:
        """Synchronous: no thread, no reactor."""
        return run_now

    def drive(self, test: Generator[Deferred[Any], Any, None]) -> None:
        """With a synchronous runner every Deferred has fired already."""
        drive_now(test)

    def wait(self, deferred: Deferred[Any]) -> Any:
        """With a synchronous runner every Deferred has fired already."""
        return result_now(deferred)


class TestSQLiteStoreThreaded(SQLiteContract):
    """The contract against SQLiteStore on its real thread pool and the real reactor."""

    def runner(self) -> None:
        """Use the store's own single-thread pool."""
        return None

    def reactor(self) -> Any:
        """The reactor pytest-twisted runs."""
        from twisted.internet import reactor

        return reactor

    def drive(self, test: Generator[Deferred[Any], Any, None]) -> Deferred[None]:
        """pytest-twisted waits for the Deferred this returns."""
        return drive_on_reactor(test)

    def wait(self, deferred: Deferred[Any]) -> Any:
        """Let the reactor run until the Deferred fires (fixture code only)."""
        return pytest_twisted.blockon(deferred)

    @contract
    def test_group_commit_on_the_thread(self) -> Generator[Deferred[Any], Any, None]:
        """100 writes issued back to back need far fewer transactions than 100."""
        store = self.store()
        assert isinstance(store, SQLiteStore)
        yield gatherResults([store.put_leases([make_lease(f"l{n:03}")]) for n in range(100)])
        assert store.commits < 100
        assert len((yield store.load()).leases) == 100

    @contract
    def test_writes_of_one_reactor_turn_share_one_commit(self) -> Generator[Deferred[Any], Any, None]:
        """Writes issued in one turn of an idle store wait for its end and commit together."""
        store = self.store()
        assert isinstance(store, SQLiteStore)
        yield store.load()
        before = store.commits
        yield gatherResults([store.put_leases([make_lease(f"l{n:03}")]) for n in range(20)])
        assert store.commits == before + 1

    @contract
    def test_close_stops_the_thread(self) -> Generator[Deferred[Any], Any, None]:
        """After close fires, the store's thread is gone."""
        store = self.store()
        yield store.put_leases([make_lease("a")])
        name = f"sqlite-store:{self.tmp_path / 'store.db'}"
        assert [thread for thread in threading.enumerate() if name in thread.name]
        yield store.close()
        assert not [thread for thread in threading.enumerate() if name in thread.name]


class TestSQLiteGroupCommit:
    """Batching and batch failure, stepped by hand with SteppedRunner."""

    def test_writes_queued_during_a_commit_share_the_next_one(self, tmp_path: Path) -> None:
        """While one transaction is in flight, 99 writes queue and commit together, in order."""
        runner = SteppedRunner()
        store = SQLiteStore(tmp_path / "s.db", None, runner=runner)
        fired: list[int] = []
        for n in range(100):
            store.put_leases([make_lease(f"l{n:03}")]).addCallback(
                lambda _, n=n: fired.append(n)
            )
        assert len(runner.pending) == 1
        runner.step()
        assert fired == [0]
        assert len(runner.pending) == 1
        runner.step()
        assert fired == list(range(100))
        assert store.commits == 2
        closed = store.close()
        runner.run_all()
        result_now(closed)

    def test_puts_of_a_batch_keep_their_order_among_other_writes(self, tmp_path: Path) -> None:
        """Lease puts run together, but never past a remove or another put between them."""
        runner = SteppedRunner()
        store = SQLiteStore(tmp_path / "s.db", None, runner=runner)
        first = store.save_term(1, None)
        writes = [
            store.put_leases([make_lease("a"), make_lease("b")]),
            store.put_leases([make_lease("c")]),
            store.remove_leases(["a", "c"]),
            store.put_leases([make_lease("a", user="grace")]),
            store.put_leases([make_lease("b", user="grace")]),
        ]
        loaded = store.load()
        runner.step()
        result_now(first)
        runner.run_all()
        for deferred in writes:
            assert result_now(deferred) is None
        assert result_now(loaded).leases == [make_lease("a", user="grace"), make_lease("b", user="grace")]
        assert store.commits == 2

    @pytest.mark.parametrize("sizes", [[0], [1], [63], [64, 1], [65, 62], [127, 1, 200]])
    def test_puts_of_any_size_are_stored(self, tmp_path: Path, sizes: list[int]) -> None:
        """Rows go in statements of several sizes; every row of every put is stored once."""
        runner = SteppedRunner()
        store = SQLiteStore(tmp_path / "s.db", None, runner=runner)
        first = store.save_term(1, None)
        ids = iter(f"l{n:04}" for n in range(sum(sizes)))
        puts = [store.put_leases([make_lease(next(ids)) for _ in range(size)]) for size in sizes]
        loaded = store.load()
        runner.run_all()
        result_now(first)
        for deferred in puts:
            result_now(deferred)
        assert [lease.lease_id for lease in result_now(loaded).leases] == [
            f"l{n:04}" for n in range(sum(sizes))
        ]

    def test_refused_put_spares_the_puts_of_its_batch(self, tmp_path: Path) -> None:
        """A lease the store cannot write fails alone, though its batch's puts ran as one statement."""
        runner = SteppedRunner()
        store = SQLiteStore(tmp_path / "s.db", None, runner=runner)
        first = store.save_term(1, None)
        good = [store.put_leases([make_lease("a")]), store.put_leases([make_lease("c")])]
        bad = store.put_leases([make_lease("b", feature=object())])
        last = store.put_leases([make_lease("d")])
        loaded = store.load()
        runner.step()
        result_now(first)
        runner.run_all()
        for deferred in (*good, last):
            result_now(deferred)
        with pytest.raises(StoreError, match="write refused"):
            result_now(bad)
        assert [lease.lease_id for lease in result_now(loaded).leases] == ["a", "c", "d"]

    def test_refused_write_spares_its_batch(self, tmp_path: Path) -> None:
        """A write the store refuses fails alone; the rest of its batch commits."""
        runner = SteppedRunner()
        store = SQLiteStore(tmp_path / "s.db", None, runner=runner)
        first = store.save_term(1, None)
        good = store.append_entries(make_entries(1, 2))
        bad = store.append_entries(make_entries(5, 5))
        after = store.put_leases([make_lease("a")])
        runner.run_all()
        for deferred in (first, good, after):
            result_now(deferred)
        with pytest.raises(StoreError, match="next index is 3"):
            result_now(bad)
        assert store.commits == 2
        loaded = store.load()
        runner.run_all()
        state = result_now(loaded)
        assert (state.log, state.leases) == (make_entries(1, 2), [make_lease("a")])

    @pytest.mark.allow_logged_errors
    def test_aborted_transaction_fails_the_whole_batch(
        self, tmp_path: Path, logged_errors: list[dict[str, Any]]
    ) -> None:
        """If the transaction is lost, every write of the batch fails and none is kept.

        A trigger that raises ROLLBACK aborts the whole transaction the way a
        full disk or I/O error would; the store must go on working afterwards.
        """
        path = tmp_path / "s.db"
        runner = SteppedRunner()
        store = SQLiteStore(path, None, runner=runner)
        with sqlite3.connect(path) as raw:
            raw.execute(
                "CREATE TRIGGER poison BEFORE INSERT ON leases WHEN NEW.lease_id = 'poison' "
                "BEGIN SELECT RAISE(ROLLBACK, 'poisoned'); END"
            )
        raw.close()
        first = store.put_leases([make_lease("first")])
        batch = [
            store.put_leases([make_lease("second")]),
            store.save_term(5, "ls2"),
            store.put_leases([make_lease("poison")]),
            store.remove_leases(["first"]),
        ]
        runner.run_all()
        result_now(first)
        for deferred in batch:
            with pytest.raises(StoreError):
                result_now(deferred)
        assert store.commits == 1
        later = store.put_leases([make_lease("third")])
        loaded = store.load()
        runner.run_all()
        result_now(later)
        state = result_now(loaded)
        assert [lease.lease_id for lease in state.leases] == ["first", "third"]
        assert state.term == 0
        assert [event["count"] for event in logged_errors] == [4]
        closed = store.close()
        runner.run_all()
        result_now(closed)


class TestSQLiteOpening:
    """What opening a store does with files that are not (yet) usable stores."""

    def open(self, path: Path) -> SQLiteStore:
        """Open with a synchronous runner."""
        return SQLiteStore(path, None, runner=run_now)

    def close(self, store: SQLiteStore) -> None:
        """Close a synchronous store."""
        result_now(store.close())

    def test_durable(self) -> None:
        """The sqlite store says it survives a restart."""
        assert SQLiteStore.durable is True

    def test_creates_missing_directories(self, tmp_path: Path) -> None:
        """The parent directories of the store file are created."""
        path = tmp_path / "var" / "lib" / "licensing" / "store.db"
        self.close(self.open(path))
        assert path.is_file()

    def test_uses_wal_and_records_the_schema_version(self, tmp_path: Path) -> None:
        """The file is in WAL mode and carries the schema version."""
        path = tmp_path / "store.db"
        self.close(self.open(path))
        raw = sqlite3.connect(path)
        try:
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert raw.execute("PRAGMA user_version").fetchone() == (1,)
        finally:
            raw.close()

    def test_newer_schema_is_refused(self, tmp_path: Path) -> None:
        """A store written by a newer release is refused, not misread."""
        path = tmp_path / "store.db"
        self.close(self.open(path))
        raw = sqlite3.connect(path)
        raw.execute("PRAGMA user_version = 2")
        raw.close()
        with pytest.raises(StoreError, match="schema version 2") as caught:
            self.open(path)
        assert str(path) in str(caught.value)

    def test_not_an_sqlite_file(self, tmp_path: Path) -> None:
        """A file that is not SQLite is refused with its path, and left untouched."""
        path = tmp_path / "license.txt"
        content = b"this is a license file, not a database\n" * 50
        path.write_bytes(content)
        with pytest.raises(StoreError, match="move the file away") as caught:
            self.open(path)
        assert str(path) in str(caught.value)
        assert path.read_bytes() == content

    def test_foreign_sqlite_database(self, tmp_path: Path) -> None:
        """Another program's SQLite database is refused and not converted."""
        path = tmp_path / "other.db"
        raw = sqlite3.connect(path)
        raw.execute("CREATE TABLE invoices (id INTEGER)")
        raw.commit()
        raw.close()
        with pytest.raises(StoreError, match="not a licensing store"):
            self.open(path)
        raw = sqlite3.connect(path)
        try:
            assert raw.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        finally:
            raw.close()

    def test_parent_is_a_file(self, tmp_path: Path) -> None:
        """A path under a regular file cannot be created; the error names it."""
        (tmp_path / "blocker").write_text("")
        path = tmp_path / "blocker" / "store.db"
        with pytest.raises(StoreError, match="cannot create the directory") as caught:
            self.open(path)
        assert str(path) in str(caught.value)

    def test_path_is_a_directory(self, tmp_path: Path) -> None:
        """A directory is not a store file; the error names the path."""
        with pytest.raises(StoreError) as caught:
            self.open(tmp_path)
        assert str(tmp_path) in str(caught.value)


class TestOpenStore:
    """open_store picks the backend the configuration names."""

    def test_memory(self) -> None:
        """kind "memory" gives a MemoryStore."""
        assert isinstance(open_store(StoreSpec("memory", None), None), MemoryStore)

    def test_sqlite(self, tmp_path: Path) -> None:
        """kind "sqlite" gives an SQLiteStore whose thread starts and stops with the reactor."""
        reactor = RecordingReactor()
        store = open_store(StoreSpec("sqlite", tmp_path / "s.db"), reactor)
        assert isinstance(store, SQLiteStore)
        assert store.path == tmp_path / "s.db"
        assert len(reactor.when_running) == 1
        assert [(phase, event) for phase, event, _ in reactor.triggers] == [
            ("before", "shutdown")
        ]
        result_now(store.close())
        assert reactor.triggers == []

    def test_sqlite_needs_a_path(self) -> None:
        """A sqlite spec without a path is a StoreError that shows the setting."""
        with pytest.raises(StoreError, match="store = sqlite:"):
            open_store(StoreSpec("sqlite", None), None)

    def test_unknown_kind(self) -> None:
        """Unknown kinds are refused."""
        with pytest.raises(StoreError, match="'redis'"):
            open_store(StoreSpec("redis", None), None)
