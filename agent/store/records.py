"""What the store hands in and out: ledger rows, outbox messages, trim reports, and its one error type."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from agent.store.writer import is_unavailable

Statements = list[tuple[str, tuple[Any, ...]]]


class StoreError(Exception):
    """A store operation failed. `cause` is SQLite's error; `unavailable` when the storage itself is the
    trouble (disk full, I/O error, corruption, locked), not the data that was written."""

    def __init__(self, operation: str, cause: sqlite3.Error) -> None:
        self.operation = operation
        self.cause = cause
        self.code = getattr(cause, "sqlite_errorname", None) or type(cause).__name__
        self.unavailable = is_unavailable(cause)
        super().__init__(f"{operation}: {cause} ({self.code})")


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
    # Wall-clock epoch seconds until which a resend could still be accepted (the command's expires_at):
    # once it ran, the byte bound and retention keep its id at least that long. None: no such limit.
    keep_until: float | None = None


@dataclass(frozen=True)
class LedgerTrim:
    """What a pass of the ledger's byte bound did: ids forgotten, and the bytes it had to hold (unfinished
    commands, and ones that ran and could still be accepted); `over_bound` when those alone exceed it."""

    forgotten: int
    held_bytes: int
    max_bytes: int

    @property
    def over_bound(self) -> bool:
        return self.held_bytes > self.max_bytes


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


# The ledger's columns an Entry is read from, by name: a column a newer agent added is not read (schema.py).
LEDGER_COLUMNS = ("id, state, body, reply_topic, correlation, received_at, expires_at, seq, final_message, signer, "
                  "keep_until")


def entry_from_row(row: tuple[Any, ...]) -> Entry:
    """An Entry from a row of LEDGER_COLUMNS."""
    cid, state, body, reply_topic, correlation, received_at, expires_at, seq, final_message, signer, keep = row
    return Entry(cid, state, json.loads(body), reply_topic, correlation, received_at, expires_at, seq,
                 json.loads(final_message) if final_message else None, signer, keep)
