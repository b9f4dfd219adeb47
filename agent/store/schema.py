"""The store's tables, and the migrations that bring a store written by an older agent up to them.

`PRAGMA user_version` says which agent's tables a store holds (SCHEMA_VERSION). A store of an older agent
(a lower version, 0 before versions were stamped) is brought up to this one in one transaction; a store
of a newer agent (a higher version: this agent was rolled back) is refused untouched, since what its rows
mean may have changed (a new state, a column a bound depends on): NewerStoreError. An agent that changes
what an older agent must understand to run on its store raises SCHEMA_VERSION; one that only adds what
an older agent may ignore (a column of its own, a table) need not: the ledger is read by column name.
"""

from __future__ import annotations

import re
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


SCHEMA_VERSION = 1  # PRAGMA user_version of the tables above (0: a store stamped before versions)
# How long after its receipt a signed command of an agent before `keep_until` is held once it ran: the longest
# expiry a signature check accepts (security.max_expiry_ahead_s is at most 7 days). Its own expires_at is not
# in the row any more (a final keeps no body), and the row's expires_at may be the earlier MQTT expiry.
OLD_SIGNED_HOLD_S = 7 * 86400


TABLES_AND_INDEXES = tuple(re.findall(r"CREATE (?:TABLE|INDEX) IF NOT EXISTS (\w+)", SCHEMA))
LATER_LEDGER_COLUMNS = ("signer", "keep_until")  # what migrate adds to an older agent's ledger


def complete(db: sqlite3.Connection) -> bool:
    """Whether the store holds every table, index and ledger column of SCHEMA (read only). A store stamped with
    this version may lack some: an agent may add a table or a column an older one ignores without raising
    SCHEMA_VERSION, and the agent before it stamped the same version."""
    names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    if not set(TABLES_AND_INDEXES) <= names:
        return False
    return set(LATER_LEDGER_COLUMNS) <= {row[1] for row in db.execute("PRAGMA table_info(ledger)")}


class NewerStoreError(Exception):
    """The store was written by a newer agent (its user_version is above SCHEMA_VERSION): not opened."""

    def __init__(self, path: str, found: int) -> None:
        self.path = path
        self.found = found
        super().__init__(f"{path} has schema version {found}, written by a newer agent; this agent knows versions "
                         f"up to {SCHEMA_VERSION}. Install the newer agent again, or move the store aside (its "
                         "unfinished commands and unsent responses stay in the moved file)")


def check_version(db: sqlite3.Connection, path: str) -> int:
    """The store's schema version; NewerStoreError when it is a newer agent's (before anything is written)."""
    found = int(db.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise NewerStoreError(path, found)
    return found


def migrate(db: sqlite3.Connection, path: str = "store") -> None:
    """Creates what is missing, adds the columns later versions brought and stamps SCHEMA_VERSION, in one
    transaction (a crash half-way leaves the older store as it was); idempotent. NewerStoreError for a
    newer agent's store, with nothing written."""
    if check_version(db, path) == SCHEMA_VERSION and complete(db):
        return  # nothing to bring up: no write transaction at all
    db.execute("BEGIN IMMEDIATE")
    try:
        if check_version(db, path) == SCHEMA_VERSION and complete(db):  # another connection migrated it meanwhile
            db.execute("ROLLBACK")
            return
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        columns = {row[1] for row in db.execute("PRAGMA table_info(ledger)")}
        if "signer" not in columns:  # a store written before signed commands existed
            db.execute("ALTER TABLE ledger ADD COLUMN signer TEXT")
        if "keep_until" not in columns:  # a store written before the byte bound held unexpired ids
            db.execute("ALTER TABLE ledger ADD COLUMN keep_until REAL")
            # a signed command that ran could be accepted again until its signed expiry: held as this agent
            # holds its own (bounds.py), as long as the longest such expiry, since its own is not known
            db.execute("UPDATE ledger SET keep_until = MAX(IFNULL(expires_at, 0), received_at + ?) "
                       "WHERE signer IS NOT NULL", (OLD_SIGNED_HOLD_S,))
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
