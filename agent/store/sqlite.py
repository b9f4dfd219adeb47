"""The durable store (SQLite, WAL): the ledger of command ids and the outbox of unacknowledged messages.

Which write is on the disk before which acknowledgement, and why:
- A command's ledger row (and its `accepted` message) before its PUBACK: a crash before the commit
  makes the broker redeliver the command, never lose it (intake's group commit).
- Its `started` mark before it runs: after a crash a started command is reported `interrupted` and never
  run again (exactly-once). When the command goes straight to an idle worker (and is not mutating: a
  mutating command's audit record is written when it starts), the mark shares the intake's commit: a
  crash between that commit and the run then reports `interrupted` for a command that never ran,
  which the protocol allows ("started but the agent stopped before it finished").
- Its final response in the outbox, with the ledger's `final` state, before that response is
  published: the outbox reads only committed rows, and a synced commit becomes visible to readers only
  after its fsync. The worker does not wait for this commit (`Batch.commit_later`): its next command's
  start mark, or another component's, shares the same fsync.
- Not synced (synchronous=NORMAL, see agent/store/writer.py): outbox deletes after a PUBACK (a lost
  delete only means a resend: responses are at least once, the backend dedups by id + seq), retention
  and bound trims, set-asides, and transient refusals (`busy`, `storage_unavailable`,
  `clock_unsynchronized`), which are not remembered: a power loss may lose such a refusal before it
  was published; the backend resends an id that got no final answer, and a resend is a fresh attempt.
  A SIGKILL loses none of them: they are in the WAL in the OS page cache.

Why two fsyncs per command is the floor one at a time: the start mark must be durable before the run
begins, and the final response durable after the run ends and before it is published; the final's
content does not exist before the run ends, so one fsync cannot do both, and with one command at a
time there is no other command's commit to share. Holding the PUBACK until the final instead would
run a command that is not recorded anywhere: a crash would make the broker redeliver it and run it
twice. Under load the two fsyncs are shared: every write that waits while one commit syncs goes into
the next (group commit, agent/store/writer.py), across the intake and every component's worker.

Writers are serialised on one connection (whoever holds the write lock commits everything waiting);
readers (`get`, `pending`, stats) use a connection of their own and never wait behind an fsync.

Every SQLite failure leaves here as a StoreError carrying SQLite's own error (never one from a
ROLLBACK after it), is counted per operation, and is handed to `on_error`; `trouble` says whether
the store works right now. What the bounds forget, and must hold: agent/store/bounds.py.
"""


from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from agent.store.batch import Batch, execute_all
from agent.store.bounds import Bounds
from agent.store.records import Entry, Outgoing, Pending, Statements, StoreError, Trouble, entry_from_row
from agent.store.writer import Synchronous, Write, commit_writes, is_unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

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
    signer TEXT,
    keep_until REAL
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
CREATE TABLE IF NOT EXISTS fault_sets (
    component TEXT NOT NULL,
    dtc INTEGER NOT NULL,
    status INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (component, dtc)
);
"""
REFUSED_KEEP = 100  # messages the broker refused for good, kept for inspection (oldest dropped; at most
# 100 x max_payload_bytes on the card)

MAX_DEFERRED = 1000  # writes kept in memory while the storage is unavailable
WAL_SIZE_LIMIT = 4 * 1024 * 1024  # the WAL file is cut back to this after a checkpoint
COMPANY_WAIT_S = 0.02  # a write handed over to share a commit expected soon waits at most this long alone

class Store(Bounds):
    """The ledger and the outbox. Writes from any thread are group-committed on one connection (see the
    module docstring); reads run on a second connection and never wait behind a commit's fsync.

    `now` stamps rows (`updated_at`, `created_at`) and is what retention and outbox age are measured
    in: the service passes agent time, which no wall-clock step moves (agent/clock.py).
    """

    def __init__(self, path: Path, on_error: Callable[[StoreError], None] | None = None,
                 now: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.now = now
        self._on_error = on_error or (lambda error: None)
        self._lock = threading.Lock()  # the write connection: held by whoever commits
        self._read_lock = threading.Lock()  # the read connection
        self._count_lock = threading.Lock()  # error counts and trouble, touched from any thread
        self._waiting = threading.Condition(threading.Lock())  # guards _pending, wakes the writer thread
        self._pending: list[Write] = []
        self._writer: threading.Thread | None = None  # commits what nobody waits for; started on first use
        self._urgent = False  # a write nobody waits for is to be committed now
        self._alone_due: float | None = None  # when the writer commits writes that wait for company
        self._closing = False
        self._deferred: list[Statements] = []
        self.errors: dict[str, int] = {}
        self.trouble: Trouble | None = None
        self.deferred_dropped = 0
        self.commits = 0  # commit rounds, how many were synced, and the writes they carried (group commit)
        self.synced = 0
        self.writes = 0
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        except sqlite3.Error as err:
            raise StoreError("open", err) from err
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._sync = Synchronous(self._db)
            self._sync.set(True)
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(ledger)")}
            if "signer" not in columns:  # a store written before signed commands existed
                self._db.execute("ALTER TABLE ledger ADD COLUMN signer TEXT")
            if "keep_until" not in columns:  # a store written before the byte bound held unexpired ids
                self._db.execute("ALTER TABLE ledger ADD COLUMN keep_until REAL")
            self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        except sqlite3.Error as err:
            self._db.close()
            raise StoreError("open", err) from err

    def close(self) -> None:
        """Commits what still waits (a final response handed over without waiting), then closes."""
        with self._waiting:
            self._closing = True
            self._waiting.notify()
        if self._writer is not None:
            self._writer.join(10.0)
        self.flush()
        log.info("store closed: %d writes in %d commits, %d of them synced", self.writes, self.commits, self.synced,
                 extra={"writes": self.writes, "commits": self.commits, "synced": self.synced})
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()

    def quick_check(self) -> list[str]:
        """SQLite's PRAGMA quick_check: ["ok"] for a sound database, else what it found (at most 10)."""
        return self._read(lambda db: [row[0] for row in db.execute("PRAGMA quick_check(10)").fetchall()], "open")

    # ---- errors --------------------------------------------------------------------------------
    @contextmanager
    def _guard(self, operation: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as err:
            raise self._failed(operation, err) from err

    def _failed(self, operation: str, err: sqlite3.Error) -> StoreError:
        """Counts a failure, notes trouble when the storage fails, tells `on_error`; the error to raise."""
        error = StoreError(operation, err)
        with self._count_lock:
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
        return error

    def _worked(self) -> None:
        with self._count_lock:
            trouble, self.trouble = self.trouble, None
        if trouble is not None:
            log.warning("store works again after %.0f s of errors", time.monotonic() - trouble.since,
                        extra={"operation": trouble.operation})

    # ---- writes: group commit ------------------------------------------------------------------
    def _transaction(self, operation: str, work: Callable[[sqlite3.Connection], T], durable: bool = True,
                     defer: Statements | None = None, company: bool = False) -> T:
        """Runs `work` in a transaction shared with whatever else waits to be written (after any writes
        deferred while the storage failed), and returns its result once committed (synced if `durable`).
        With `company` (a commit by another thread is expected within moments), it first waits up to
        COMPANY_WAIT_S for that commit to carry it, then commits alone."""
        write = Write(operation, work, durable, defer)
        with self._waiting:
            self._pending.append(write)
        if not company or not write.finished.wait(COMPANY_WAIT_S):
            with self._lock:  # the leader commits everything waiting; a follower finds its write done
                committed = [] if write.finished.is_set() else self._commit_round()
            self._settle(committed)
        if write.error is not None:
            raise write.error
        return write.result  # type: ignore[no-any-return]

    def _later(self, write: Write, company: bool = False) -> None:
        """Queues a write nobody waits for: the next commit takes it, or the writer thread does, at once,
        or with `company` (another commit is expected soon) after at most COMPANY_WAIT_S."""
        with self._waiting:
            if self._closing:
                raise StoreError(write.operation, sqlite3.ProgrammingError("the store is closing"))
            self._pending.append(write)
            if not company:
                self._urgent = True
            elif self._alone_due is None:
                self._alone_due = time.monotonic() + COMPANY_WAIT_S
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
                self._writer.start()
            self._waiting.notify()

    def _write_loop(self) -> None:
        while True:
            with self._waiting:
                while True:
                    if not self._pending:
                        if self._closing:
                            return
                        self._waiting.wait()
                        continue
                    due = self._alone_due
                    if self._urgent or self._closing or due is None or time.monotonic() >= due:
                        break
                    self._waiting.wait(due - time.monotonic())
            try:
                self.flush()
            except Exception:  # never lose the thread: the writes themselves carry their errors
                log.exception("store writer failed; retrying")
                time.sleep(0.1)

    def flush(self) -> None:
        """Commits everything waiting now."""
        with self._lock:
            committed = self._commit_round()
        self._settle(committed)

    def _commit_round(self) -> list[Write]:
        """Under the write lock: every waiting write in one transaction (one fsync when any must be durable)."""
        with self._waiting:
            writes, self._pending = self._pending, []
            self._urgent, self._alone_due = False, None
        if not writes:
            return []
        try:
            self._flush_deferred()
        except sqlite3.Error as err:
            for write in writes:
                write.error = err
        else:
            commit_writes(self._db, self._sync, writes)
            self.commits += 1
            self.synced += any(w.durable for w in writes)
            self.writes += len(writes)
        worked = False
        for write in writes:
            err = write.error
            if isinstance(err, sqlite3.Error):
                write.error = self._failed(write.operation, err)
                write.error.__cause__ = err
                if write.defer is not None and is_unavailable(err):
                    self._defer(write.defer)
            elif err is None:
                worked = True
            write.finished.set()
        if worked:
            self._worked()
        return writes

    def _settle(self, writes: list[Write]) -> None:
        """Outside the locks: the callbacks of writes nobody waits for."""
        for write in writes:
            if write.on_done is not None:
                try:
                    write.on_done(write)
                except Exception:
                    log.exception("callback after a store write failed", extra={"operation": write.operation})

    def _write(self, statements: Statements, defer: bool = False, durable: bool = True,
               company: bool = False) -> None:
        self._transaction("write", functools.partial(execute_all, statements=statements), durable,
                          statements if defer else None, company)

    def _defer(self, statements: Statements) -> None:
        """Under the write lock."""
        self._deferred.append(statements)
        if len(self._deferred) > MAX_DEFERRED:
            self._deferred.pop(0)
            self.deferred_dropped += 1
            log.error("store unavailable: a deferred write was dropped (more than %d waiting)", MAX_DEFERRED)

    def _flush_deferred(self) -> None:
        """Writes kept while the storage failed, in order; raises while the storage still fails."""
        while self._deferred:
            write = Write("write", functools.partial(execute_all, statements=self._deferred[0]))
            commit_writes(self._db, self._sync, [write])
            if isinstance(write.error, sqlite3.Error):
                if is_unavailable(write.error):
                    raise write.error
                self.deferred_dropped += 1
                log.error("a deferred write cannot be stored and is dropped: %s", write.error)
            elif write.error is not None:
                raise write.error
            self._deferred.pop(0)
            log.info("a write deferred while the store failed is stored now", extra={"left": len(self._deferred)})

    @property
    def deferred(self) -> int:
        """Writes waiting in memory for the storage to work again."""
        return len(self._deferred)

    def commit_group(self, batches: list[Batch], company: bool = False) -> None:
        """Commits several batches in one transaction (one fsync); all of them or none. Synced only if
        one of them holds a write that must be durable. `company`: as in `_transaction`."""
        statements = [s for batch in batches for s in batch.statements]
        if statements:
            self._write(statements, durable=any(batch.durable for batch in batches), company=company)
        for batch in batches:
            batch.statements = []

    def retry_deferred(self) -> None:
        """Stores what was deferred, if the storage works again (raises StoreError while it does not)."""
        if self._deferred:
            self._transaction("write", lambda db: None)

    # ---- reads: their own connection -----------------------------------------------------------
    def _read(self, work: Callable[[sqlite3.Connection], T], operation: str = "read") -> T:
        with self._read_lock, self._guard(operation):
            return work(self._reader)

    # ---- ledger --------------------------------------------------------------------------------
    def read(self, operation: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """Runs a read outside any transaction (no write lock, nothing to fsync), errors accounted as usual."""
        with self._lock, self._guard(operation):
            return work(self._db)

    def get(self, command_id: str) -> Entry | None:
        row = self._read(lambda db: db.execute("SELECT * FROM ledger WHERE id = ?", (command_id,)).fetchone())
        return entry_from_row(row) if row else None

    def entries(self, state: str) -> list[Entry]:
        rows = self._read(lambda db: db.execute(
            "SELECT * FROM ledger WHERE state = ? ORDER BY received_at, rowid", (state,)).fetchall())
        return [entry_from_row(r) for r in rows]

    def batch(self) -> Batch:
        return Batch(self)

    # ---- outbox --------------------------------------------------------------------------------
    def pending(self, after: int, limit: int) -> list[Pending]:
        rows = self._read(lambda db: db.execute(
            "SELECT n, command_id, topic, payload, correlation, created_at FROM outbox WHERE n > ? "
            "ORDER BY n LIMIT ?", (after, limit)).fetchall())
        return [Pending(n, Outgoing(topic, bytes(payload), correlation, cid), created)
                for n, cid, topic, payload, correlation, created in rows]

    def acknowledge(self, numbers: list[int]) -> None:
        """Deletes delivered messages. Not synced: a delete a power loss undoes only means a resend
        (at least once), and the next synced commit makes it durable anyway."""
        if numbers:
            self._transaction("acknowledge", lambda db: execute_all(
                db, [("DELETE FROM outbox WHERE n = ?", (n,)) for n in numbers]), durable=False)

    def outbox_stats(self) -> tuple[int, float | None]:
        """(messages pending, created_at of the oldest)."""
        count, oldest = self._read(lambda db: db.execute("SELECT COUNT(*), MIN(created_at) FROM outbox").fetchone())
        return count, oldest

    def set_aside(self, n: int, reason: str) -> int:
        """Moves an outbox message the broker will never take into `refused` (never deleted as delivered);
        returns how many older refused messages were dropped to keep REFUSED_KEEP."""
        def work(db: sqlite3.Connection) -> int:
            db.execute("INSERT OR REPLACE INTO refused SELECT n, command_id, topic, payload, correlation, "
                       "created_at, ? FROM outbox WHERE n = ?", (reason, n))
            db.execute("DELETE FROM outbox WHERE n = ?", (n,))
            return db.execute("DELETE FROM refused WHERE n IN (SELECT n FROM refused ORDER BY n DESC "
                              "LIMIT -1 OFFSET ?)", (REFUSED_KEEP,)).rowcount

        return self._transaction("acknowledge", work)

    def refused_messages(self) -> list[tuple[Pending, str]]:
        """What was set aside, oldest first, with the reason."""
        rows = self._read(lambda db: db.execute("SELECT n, command_id, topic, payload, correlation, created_at, "
                                                "reason FROM refused ORDER BY n").fetchall())
        return [(Pending(n, Outgoing(topic, bytes(payload), correlation, cid), created), reason)
                for n, cid, topic, payload, correlation, created, reason in rows]

    def fault_set(self, component: str) -> dict[int, int]:
        """The last known faults of a component: 24-bit DTC -> status byte (agent/collect/faults.py)."""
        rows = self._read(lambda db: db.execute(
            "SELECT dtc, status FROM fault_sets WHERE component = ?", (component,)).fetchall())
        return {dtc: status for dtc, status in rows}
