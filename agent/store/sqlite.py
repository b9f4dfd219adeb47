"""The durable store (SQLite, WAL): the ledger of command ids and the outbox of unacknowledged messages.

Every write that a guarantee rests on is committed with synchronous=FULL before the agent acts
on it: a command is in the ledger before its PUBACK, marked started before it runs, and its final
response is in the outbox before the ledger calls it final.

Every SQLite failure leaves here as a StoreError carrying SQLite's own error (never one from a
ROLLBACK after it), is counted per operation, and is handed to `on_error`; `trouble` says whether
the store works right now.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Statements = list[tuple[str, tuple[Any, ...]]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('queued', 'started', 'final')),
    body TEXT NOT NULL,
    reply_topic TEXT NOT NULL,
    correlation BLOB,
    received_at REAL NOT NULL,
    expires_at REAL,
    seq INTEGER NOT NULL DEFAULT 0,
    final_message TEXT,
    updated_at REAL NOT NULL,
    signer TEXT
);
CREATE INDEX IF NOT EXISTS ledger_state ON ledger (state, updated_at);
CREATE TABLE IF NOT EXISTS outbox (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    correlation BLOB,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS refused (
    n INTEGER PRIMARY KEY,
    command_id TEXT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    correlation BLOB,
    created_at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""
REFUSED_KEEP = 100  # messages the broker refused for good, kept for inspection (oldest dropped; at most
# 100 x max_payload_bytes on the card)

# SQLite primary result codes that mean the storage is the trouble, not the data written:
# BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
UNAVAILABLE_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 26})
MAX_DEFERRED = 1000  # writes kept in memory while the storage is unavailable
WAL_SIZE_LIMIT = 4 * 1024 * 1024  # the WAL file is cut back to this after a checkpoint

# Bytes of a ledger row and of an outbox row, as the byte bounds count them.
LEDGER_ROW_BYTES = ("(length(id) + length(body) + length(reply_topic) + IFNULL(length(correlation), 0)"
                    " + IFNULL(length(final_message), 0) + 48)")
OUTBOX_ROW_BYTES = "(length(payload) + length(topic) + IFNULL(length(correlation), 0) + 32)"


class StoreError(Exception):
    """A store operation failed. `cause` is SQLite's error; `unavailable` when the storage itself is the
    trouble (disk full, I/O error, corruption, locked), not the data that was written."""

    def __init__(self, operation: str, cause: sqlite3.Error) -> None:
        self.operation = operation
        self.cause = cause
        self.code = getattr(cause, "sqlite_errorname", None) or type(cause).__name__
        self.unavailable = is_unavailable(cause)
        super().__init__(f"{operation}: {cause} ({self.code})")


def is_unavailable(err: sqlite3.Error) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in UNAVAILABLE_CODES
    # no code: Python's own checks (misuse) are the data's fault; SQLite's operational errors are not
    return isinstance(err, sqlite3.OperationalError)


@dataclass(frozen=True)
class Trouble:
    """The store has been failing since `since` (monotonic): the latest error and the operation."""

    operation: str
    error: str
    since: float


@dataclass(frozen=True)
class Entry:
    """A ledger row."""

    id: str
    state: str
    body: dict[str, Any]
    reply_topic: str
    correlation: bytes | None
    received_at: float
    expires_at: float | None
    seq: int
    final_message: dict[str, Any] | None
    signer: str | None = None  # the key id that signed the command; None for an unsigned one


@dataclass(frozen=True)
class Outgoing:
    """One message to publish (QoS 1; retained only for collection's state, which the lane publishes itself:
    the outbox table keeps no retain flag)."""

    topic: str
    payload: bytes
    correlation: bytes | None = None
    command_id: str | None = None
    retain: bool = False


@dataclass(frozen=True)
class Pending:
    n: int
    message: Outgoing
    created_at: float


class Store:
    """One SQLite connection shared by the agent's threads behind a lock; short transactions only.

    `now` stamps rows (`updated_at`, `created_at`) and is what retention and outbox age are measured
    in: the service passes agent time, which no wall-clock step moves (agent/clock.py).
    """

    def __init__(self, path: Path, on_error: Callable[[StoreError], None] | None = None,
                 now: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.now = now
        self._on_error = on_error or (lambda error: None)
        self._lock = threading.Lock()
        self._deferred: list[Statements] = []
        self.errors: dict[str, int] = {}
        self.trouble: Trouble | None = None
        self.deferred_dropped = 0
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        except sqlite3.Error as err:
            raise StoreError("open", err) from err
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(ledger)")}
            if "signer" not in columns:  # a store written before signed commands existed
                self._db.execute("ALTER TABLE ledger ADD COLUMN signer TEXT")
        except sqlite3.Error as err:
            self._db.close()
            raise StoreError("open", err) from err

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def quick_check(self) -> list[str]:
        """SQLite's PRAGMA quick_check: ["ok"] for a sound database, else what it found (at most 10)."""
        with self._lock, self._guard("open"):
            return [row[0] for row in self._db.execute("PRAGMA quick_check(10)").fetchall()]

    # ---- errors --------------------------------------------------------------------------------
    @contextmanager
    def _guard(self, operation: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as err:
            error = StoreError(operation, err)
            self.errors[operation] = self.errors.get(operation, 0) + 1
            if error.unavailable:  # the storage fails, not just this write's data
                if self.trouble is None:
                    log.error("store failing: %s", error, extra={"operation": operation, "sqlite_error": error.code})
                since = self.trouble.since if self.trouble is not None else time.monotonic()
                self.trouble = Trouble(operation, f"{err} ({error.code})", since)
            try:
                self._on_error(error)
            except Exception:
                log.exception("store error callback failed")
            raise error from err

    def _worked(self) -> None:
        if self.trouble is not None:
            log.warning("store works again after %.0f s of errors", time.monotonic() - self.trouble.since,
                        extra={"operation": self.trouble.operation})
            self.trouble = None

    # ---- transactions --------------------------------------------------------------------------
    def _transaction(self, operation: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """Runs `work` in one IMMEDIATE transaction, after any writes deferred while the storage failed."""
        with self._lock, self._guard(operation):
            self._flush_deferred()
            result = self._run(work)
        self._worked()
        return result

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work(self._db)
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise  # SQLite's own error, never one from the ROLLBACK
        return result

    def _rollback(self) -> None:
        if not self._db.in_transaction:  # SQLite already rolled back (SQLITE_FULL, I/O errors do)
            return
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as err:
            log.warning("ROLLBACK after a failed write failed too: %s", err)

    def _write(self, statements: Statements, defer: bool = False) -> None:
        try:
            self._transaction("write", lambda db: _execute_all(db, statements))
        except StoreError as err:
            if defer and err.unavailable:
                self._defer(statements)
            raise

    def _defer(self, statements: Statements) -> None:
        with self._lock:
            self._deferred.append(statements)
            if len(self._deferred) > MAX_DEFERRED:
                self._deferred.pop(0)
                self.deferred_dropped += 1
                log.error("store unavailable: a deferred write was dropped (more than %d waiting)", MAX_DEFERRED)

    def _flush_deferred(self) -> None:
        """Writes kept while the storage failed, in order; raises while the storage still fails."""
        while self._deferred:
            statements = self._deferred[0]
            try:
                self._run(functools.partial(_execute_all, statements=statements))
            except sqlite3.Error as err:
                if is_unavailable(err):
                    raise
                self.deferred_dropped += 1
                log.error("a deferred write cannot be stored and is dropped: %s", err)
            self._deferred.pop(0)
            log.info("a write deferred while the store failed is stored now", extra={"left": len(self._deferred)})

    @property
    def deferred(self) -> int:
        """Writes waiting in memory for the storage to work again."""
        return len(self._deferred)

    def commit_group(self, batches: list[Batch]) -> None:
        """Commits several batches in one transaction (one fsync); all of them or none."""
        statements = [s for batch in batches for s in batch.statements]
        if statements:
            self._write(statements)
        for batch in batches:
            batch.statements = []

    def retry_deferred(self) -> None:
        """Stores what was deferred, if the storage works again (raises StoreError while it does not)."""
        if self._deferred:
            self._transaction("write", lambda db: None)

    # ---- ledger --------------------------------------------------------------------------------
    def read(self, operation: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """Runs a read outside any transaction (no write lock, nothing to fsync), errors accounted as usual."""
        with self._lock, self._guard(operation):
            return work(self._db)

    def get(self, command_id: str) -> Entry | None:
        with self._lock, self._guard("read"):
            row = self._db.execute("SELECT * FROM ledger WHERE id = ?", (command_id,)).fetchone()
        return _entry(row) if row else None

    def entries(self, state: str) -> list[Entry]:
        with self._lock, self._guard("read"):
            rows = self._db.execute("SELECT * FROM ledger WHERE state = ? ORDER BY received_at, rowid",
                                    (state,)).fetchall()
        return [_entry(r) for r in rows]

    def batch(self) -> Batch:
        return Batch(self)

    def ledger_bytes(self) -> int:
        with self._lock, self._guard("read"):
            return self._db.execute(f"SELECT IFNULL(SUM({LEDGER_ROW_BYTES}), 0) FROM ledger").fetchone()[0]

    def trim_ledger_bytes(self, max_bytes: int) -> int:
        """Forgets the least recently finished commands while the ledger holds more than `max_bytes`;
        unfinished ones are never forgotten. Returns how many ids were forgotten."""
        def work(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM ledger WHERE rowid IN (SELECT rowid FROM ("
                f" SELECT rowid, SUM({LEDGER_ROW_BYTES}) OVER (ORDER BY updated_at DESC, rowid DESC) AS total"
                " FROM ledger WHERE state = 'final')"
                f" WHERE total > ? - (SELECT IFNULL(SUM({LEDGER_ROW_BYTES}), 0) FROM ledger WHERE state != 'final'))",
                (max_bytes,)).rowcount

        return self._transaction("maintain", work)

    # ---- outbox --------------------------------------------------------------------------------
    def pending(self, after: int, limit: int) -> list[Pending]:
        with self._lock, self._guard("read"):
            rows = self._db.execute(
                "SELECT n, command_id, topic, payload, correlation, created_at FROM outbox WHERE n > ? "
                "ORDER BY n LIMIT ?", (after, limit)).fetchall()
        return [Pending(n, Outgoing(topic, bytes(payload), correlation, cid), created)
                for n, cid, topic, payload, correlation, created in rows]

    def acknowledge(self, numbers: list[int]) -> None:
        if numbers:
            self._transaction("acknowledge", lambda db: _execute_all(
                db, [("DELETE FROM outbox WHERE n = ?", (n,)) for n in numbers]))

    def outbox_stats(self) -> tuple[int, float | None]:
        """(messages pending, created_at of the oldest)."""
        with self._lock, self._guard("read"):
            count, oldest = self._db.execute("SELECT COUNT(*), MIN(created_at) FROM outbox").fetchone()
        return count, oldest

    def trim_outbox(self, max_messages: int, max_age_s: float, now: float) -> int:
        """Drops the oldest messages beyond the bounds; returns how many were dropped."""
        def work(db: sqlite3.Connection) -> int:
            aged = db.execute("DELETE FROM outbox WHERE created_at < ?", (now - max_age_s,)).rowcount
            over = db.execute(
                "DELETE FROM outbox WHERE n IN (SELECT n FROM outbox ORDER BY n DESC LIMIT -1 OFFSET ?)",
                (max_messages,)).rowcount
            return aged + over

        return self._transaction("maintain", work)

    def trim_outbox_bytes(self, max_bytes: int) -> int:
        """Drops the oldest messages while the outbox holds more than `max_bytes`; returns how many."""
        def work(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM outbox WHERE n IN (SELECT n FROM ("
                f" SELECT n, SUM({OUTBOX_ROW_BYTES}) OVER (ORDER BY n DESC) AS total FROM outbox)"
                " WHERE total > ?)", (max_bytes,)).rowcount

        return self._transaction("maintain", work)

    def set_aside(self, n: int, reason: str) -> int:
        """Moves an outbox message the broker will never take into `refused` (never deleted as delivered);
        returns how many older refused messages were dropped to keep REFUSED_KEEP."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO refused SELECT n, command_id, topic, payload, correlation, "
                                 "created_at, ? FROM outbox WHERE n = ?", (reason, n))
                self._db.execute("DELETE FROM outbox WHERE n = ?", (n,))
                dropped = self._db.execute(
                    "DELETE FROM refused WHERE n IN (SELECT n FROM refused ORDER BY n DESC LIMIT -1 OFFSET ?)",
                    (REFUSED_KEEP,)).rowcount
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return dropped

    def refused_messages(self) -> list[tuple[Pending, str]]:
        """What was set aside, oldest first, with the reason."""
        with self._lock:
            rows = self._db.execute("SELECT n, command_id, topic, payload, correlation, created_at, reason "
                                    "FROM refused ORDER BY n").fetchall()
        return [(Pending(n, Outgoing(topic, bytes(payload), correlation, cid), created), reason)
                for n, cid, topic, payload, correlation, created, reason in rows]

    def prune_ledger(self, retention_s: float, now: float) -> int:
        """Forgets final commands older than the retention time; returns how many."""
        return self._transaction("maintain", lambda db: db.execute(
            "DELETE FROM ledger WHERE state = 'final' AND updated_at < ?", (now - retention_s,)).rowcount)


class Batch:
    """Statements committed together (one fsync for a group of messages)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.statements: Statements = []

    def add_command(self, entry: Entry) -> None:
        self.statements.append((
            "INSERT INTO ledger (id, state, body, reply_topic, correlation, received_at, expires_at, seq, "
            "final_message, updated_at, signer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry.id, entry.state, json.dumps(entry.body), entry.reply_topic, entry.correlation,
             entry.received_at, entry.expires_at, entry.seq,
             json.dumps(entry.final_message) if entry.final_message else None, self._store.now(), entry.signer)))

    def set_state(self, command_id: str, state: str, seq: int | None = None,
                  final_message: dict[str, Any] | None = None) -> None:
        """A finished command keeps its id and final message, not its body (the ledger stays small)."""
        self.statements.append((
            "UPDATE ledger SET state = ?, seq = COALESCE(?, seq), final_message = COALESCE(?, final_message), "
            "body = CASE WHEN ? = 'final' THEN '{}' ELSE body END, updated_at = ? WHERE id = ?",
            (state, seq, json.dumps(final_message) if final_message else None, state, self._store.now(), command_id)))

    def forget(self, command_id: str) -> None:
        """Removes a command from the ledger: its refusal was transient, the same id may come again."""
        self.statements.append(("DELETE FROM ledger WHERE id = ?", (command_id,)))

    def publish(self, message: Outgoing) -> None:
        self.statements.append((
            "INSERT INTO outbox (command_id, topic, payload, correlation, created_at) VALUES (?, ?, ?, ?, ?)",
            (message.command_id, message.topic, message.payload, message.correlation, self._store.now())))

    def commit(self, defer: bool = False) -> None:
        """Commits the statements. With `defer`, a write the storage cannot take now is kept in memory
        and stored before the next write that succeeds (StoreError is still raised)."""
        if self.statements:
            statements, self.statements = self.statements, []
            try:
                self._store._write(statements, defer=defer)
            except StoreError:
                self.statements = [] if defer else statements
                raise


def _execute_all(db: sqlite3.Connection, statements: Statements) -> None:
    for sql, args in statements:
        db.execute(sql, args)


def _entry(row: tuple[Any, ...]) -> Entry:
    cid, state, body, reply_topic, correlation, received_at, expires_at, seq, final_message, _, signer = row
    return Entry(cid, state, json.loads(body), reply_topic, correlation, received_at, expires_at, seq,
                 json.loads(final_message) if final_message else None, signer)
