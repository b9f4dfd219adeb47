"""The durable store (SQLite, WAL): the ledger of command ids and the outbox of unacknowledged messages.

Which write is on the disk before which acknowledgement, and why:
- A command's ledger row (and its `accepted` message) before its PUBACK: a crash before the commit
  makes the broker redeliver the command, never lose it (intake's group commit).
- Its `started` mark before it runs: after a crash a started command is reported `interrupted` and never
  run again (exactly-once). When the command goes straight to an idle worker (and is not mutating: a
  mutating command's audit record is written when it starts), the mark shares the intake's commit: a
  crash between that commit and the run then reports `interrupted` for a command that never ran,
  which the protocol allows ("started but the agent stopped before it finished"). The same holds for
  a read marked started ahead of its turn while the command before it runs. While another component is
  busy, that mark waits for another commit to carry it (another component's, the intake's), and when
  its turn comes and none did, its worker commits it then (`hurry`), with its previous final: under
  load one fsync carries a mark and a final for each busy component. With no other component busy it
  is committed at once, its fsync overlapping the exchange before it. Either way the worker never runs
  a command before its mark is on the disk. A clean stop (SIGTERM) queues both kinds again when they
  never ran (agent/system/startmarks.py): only a crash reports them.
- Its final response in the outbox, with the ledger's `final` state, before that response is
  published: the outbox reads only committed rows, and a synced commit becomes visible to readers only
  after its fsync. A worker with more commands queued does not wait for this commit
  (`Batch.commit_later`): it goes with its next command's start mark, or with another component's
  commit, whichever comes first; when that mark was carried already and no other component is busy,
  the writer thread commits it as the next command starts (`soon`), not after COMPANY_WAIT_S. A
  worker with nothing queued commits it itself and, the commit done, hands it to the link on the same
  thread (`Outbox.send_now`), saving two thread wake-ups on the one-at-a-time path.
- Not synced (synchronous=NORMAL, see agent/store/writer.py): outbox deletes after a PUBACK (a lost
  delete only means a resend: responses are at least once, the backend dedups by id + seq; they are
  not even a commit of their own, but ride the next one, or the writer's after COMPANY_WAIT_S), retention
  and bound trims, set-asides, and transient refusals (`busy`, `storage_unavailable`,
  `clock_unsynchronized`), which are not remembered: a power loss may lose such a refusal before it
  was published; the backend resends an id that got no final answer, and a resend is a fresh attempt.
  A SIGKILL loses none of them: they are in the WAL in the OS page cache.

Why two fsyncs per command is the floor one at a time: the start mark must be durable before the run
begins, and the final response durable after the run ends and before it is published; the final's
content does not exist before the run ends, so one fsync cannot do both, and with one command at a
time there is no other command's commit to share. Holding the PUBACK until the final instead would
run a command that is not recorded anywhere: a crash would make the broker redeliver it and run it
twice. (`python -m bench` times one synced commit on the agent's disk and reports the latency floor
this sets: bench/durability.py.) Under load the two fsyncs are shared: every write that waits while
one commit syncs goes into the next (group commit, agent/store/writer.py), across the intake and every
component's worker.

Writers are serialised on one connection (whoever holds the write lock commits everything waiting);
readers (`get`, `pending`, stats) use a connection of their own and never wait behind an fsync.

Every SQLite failure leaves here as a StoreError carrying SQLite's own error (never one from a
ROLLBACK after it), is counted per operation, and is handed to `on_error`; `trouble` says whether
the store works right now. A database file or WAL deleted or replaced while open is such a failure too
(SQLITE_READONLY_DBMOVED, checked before every commit: group.py), never a commit to a file no start reads.
Damage (SQLITE_CORRUPT, SQLITE_NOTADB) on any operation lasts until a restart (`damaged`): writes are
refused though some would still work, and the restart's recovery checks the files (recovery.py).
What the bounds forget, and must hold: agent/store/bounds.py.
"""


from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from agent.store.batch import Batch, execute_all
from agent.store.bounds import Bounds
from agent.store.group import COMPANY_WAIT_S, GroupCommit
from agent.store.records import LEDGER_COLUMNS, Entry, Outgoing, Pending, StoreError, entry_from_row
from agent.store.schema import NewerStoreError, check_version, migrate
from agent.store.writer import Synchronous, Write

# Importers of the store take these from here (their modules: records, batch, group).
__all__ = ["COMPANY_WAIT_S", "REFUSED_KEEP", "Batch", "Entry", "NewerStoreError", "Outgoing", "Pending", "Store",
           "StoreError"]

log = logging.getLogger(__name__)

T = TypeVar("T")

REFUSED_KEEP = 100  # messages the broker refused for good, kept for inspection (oldest dropped; at most
# 100 x max_payload_bytes on the card)

WAL_SIZE_LIMIT = 4 * 1024 * 1024  # the WAL file is cut back to this after a checkpoint


class Store(Bounds, GroupCommit):
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
        super().__init__(on_error)
        self._read_lock = threading.Lock()  # the read connection
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        except sqlite3.Error as err:
            raise StoreError("open", err) from err
        try:
            check_version(self._db, str(path))  # a newer agent's store: refused before anything is written
            self._db.execute("PRAGMA journal_mode=WAL")
            self._sync = Synchronous(self._db)
            self._sync.set(True)
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            migrate(self._db, str(path))
            self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        except NewerStoreError:
            self._db.close()
            raise
        except sqlite3.Error as err:
            self._db.close()
            raise StoreError("open", err) from err
        self._identity = {}  # the files just opened (migrate made them): what every commit must find (group.py)
        for opened in (path, path.with_name(path.name + "-wal")):
            try:
                st = opened.stat()
            except OSError:
                continue
            self._identity[opened] = (st.st_dev, st.st_ino)

    def close(self, timeout: float = 10.0) -> None:
        """Commits what still waits (a final response handed over without waiting), and what was kept in
        memory while the storage failed (a last try: lost when it still fails, and said so), then closes;
        waits at most `timeout` seconds for the writer thread to end (the commits themselves are never
        skipped)."""
        with self._waiting:
            self._closing = True
            self._waiting.notify()
        if self._writer is not None:
            self._writer.join(timeout)
        self.flush()
        try:
            self.retry_deferred()
        except StoreError as err:
            log.error("store %s closed with %d write(s) kept in memory that it could not store: lost (%s); "
                      "commands whose final was among them are reported interrupted after the restart",
                      self.path, self.deferred, err, extra={"store": str(self.path), "lost": self.deferred})
        log.info("store closed: %d writes in %d commits, %d of them synced", self.writes, self.commits, self.synced,
                 extra={"writes": self.writes, "commits": self.commits, "synced": self.synced})
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()

    def quick_check(self) -> list[str]:
        """SQLite's PRAGMA quick_check: ["ok"] for a sound database, else what it found (at most 10)."""
        return self._read(lambda db: [row[0] for row in db.execute("PRAGMA quick_check(10)").fetchall()], "open")

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
        row = self._read(lambda db: db.execute(f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE id = ?",
                                               (command_id,)).fetchone())
        return entry_from_row(row) if row else None

    def entries(self, state: str) -> list[Entry]:
        rows = self._read(lambda db: db.execute(
            f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE state = ? ORDER BY received_at, rowid", (state,)).fetchall())
        return [entry_from_row(r) for r in rows]

    def batch(self) -> Batch:
        return Batch(self)

    def newest_stamp(self) -> float | None:
        """The latest store time a row was stamped with (ledger, outbox, refused, fault sets); None when empty."""
        return self._read(lambda db: db.execute(
            "SELECT MAX(t) FROM (SELECT MAX(updated_at) AS t FROM ledger UNION ALL SELECT MAX(created_at) FROM outbox "
            "UNION ALL SELECT MAX(created_at) FROM refused UNION ALL SELECT MAX(updated_at) FROM fault_sets)"
        ).fetchone()[0])

    # ---- outbox --------------------------------------------------------------------------------
    def pending(self, after: int, limit: int) -> list[Pending]:
        rows = self._read(lambda db: db.execute(
            "SELECT n, command_id, topic, payload, correlation, created_at FROM outbox WHERE n > ? "
            "ORDER BY n LIMIT ?", (after, limit)).fetchall())
        return [Pending(n, Outgoing(topic, bytes(payload), correlation, cid), created)
                for n, cid, topic, payload, correlation, created in rows]

    def acknowledge(self, numbers: list[int]) -> None:
        """Deletes delivered messages, without waiting: the deletes ride the next commit (the next
        command's, or a final's), or the writer thread commits them alone after COMPANY_WAIT_S. Not
        synced: a delete a power loss (or a store failure) undoes only means a resend (at least once),
        and the next synced commit makes it durable anyway. Rows already handed over are never read
        again by the outbox (it reads past the highest it handed), so a delete not yet committed resends
        nothing; a failed delete is counted and logged by the store like any write."""
        if numbers:
            statements = [("DELETE FROM outbox WHERE n = ?", (n,)) for n in numbers]
            self._later(Write("acknowledge", functools.partial(execute_all, statements=statements), durable=False),
                        company=True)

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
