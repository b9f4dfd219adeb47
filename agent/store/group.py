"""Group commit: writes from any thread share one transaction and one fsync on the write connection, and
every SQLite failure on the way becomes a StoreError that is counted and reported.

Whoever holds the write lock commits everything waiting (the leader); a write nobody waits for is
committed by the next commit or by the writer thread. Writes the storage cannot take now can be
deferred in memory (at most MAX_DEFERRED) and are stored, in order, before the next write that works.
Why the store commits this way: agent/store/sqlite.py; one transaction's mechanics: agent/store/writer.py.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from agent.store.batch import execute_all
from agent.store.records import Statements, StoreError, Trouble
from agent.store.writer import DAMAGE_CODES, Synchronous, Write, code_of, commit_writes, is_unavailable

if TYPE_CHECKING:
    from agent.store.batch import Batch

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_DEFERRED = 1000  # writes kept in memory while the storage is unavailable
SQLITE_READONLY_DBMOVED = 1032  # (8 | 4 << 8): READONLY, a storage failure (writer.UNAVAILABLE_CODES)
COMPANY_WAIT_S = 0.02  # a write handed over to share a commit expected soon waits at most this long alone


def _again(err: sqlite3.Error) -> sqlite3.Error:
    """A new exception saying what `err` says (SQLite's message, code and name). Raising `err` itself once per
    refused commit round would chain a frame per round onto its traceback, each holding that round's writes."""
    fresh = type(err)(*err.args)
    for attr in ("sqlite_errorcode", "sqlite_errorname"):
        if hasattr(err, attr):
            setattr(fresh, attr, getattr(err, attr))
    return fresh


class GroupCommit:
    """The write path of Store and its error accounting (a part of Store: the store opens `_db` and `_sync`)."""

    _db: sqlite3.Connection
    _sync: Synchronous
    path: Path
    _identity: dict[Path, tuple[int, int]]  # (device, inode) of the database file and its WAL as opened

    def __init__(self, on_error: Callable[[StoreError], None] | None = None) -> None:
        self._on_error = on_error or (lambda error: None)
        self._lock = threading.Lock()  # the write connection: held by whoever commits
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
        # SQLite said the content is bad (SQLITE_CORRUPT, SQLITE_NOTADB) on any operation: the trouble lasts
        # until a restart (whose recovery moves the files aside), though some reads and writes still work
        self.damaged: sqlite3.Error | None = None
        self.deferred_dropped = 0
        self.commits = 0  # commit rounds, how many were synced, and the writes they carried (group commit)
        # Rises after every transaction, deferred writes' included, under the write lock and before any
        # callback: a reader that noted it before reading and finds it unchanged has seen every commit.
        self.generation = 0
        self.synced = 0
        self.writes = 0

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
                if self.damaged is None and code_of(err) in DAMAGE_CODES:
                    self.damaged = err  # latched: the file's content is bad, and no later write makes it good
                    log.error("store damaged: %s (%s); it refuses writes from now on, and a restart moves it "
                              "aside", error, self.path, extra={"operation": operation, "store": str(self.path)})
                if self.trouble is None:
                    log.error("store failing: %s (%s)", error, self.path,
                              extra={"operation": operation, "sqlite_error": error.code, "store": str(self.path)})
                since = self.trouble.since if self.trouble is not None else time.monotonic()
                self.trouble = Trouble(operation, f"{err} ({error.code})", since)
        try:
            self._on_error(error)
        except Exception:
            log.exception("store error callback failed")
        return error

    def _worked(self) -> None:
        with self._count_lock:
            if self.damaged is not None:  # what still works is not the store working again
                return
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
                wake = not self._urgent
                self._urgent = True
            else:  # the writer need not wake when it already waits for an earlier due time (or is urgent)
                wake = self._alone_due is None and not self._urgent
                if self._alone_due is None:
                    self._alone_due = time.monotonic() + COMPANY_WAIT_S
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
                self._writer.start()
            if wake:
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

    @property
    def writer_alive(self) -> bool:
        """The writer thread runs, or is not needed yet (started on the first write nobody waits for)."""
        writer = self._writer
        return writer is None or writer.is_alive() or self._closing

    def hurry(self, write: Write) -> bool:
        """Commits `write` now on the calling thread, with everything else waiting, unless a commit has
        taken it already (then it returns once that commit is done; its callback may still be running).
        True when this call committed it (and so everything that waited with it), False when another
        commit had: what was handed over after that commit began still waits."""
        with self._lock:
            committed = [] if write.finished.is_set() else self._commit_round()
        self._settle(committed)
        return bool(committed)

    def soon(self) -> None:
        """Has the writer thread commit what waits now, without waiting for it: writes waiting for a
        company that the caller knows is not coming (the next start mark of a worker, stored already)."""
        with self._waiting:
            if self._pending and not self._urgent and self._writer is not None:
                self._urgent = True
                self._waiting.notify()

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
            if self.damaged is not None:
                raise _again(self.damaged)  # never the latched one itself: each raise would add to its traceback
            self._same_file()
            self._flush_deferred()
        except Exception as err:  # every write taken here ends with its error: none is left unfinished
            for write in writes:
                write.error = err
        else:
            commit_writes(self._db, self._sync, writes)
            self.generation += 1
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

    def _same_file(self) -> None:
        """Raises SQLITE_READONLY_DBMOVED (as SQLite does in rollback-journal mode, but not in WAL mode) when
        the database file or its WAL at the store's path is no longer the one open: deleted or replaced under
        the running agent, every commit would go to a file no start will read again, and what it
        acknowledged would be lost. A WAL gone that way still holds commits acknowledged before: they are
        checkpointed into the database file first, so that a crash afterwards loses none of them.
        One stat per file and commit round, against an fsync."""
        for path, known in self._identity.items():
            try:
                st = os.stat(path)
                now: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                now = None
            except OSError:  # cannot even look: SQLite's own error on the write says more
                continue
            if now == known:
                continue
            if path != self.path:  # the WAL: what it holds goes into the database file while it still can
                try:
                    self._db.execute("PRAGMA wal_checkpoint(FULL)").fetchall()
                except sqlite3.Error as err:
                    log.error("checkpoint of %s after it was deleted or replaced failed: %s", path, err)
            err = sqlite3.OperationalError(f"{path} was {'deleted' if now is None else 'replaced'} while open")
            err.sqlite_errorcode = SQLITE_READONLY_DBMOVED  # type: ignore[attr-defined]
            err.sqlite_errorname = "SQLITE_READONLY_DBMOVED"  # type: ignore[attr-defined]
            raise err

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
            self.generation += 1
            if is_unavailable(write.error):
                raise write.error
            if write.error is not None:  # its own data fails (SQLite or not): it never will be stored
                self.deferred_dropped += 1
                log.error("a deferred write cannot be stored and is dropped: %s", write.error)
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
