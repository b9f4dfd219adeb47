"""One group commit's transaction: the writes waiting from every thread, in one SQLite transaction and one
fsync (who commits them, and when: group.py).

A `Write` is one caller's unit (an intake group, a start mark, a final response, an outbox delete).
`commit_writes` runs a list of them in one transaction, each inside its own SAVEPOINT so that a write
failing for its own data (a constraint, a trigger) fails alone and the others still commit. The
transaction is synced (synchronous=FULL) when any of its writes must be durable; otherwise it is
committed with synchronous=NORMAL, which in WAL mode writes the WAL without an fsync: such a commit
survives a crash of the process (the WAL is in the OS page cache), and a power loss may undo it, never
tear it (WAL frames are checksummed: a torn tail is discarded as a whole). The next synced commit makes
it durable too, since fdatasync covers the whole WAL file.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

Work = Callable[[sqlite3.Connection], Any]


@dataclass(eq=False)
class Write:
    """One caller's writes. `on_done` (for a caller that does not wait) runs after the commit, outside
    the store's locks, on whichever thread committed it."""

    operation: str
    work: Work
    durable: bool = True
    defer: list[tuple[str, tuple[Any, ...]]] | None = None  # kept in memory if the storage fails
    on_done: Callable[[Write], None] | None = None
    result: Any = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


def is_unavailable(err: BaseException) -> bool:
    """SQLite says the storage is the trouble (disk full, I/O, corruption, locked), not the data."""
    if not isinstance(err, sqlite3.Error):
        return False
    code = code_of(err)
    if code is not None:
        return code in UNAVAILABLE_CODES
    # no code: Python's own checks (misuse) are the data's fault; SQLite's operational errors are not
    return isinstance(err, sqlite3.OperationalError)


# SQLite primary result codes that mean the storage is the trouble, not the data written:
# BUSY, LOCKED, NOMEM, READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB.
UNAVAILABLE_CODES = frozenset({5, 6, 7, 8, 10, 11, 13, 14, 15, 26})
DAMAGE_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB: the content is bad (recovery.py moves it aside)


def code_of(err: BaseException | None) -> int | None:
    """SQLite's primary result code of `err` (None for Python's own checks, or no SQLite error at all)."""
    code = getattr(err, "sqlite_errorcode", None)
    return code & 0xFF if code is not None else None


class Synchronous:
    """The connection's `synchronous` setting, changed only when a transaction needs the other one."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._full: bool | None = None

    def set(self, full: bool) -> None:
        if full is not self._full:
            self._db.execute("PRAGMA synchronous=FULL" if full else "PRAGMA synchronous=NORMAL")
            self._full = full


def commit_writes(db: sqlite3.Connection, synchronous: Synchronous, writes: list[Write]) -> None:
    """Commits `writes` in as few transactions as their failures allow (one when none fails); each
    write ends with `result` or `error` set. Never raises for a write's failure."""
    remaining = writes
    while remaining:
        remaining = _one_transaction(db, synchronous, remaining)


def _one_transaction(db: sqlite3.Connection, synchronous: Synchronous, writes: list[Write]) -> list[Write]:
    """One transaction over `writes`; returns the writes to try again in a fresh one (when SQLite rolled
    the whole transaction back for the sake of one write's data)."""
    try:
        synchronous.set(any(w.durable for w in writes))
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as err:
        _fail(writes, err)
        return []
    alone = len(writes) == 1
    ok: list[Write] = []
    for i, write in enumerate(writes):
        try:
            if not alone:
                db.execute("SAVEPOINT w")
            write.result = write.work(db)
            if not alone:
                db.execute("RELEASE w")
            ok.append(write)
        except Exception as err:  # this write's own failure: it fails alone where SQLite lets it
            write.error = err
            if is_unavailable(err):  # the storage fails: nothing in this transaction can be stored
                rollback(db)
                _fail(ok + writes[i + 1:], err)
                return []
            if not db.in_transaction:  # SQLite rolled everything back: the others go again
                return ok + writes[i + 1:]
            if not alone:
                try:
                    db.execute("ROLLBACK TO w")
                    db.execute("RELEASE w")
                except sqlite3.Error as again:
                    rollback(db)
                    _fail(ok + writes[i + 1:], again)
                    return []
    if not ok:
        rollback(db)
        return []
    try:
        db.execute("COMMIT")
    except sqlite3.Error as err:
        rollback(db)
        _fail(ok, err)
    return []


def _fail(writes: list[Write], err: BaseException) -> None:
    for write in writes:
        write.error, write.result = err, None


def rollback(db: sqlite3.Connection) -> None:
    if not db.in_transaction:  # SQLite already rolled back (SQLITE_FULL, I/O errors do)
        return
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error as err:
        log.warning("ROLLBACK after a failed write failed too: %s", err)
