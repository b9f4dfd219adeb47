"""The durable store (SQLite, WAL): the ledger of command ids and the outbox of unacknowledged messages.

Every write that a guarantee rests on is committed with synchronous=FULL before the agent acts
on it: a command is in the ledger before its PUBACK, marked started before it runs, and its final
response is in the outbox before the ledger calls it final.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

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
CREATE TABLE IF NOT EXISTS fault_sets (
    component TEXT NOT NULL,
    dtc INTEGER NOT NULL,
    status INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (component, dtc)
);
"""


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
    """One message to publish (QoS 1, not retained)."""

    topic: str
    payload: bytes
    correlation: bytes | None = None
    command_id: str | None = None


@dataclass(frozen=True)
class Pending:
    n: int
    message: Outgoing
    created_at: float


class Store:
    """One SQLite connection shared by the agent's threads behind a lock; short transactions only."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(ledger)")}
        if "signer" not in columns:  # a store written before signed commands existed
            self._db.execute("ALTER TABLE ledger ADD COLUMN signer TEXT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- transactions --------------------------------------------------------------------------
    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # ---- ledger --------------------------------------------------------------------------------
    def get(self, command_id: str) -> Entry | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM ledger WHERE id = ?", (command_id,)).fetchone()
        return _entry(row) if row else None

    def entries(self, state: str) -> list[Entry]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM ledger WHERE state = ? ORDER BY received_at, rowid",
                                    (state,)).fetchall()
        return [_entry(r) for r in rows]

    def batch(self) -> Batch:
        return Batch(self)

    # ---- outbox --------------------------------------------------------------------------------
    def pending(self, after: int, limit: int) -> list[Pending]:
        with self._lock:
            rows = self._db.execute(
                "SELECT n, command_id, topic, payload, correlation, created_at FROM outbox WHERE n > ? "
                "ORDER BY n LIMIT ?", (after, limit)).fetchall()
        return [Pending(n, Outgoing(topic, bytes(payload), correlation, cid), created)
                for n, cid, topic, payload, correlation, created in rows]

    def acknowledge(self, numbers: list[int]) -> None:
        if numbers:
            self._write([("DELETE FROM outbox WHERE n = ?", (n,)) for n in numbers])

    def outbox_stats(self) -> tuple[int, float | None]:
        """(messages pending, created_at of the oldest)."""
        with self._lock:
            count, oldest = self._db.execute("SELECT COUNT(*), MIN(created_at) FROM outbox").fetchone()
        return count, oldest

    def trim_outbox(self, max_messages: int, max_age_s: float, now: float) -> int:
        """Drops the oldest messages beyond the bounds; returns how many were dropped."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                aged = self._db.execute("DELETE FROM outbox WHERE created_at < ?", (now - max_age_s,)).rowcount
                over = self._db.execute(
                    "DELETE FROM outbox WHERE n IN (SELECT n FROM outbox ORDER BY n DESC LIMIT -1 OFFSET ?)",
                    (max_messages,)).rowcount
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return aged + over

    # ---- fault sets ----------------------------------------------------------------------------
    def fault_set(self, component: str) -> dict[int, int]:
        """The last known faults of a component: 24-bit DTC -> status byte (agent/collect/faults.py)."""
        with self._lock:
            rows = self._db.execute("SELECT dtc, status FROM fault_sets WHERE component = ?", (component,)).fetchall()
        return {dtc: status for dtc, status in rows}

    def prune_ledger(self, retention_s: float, now: float) -> int:
        """Forgets final commands older than the retention time; returns how many."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM ledger WHERE state = 'final' AND updated_at < ?",
                                      (now - retention_s,))
        return cursor.rowcount


class Batch:
    """Statements committed together (one fsync for a group of messages)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._statements: list[tuple[str, tuple[Any, ...]]] = []

    def add_command(self, entry: Entry) -> None:
        self._statements.append((
            "INSERT INTO ledger (id, state, body, reply_topic, correlation, received_at, expires_at, seq, "
            "final_message, updated_at, signer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry.id, entry.state, json.dumps(entry.body), entry.reply_topic, entry.correlation,
             entry.received_at, entry.expires_at, entry.seq,
             json.dumps(entry.final_message) if entry.final_message else None, time.time(), entry.signer)))

    def set_state(self, command_id: str, state: str, seq: int | None = None,
                  final_message: dict[str, Any] | None = None) -> None:
        self._statements.append((
            "UPDATE ledger SET state = ?, seq = COALESCE(?, seq), final_message = COALESCE(?, final_message), "
            "updated_at = ? WHERE id = ?",
            (state, seq, json.dumps(final_message) if final_message else None, time.time(), command_id)))

    def publish(self, message: Outgoing) -> None:
        self._statements.append((
            "INSERT INTO outbox (command_id, topic, payload, correlation, created_at) VALUES (?, ?, ?, ?, ?)",
            (message.command_id, message.topic, message.payload, message.correlation, time.time())))

    def save_fault_set(self, component: str, faults: dict[int, int]) -> None:
        """Replaces a component's last known faults (DTC -> status byte)."""
        self._statements.append(("DELETE FROM fault_sets WHERE component = ?", (component,)))
        now = time.time()
        self._statements += [("INSERT INTO fault_sets (component, dtc, status, updated_at) VALUES (?, ?, ?, ?)",
                              (component, dtc, status, now)) for dtc, status in sorted(faults.items())]

    def commit(self) -> None:
        if self._statements:
            self._store._write(self._statements)
            self._statements = []


def _entry(row: tuple[Any, ...]) -> Entry:
    cid, state, body, reply_topic, correlation, received_at, expires_at, seq, final_message, _, signer = row
    return Entry(cid, state, json.loads(body), reply_topic, correlation, received_at, expires_at, seq,
                 json.loads(final_message) if final_message else None, signer)
