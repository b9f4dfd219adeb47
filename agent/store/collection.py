"""Collection's durable tables: applied plans, the telemetry lane waiting for the outbox, last-known state.

Telemetry waits in a lane of its own with a byte bound (oldest batches dropped first, counted): it
moves into the outbox only a few rows at a time and only when no response waits there, so command
responses always have room and go first. A batch and its plan's batch number are written in one
transaction. State keeps one row per component: only the newest state matters.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.store.sqlite import Store

T = TypeVar("T")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS plans (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        body TEXT,
        seq INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS telemetry (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS state (
        component TEXT PRIMARY KEY,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        generation INTEGER NOT NULL,
        sent INTEGER NOT NULL DEFAULT 0
    )""",
)


@dataclass(frozen=True)
class PlanRow:
    name: str
    version: int
    body: dict[str, Any] | None
    seq: int


@dataclass(frozen=True)
class StateRow:
    component: str
    topic: str
    payload: bytes
    generation: int


class CollectionStore:
    """Collection's tables in the agent's store (same file, same connection, same lock)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._now: Callable[[], float] = store.now  # agent time, as the outbox's own rows are stamped

        def create(db: sqlite3.Connection) -> None:
            for statement in SCHEMA:
                db.execute(statement)

        self._tx("collection tables", create)

    def _tx(self, operation: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """One IMMEDIATE transaction through the store: its lock, its error accounting (StoreError)."""
        return self._store._transaction(operation, work)

    # ---- plans ---------------------------------------------------------------------------------
    def load_plans(self) -> list[PlanRow]:
        rows = self._store.read("load plans", lambda db: db.execute(
            "SELECT name, version, body, seq FROM plans ORDER BY name").fetchall())
        return [PlanRow(name, version, json.loads(body) if body is not None else None, seq)
                for name, version, body, seq in rows]

    def save_plan(self, name: str, version: int, body: dict[str, Any] | None) -> None:
        """Records an applied plan (body None: removed, its version kept); the batch number carries on."""
        text = json.dumps(body, separators=(",", ":")) if body is not None else None
        self._tx("save plan", lambda db: db.execute(
            "INSERT INTO plans (name, version, body, seq, updated_at) VALUES (?, ?, ?, 0, ?) "
            "ON CONFLICT(name) DO UPDATE SET version = excluded.version, body = excluded.body, "
            "updated_at = excluded.updated_at", (name, version, text, self._now())))

    # ---- telemetry lane ------------------------------------------------------------------------
    def add_telemetry(self, topic: str, payload: bytes, plan: str, seq: int, max_bytes: int) -> int:
        """Queues a batch and records its number; drops the oldest batches beyond `max_bytes`.

        Returns how many batches were dropped (counted and logged by the caller).
        """
        def work(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO telemetry (topic, payload, created_at) VALUES (?, ?, ?)",
                       (topic, payload, self._now()))
            db.execute("UPDATE plans SET seq = ? WHERE name = ?", (seq, plan))
            return _trim(db, max_bytes)

        return self._tx("queue telemetry", work)

    def promote_telemetry(self, limit: int) -> tuple[int, int]:
        """Moves up to `limit` of the oldest batches into the outbox, if no other message waits there.

        Returns (batches moved, batches still in the lane). Reads first: nothing is written (no fsync)
        when there is nothing to move.
        """
        waiting = self._store.read("telemetry waiting", lambda db: db.execute(
            "SELECT COUNT(*) FROM telemetry").fetchone()[0])
        if not waiting:
            return 0, 0

        def work(db: sqlite3.Connection) -> tuple[int, int]:
            if db.execute("SELECT 1 FROM outbox LIMIT 1").fetchone() is not None:
                return 0, waiting
            rows = db.execute("SELECT n, topic, payload FROM telemetry ORDER BY n LIMIT ?", (limit,)).fetchall()
            for n, topic, payload in rows:
                db.execute("INSERT INTO outbox (command_id, topic, payload, correlation, created_at) "
                           "VALUES (NULL, ?, ?, NULL, ?)", (topic, payload, self._now()))
                db.execute("DELETE FROM telemetry WHERE n = ?", (n,))
            return len(rows), waiting - len(rows)

        return self._tx("promote telemetry", work)

    def telemetry_stats(self) -> tuple[int, int]:
        """(batches waiting in the lane, their bytes)."""
        count, size = self._store.read("telemetry stats", lambda db: db.execute(
            "SELECT COUNT(*), IFNULL(SUM(length(payload) + length(topic)), 0) FROM telemetry").fetchone())
        return count, size

    # ---- state ---------------------------------------------------------------------------------
    def put_states(self, states: list[tuple[str, str, bytes]]) -> None:
        """The newest state of each (component, topic, payload), in one transaction (one fsync)."""
        self._tx("put states", lambda db: db.executemany(
            "INSERT INTO state (component, topic, payload, generation, sent) VALUES (?, ?, ?, 1, 0) "
            "ON CONFLICT(component) DO UPDATE SET topic = excluded.topic, payload = excluded.payload, "
            "generation = state.generation + 1, sent = 0", states))

    def unsent_states(self) -> list[StateRow]:
        rows = self._store.read("unsent states", lambda db: db.execute(
            "SELECT component, topic, payload, generation FROM state WHERE sent = 0 ORDER BY component").fetchall())
        return [StateRow(c, t, bytes(p), g) for c, t, p, g in rows]

    def state_sent(self, component: str, generation: int) -> None:
        """Marks a state published, unless a newer one was stored meanwhile."""
        self._tx("state sent", lambda db: db.execute(
            "UPDATE state SET sent = 1 WHERE component = ? AND generation = ?", (component, generation)))


def _trim(db: sqlite3.Connection, max_bytes: int) -> int:
    total = db.execute("SELECT IFNULL(SUM(length(payload) + length(topic)), 0) FROM telemetry").fetchone()[0]
    dropped = 0
    while total > max_bytes:
        row = db.execute("SELECT n, length(payload) + length(topic) FROM telemetry ORDER BY n LIMIT 1").fetchone()
        if row is None:
            break
        db.execute("DELETE FROM telemetry WHERE n = ?", (row[0],))
        total -= row[1]
        dropped += 1
    return dropped
