"""The durable ILicenseStore: one SQLite file in WAL mode, written by one thread.

Every statement runs on one dedicated thread, so the reactor never waits for
the disk. Writes are committed with ``synchronous=FULL``: a write's
Deferred fires only after its transaction's WAL frames were fsynced, so nothing
acknowledged is lost on ``kill -9`` or on power loss.

fsync is the cost that matters, so writes are group-committed: while one
transaction is on the thread, later writes wait in a queue and all of them go
into the next transaction together. Each write runs inside its own savepoint,
so a write the store refuses (say, a log entry that does not follow the last
one) fails alone and leaves the other writes of its batch in place; a batch
whose transaction cannot commit fails every write in it and changes nothing.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import fields
from functools import partial
from operator import attrgetter
from pathlib import Path
from queue import SimpleQueue
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..errors import StoreError
from ..interfaces import ILicenseStore
from ..records import InstalledLicense, Lease, LogEntry, Snapshot, StoredState
from ._validation import check_append

SCHEMA_VERSION = 1
"""Kept in ``PRAGMA user_version``; a file with a higher number is refused."""

BUSY_TIMEOUT = 10.0
"""Seconds to wait for another process (``licensectl``) holding the write lock."""

_SCHEMA = (
    "CREATE TABLE meta ("
    " id INTEGER PRIMARY KEY CHECK (id = 0),"
    " term INTEGER NOT NULL,"
    " voted_for TEXT)",
    "CREATE TABLE log ("
    " idx INTEGER PRIMARY KEY,"
    " term INTEGER NOT NULL,"
    " data BLOB NOT NULL)",
    "CREATE TABLE snapshot ("
    " id INTEGER PRIMARY KEY CHECK (id = 0),"
    " idx INTEGER NOT NULL,"
    " term INTEGER NOT NULL,"
    " data BLOB NOT NULL)",
    "CREATE TABLE license ("
    " id INTEGER PRIMARY KEY CHECK (id = 0),"
    " sequence INTEGER NOT NULL,"
    " data BLOB NOT NULL)",
    "CREATE TABLE leases ("
    " lease_id TEXT PRIMARY KEY,"
    " feature TEXT NOT NULL,"
    " version TEXT NOT NULL,"
    " client_id TEXT NOT NULL,"
    " user TEXT NOT NULL,"
    " host TEXT NOT NULL,"
    " count INTEGER NOT NULL,"
    " server TEXT NOT NULL,"
    " issued_at REAL NOT NULL,"
    " expires_at REAL NOT NULL"
    ") WITHOUT ROWID",
    "INSERT INTO meta (id, term, voted_for) VALUES (0, 0, NULL)",
)

_LEASE_COLUMNS = tuple(field.name for field in fields(Lease))
_LEASE_COLUMN_LIST = ", ".join(_LEASE_COLUMNS)
_lease_row = attrgetter(*_LEASE_COLUMNS)
"""A lease as the tuple of its column values, in one C call (one per checkout)."""
_ROWS_PER_PUT = (64, 32, 16, 8, 4, 2, 1)
"""Rows per multi-row INSERT, largest first: a batch's puts take a few statements
(640 parameters at most, under SQLite's limit) from seven cached texts."""
_PUT_ROWS = {
    n: f"INSERT OR REPLACE INTO leases ({_LEASE_COLUMN_LIST}) VALUES "
    + ", ".join([f"({', '.join('?' for _ in _LEASE_COLUMNS)})"] * n)
    for n in _ROWS_PER_PUT
}

# Errors that mean "this write is wrong", not "the database is in trouble":
# they fail only the write that caused them.
_REFUSED_WRITE = (
    StoreError,
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
)

Runner = Callable[[Callable[[], Any]], "Deferred[Any]"]
"""Runs a function on the store's thread and fires with its result."""

_Write = Callable[[sqlite3.Connection], Any]


@implementer(ILicenseStore)
class SQLiteStore:
    """The SQLite backend; see the module docstring for threading and durability.

    Opening happens in the constructor, on the calling thread, so a bad path
    is reported at once (``StoreError``) instead of on the first write; it
    runs at start-up, before the server serves anyone.

    ``runner`` replaces the store's thread (unit tests pass one that runs the
    function at once). ``commits`` counts committed transactions, for the
    group-commit test and for metrics.

    With its own thread, a write that finds the store idle does not start a
    transaction at once but at the end of the reactor's current turn, so
    every request read in that turn shares one transaction, one fsync and
    one hand-off to the thread and back; it costs no wait, only the order of
    work within the turn.
    """

    durable = True

    _log = Logger()

    def __init__(self, path: Path, reactor: IReactorCore, *, runner: Runner | None = None) -> None:
        self.path = path
        self.commits = 0
        self._conn = _open(path)
        self._reactor = reactor
        self._queue: list[tuple[_Write, Deferred[Any]]] = []
        self._in_flight = False
        self._kicking = False
        self._closing = False
        self._releasing = False
        self._released = False
        self._close_waiters: list[Deferred[None]] = []
        self._thread: _StoreThread | None = None
        self._shutdown_trigger: Any = None
        self._gathering: Any = None
        if runner is None:
            thread = _StoreThread(reactor, f"sqlite-store:{path}")
            self._thread = thread
            runner = thread.run
            reactor.callWhenRunning(self._start_thread)
            self._shutdown_trigger = reactor.addSystemEventTrigger(
                "before", "shutdown", self._close_at_shutdown
            )
        self._run: Runner = runner

    def load(self) -> Deferred[StoredState]:
        """Read everything, after every write called before this one."""
        return self._submit(_load)

    def save_term(self, term: int, voted_for: str | None) -> Deferred[None]:
        """Record the current term and vote."""
        return self._submit(partial(_save_term, term, voted_for))

    def append_entries(self, entries: list[LogEntry]) -> Deferred[None]:
        """Append entries that continue the log; anything else fails with StoreError."""
        rows = [(entry.index, entry.term, entry.data) for entry in entries]
        return self._submit(partial(_append_entries, list(entries), rows))

    def truncate_log(self, from_index: int) -> Deferred[None]:
        """Drop every entry with index >= from_index."""
        return self._submit(partial(_truncate_log, from_index))

    def save_snapshot(self, snapshot: Snapshot) -> Deferred[None]:
        """Replace the snapshot and drop the entries it covers."""
        return self._submit(partial(_save_snapshot, snapshot))

    def save_license(self, license: InstalledLicense) -> Deferred[None]:
        """Replace the installed license file."""
        return self._submit(partial(_save_license, license))

    def put_leases(self, leases: list[Lease]) -> Deferred[None]:
        """Insert or replace leases by id."""
        return self._submit(_PutLeases([_lease_row(lease) for lease in leases]))

    def remove_leases(self, lease_ids: list[str]) -> Deferred[None]:
        """Delete leases by id, ignoring ids that are not held."""
        rows = [(lease_id,) for lease_id in lease_ids]
        return self._submit(partial(_remove_leases, rows))

    def close(self) -> Deferred[None]:
        """Commit what is queued, close the file and stop the thread.

        Writes called after this fail with StoreError at once.
        """
        if self._released:
            return succeed(None)
        if not self._closing:
            self._closing = True
            if self._shutdown_trigger is not None:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
                self._shutdown_trigger = None
        waiter: Deferred[None] = Deferred()
        self._close_waiters.append(waiter)
        self._release_when_idle()
        return waiter

    def _start_thread(self) -> None:
        # A store closed before the reactor started needs no thread.
        if self._thread is not None and not self._releasing:
            self._thread.start()

    def _close_at_shutdown(self) -> Deferred[None]:
        # The reactor fires this trigger itself; removing a trigger while it
        # fires is deprecated, so forget it instead.
        self._shutdown_trigger = None
        return self.close()

    def _submit(self, write: _Write) -> Deferred[Any]:
        if self._closing:
            return fail(StoreError(f"{self.path}: the store is closed"))
        done: Deferred[Any] = Deferred()
        self._queue.append((write, done))
        if self._thread is None:
            self._kick()
        elif not self._in_flight and self._gathering is None:
            self._gathering = self._reactor.callLater(0, self._gathered)
        return done

    def _gathered(self) -> None:
        self._gathering = None
        self._kick()

    def _kick(self) -> None:
        """Start a transaction with everything queued, unless one is in flight.

        With a synchronous runner a batch completes inside ``self._run`` and
        its callers may queue more writes from their callbacks; the loop
        (rather than recursion) picks those up.
        """
        if self._kicking:
            return
        self._kicking = True
        try:
            while self._queue and not self._in_flight:
                batch, self._queue = self._queue, []
                self._in_flight = True
                writes = [write for write, _ in batch]
                ran = self._run(partial(_transaction, self._conn, self.path, writes))
                ran.addBoth(self._batch_done, batch)
                ran.addErrback(
                    lambda failure: self._log.failure("store batch bookkeeping failed", failure)
                )
        finally:
            self._kicking = False

    def _batch_done(
        self, outcome: list[tuple[bool, Any]] | Failure, batch: list[tuple[_Write, Deferred[Any]]]
    ) -> None:
        # Writes queued from these callbacks stay queued until every caller
        # of this batch has been told, then go out together.
        if isinstance(outcome, Failure):
            self._log.error(
                "store {path} could not commit {count} writes: {error}",
                path=str(self.path),
                count=len(batch),
                error=outcome.getErrorMessage(),
            )
            for _, done in batch:
                done.errback(outcome.value)
        else:
            self.commits += 1
            for (_, done), (ok, value) in zip(batch, outcome, strict=True):
                if ok:
                    done.callback(value)
                else:
                    done.errback(value)
        self._in_flight = False
        self._kick()
        self._release_when_idle()

    def _release_when_idle(self) -> None:
        if not self._closing or self._releasing or self._in_flight or self._queue:
            return
        self._releasing = True
        if self._thread is not None and not self._thread.started:
            # The reactor never ran, so the thread never started and nothing
            # else can be using the connection: close it here.
            self._conn.close()
            self._finish_close(None)
            return
        closed = self._run(self._conn.close)
        closed.addBoth(self._finish_close)

    def _finish_close(self, outcome: object) -> None:
        if self._thread is not None:
            self._thread.stop()
        self._released = True
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(StoreError(f"{self.path}: closing failed: {outcome.value}"))
            else:
                waiter.callback(None)


class _StoreThread:
    """The one thread that uses the store's connection, fed through a queue.

    Lighter than a one-thread ``ThreadPool``: handing a batch over is one put
    on a C ``SimpleQueue`` (no Python-level locks, conditions or context
    copies on the reactor thread) and its outcome comes back with one
    ``callFromThread``. A daemon, so a store never closed cannot keep the
    process alive; nothing is acknowledged before its commit, so stopping
    mid-batch is a kill -9 as far as the file is concerned.
    """

    def __init__(self, reactor: IReactorFromThreads, name: str) -> None:
        self._reactor = reactor
        self._work: SimpleQueue[tuple[Callable[[], Any], Deferred[Any]] | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.started = False

    def start(self) -> None:
        self.started = True
        self._thread.start()

    def run(self, function: Callable[[], Any]) -> Deferred[Any]:
        """Run ``function`` on the thread (once started); fires in the reactor thread."""
        done: Deferred[Any] = Deferred()
        self._work.put((function, done))
        return done

    def stop(self) -> None:
        """Finish what was handed over, then end the thread and wait for it."""
        if self.started:
            self._work.put(None)
            self._thread.join()

    def _serve(self) -> None:
        call = self._reactor.callFromThread
        while (work := self._work.get()) is not None:
            function, done = work
            try:
                result = function()
            except BaseException:
                call(done.errback, Failure())
            else:
                call(done.callback, result)


def _open(path: Path) -> sqlite3.Connection:
    """Open or create the store file; every problem becomes a StoreError that says what to do."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StoreError(
            f"{path}: cannot create the directory {path.parent} ({error.strerror}); "
            "create it with write access for the server or choose another store path"
        ) from error
    try:
        conn = sqlite3.connect(
            str(path), timeout=BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as error:
        raise StoreError(
            f"{path}: cannot open the store ({error}); "
            "the path must be a file the server can read and write"
        ) from error
    try:
        _prepare(conn, path)
    except sqlite3.DatabaseError as error:
        conn.close()
        raise StoreError(
            f"{path}: cannot use this file as a store ({error}); it must be an SQLite store "
            "written by licensing, in a directory the server can write; "
            "move the file away to start with an empty store"
        ) from error
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: Path) -> None:
    """Check the file is ours (before changing it), switch to WAL, create the schema."""
    _check_version(conn, path)
    (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
    if mode.lower() != "wal":
        raise StoreError(
            f"{path}: SQLite cannot use WAL mode here (journal mode is {mode}); "
            "put the store on a local file system"
        )
    conn.execute("PRAGMA synchronous=FULL")
    # A multi-row INSERT OR REPLACE keeps a statement journal of the pages it
    # changes; on a file it spills past 64 KiB, a write per page to a file
    # nobody needs once the statement is done. Durability is the WAL's alone.
    conn.execute("PRAGMA temp_store=MEMORY")
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _check_version(conn, path) == 0:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        # A write on every open, so a read-only file fails here and not on
        # the first checkout.
        conn.execute("INSERT OR IGNORE INTO meta (id, term, voted_for) VALUES (0, 0, NULL)")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _check_version(conn: sqlite3.Connection, path: Path) -> int:
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: the store has schema version {version}, newer than the {SCHEMA_VERSION} "
            "this release knows; run the licensing release that wrote it, or a newer one"
        )
    if version == 0:
        (objects,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        if objects:
            raise StoreError(
                f"{path}: this SQLite database is not a licensing store; "
                "choose another store path"
            )
    return int(version)


def _transaction(
    conn: sqlite3.Connection, path: Path, writes: Sequence[_Write]
) -> list[tuple[bool, Any]]:
    """Run one batch in one transaction, on the store's thread.

    Returns ``(True, result)`` or ``(False, StoreError)`` per write. Raises
    StoreError (after rolling back) if the batch as a whole cannot commit.
    """
    outcomes: list[tuple[bool, Any]] = []
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.execute("BEGIN IMMEDIATE")
        # Fast path: almost every batch is all good writes, and a savepoint per
        # write triples the statements. Only a batch with a refused write is
        # rolled back and run again write by write, so that one fails alone.
        try:
            results = _run_together(conn, writes)
        except _REFUSED_WRITE:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
        else:
            conn.execute("COMMIT")
            return results
        for write in writes:
            conn.execute("SAVEPOINT write")
            try:
                outcomes.append((True, write(conn)))
            except _REFUSED_WRITE as error:
                if not conn.in_transaction:
                    raise StoreError(f"{path}: the transaction was aborted ({error})") from error
                conn.execute("ROLLBACK TO write")
                outcomes.append((False, _refusal(path, error)))
            conn.execute("RELEASE write")
        conn.execute("COMMIT")
    except BaseException as error:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the next batch retries the rollback before it begins
        if isinstance(error, sqlite3.Error):
            raise StoreError(f"{path}: the write transaction failed ({error})") from error
        raise
    return outcomes


def _run_together(conn: sqlite3.Connection, writes: Sequence[_Write]) -> list[tuple[bool, Any]]:
    """Run a batch's writes in order, the rows of consecutive lease puts together.

    A batch under checkout load is mostly puts, one lease each.
    """
    results: list[tuple[bool, Any]] = []
    rows: list[tuple[Any, ...]] = []
    for write in writes:
        if type(write) is _PutLeases:
            rows += write.rows
            results.append((True, None))
            continue
        if rows:
            _insert_leases(conn, rows)
            rows = []
        results.append((True, write(conn)))
    if rows:
        _insert_leases(conn, rows)
    return results


def _insert_leases(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert or replace lease rows with a few multi-row statements.

    Not ``executemany``: the sqlite3 module lets go of the GIL around every
    statement step, once per row there, and under load the reactor thread
    holds the GIL most of the time, so each row cost this thread a wait and
    both threads a hand-over. A statement of 64 rows waits once.
    """
    start, end = 0, len(rows)
    for size in _ROWS_PER_PUT:
        statement = _PUT_ROWS[size]
        while end - start >= size:
            conn.execute(statement, [value for row in rows[start : start + size] for value in row])
            start += size


def _refusal(path: Path, error: Exception) -> StoreError:
    if isinstance(error, StoreError):
        return error
    refusal = StoreError(f"{path}: write refused ({error})")
    refusal.__cause__ = error
    return refusal


def _last_index(conn: sqlite3.Connection) -> int:
    (last,) = conn.execute("SELECT max(idx) FROM log").fetchone()
    if last is not None:
        return int(last)
    row = conn.execute("SELECT idx FROM snapshot WHERE id = 0").fetchone()
    return int(row[0]) if row is not None else 0


def _load(conn: sqlite3.Connection) -> StoredState:
    term, voted_for = conn.execute("SELECT term, voted_for FROM meta WHERE id = 0").fetchone()
    row = conn.execute("SELECT idx, term, data FROM snapshot WHERE id = 0").fetchone()
    snapshot = Snapshot(row[0], row[1], bytes(row[2])) if row is not None else None
    after = snapshot.index if snapshot is not None else None
    log_rows = conn.execute(
        "SELECT idx, term, data FROM log WHERE ? IS NULL OR idx > ? ORDER BY idx", (after, after)
    )
    log = [LogEntry(index, entry_term, bytes(data)) for index, entry_term, data in log_rows]
    row = conn.execute("SELECT sequence, data FROM license WHERE id = 0").fetchone()
    license = InstalledLicense(row[0], bytes(row[1])) if row is not None else None
    lease_rows = conn.execute(f"SELECT {_LEASE_COLUMN_LIST} FROM leases ORDER BY lease_id")
    leases = [Lease(*lease_row) for lease_row in lease_rows]
    return StoredState(
        term=term,
        voted_for=voted_for,
        snapshot=snapshot,
        log=log,
        license=license,
        leases=leases,
    )


def _save_term(term: int, voted_for: str | None, conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE meta SET term = ?, voted_for = ? WHERE id = 0", (term, voted_for))


def _append_entries(
    entries: list[LogEntry], rows: list[tuple[int, int, bytes]], conn: sqlite3.Connection
) -> None:
    check_append(_last_index(conn), entries)
    conn.executemany("INSERT INTO log (idx, term, data) VALUES (?, ?, ?)", rows)


def _truncate_log(from_index: int, conn: sqlite3.Connection) -> None:
    conn.execute("DELETE FROM log WHERE idx >= ?", (from_index,))


def _save_snapshot(snapshot: Snapshot, conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO snapshot (id, idx, term, data) VALUES (0, ?, ?, ?)",
        (snapshot.index, snapshot.term, snapshot.data),
    )
    conn.execute("DELETE FROM log WHERE idx <= ?", (snapshot.index,))


def _save_license(license: InstalledLicense, conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO license (id, sequence, data) VALUES (0, ?, ?)",
        (license.sequence, license.data),
    )


class _PutLeases:
    """A ``put_leases`` write: its rows, so a batch can put many writes' rows at once."""

    __slots__ = ("rows",)

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def __call__(self, conn: sqlite3.Connection) -> None:
        _insert_leases(conn, self.rows)


def _remove_leases(rows: list[tuple[str]], conn: sqlite3.Connection) -> None:
    conn.executemany("DELETE FROM leases WHERE lease_id = ?", rows)
