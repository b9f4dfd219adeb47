"""The store's tables, and the migrations that bring a store written by an older agent up to them."""

from __future__ import annotations

import sqlite3

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


def migrate(db: sqlite3.Connection) -> None:
    """Creates what is missing and adds the columns later versions brought (idempotent)."""
    db.executescript(SCHEMA)
    columns = {row[1] for row in db.execute("PRAGMA table_info(ledger)")}
    if "signer" not in columns:  # a store written before signed commands existed
        db.execute("ALTER TABLE ledger ADD COLUMN signer TEXT")
    if "keep_until" not in columns:  # a store written before the byte bound held unexpired ids
        db.execute("ALTER TABLE ledger ADD COLUMN keep_until REAL")
