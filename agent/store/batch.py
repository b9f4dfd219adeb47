"""A batch: the ledger and outbox statements a caller commits together (one fsync for a group of messages)."""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.store.records import Entry, Outgoing, Statements, StoreError
from agent.store.writer import Write

if TYPE_CHECKING:
    from agent.store.sqlite import Store


class Batch:
    """Statements committed together (one fsync for a group of messages). `durable` says whether the
    commit must be synced: every ledger change and every message is, unless published `durable=False`."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.statements: Statements = []
        self.durable = False

    def add_command(self, entry: Entry) -> None:
        self.durable = True
        self.statements.append((
            "INSERT INTO ledger (id, state, body, reply_topic, correlation, received_at, expires_at, seq, "
            "final_message, updated_at, signer, keep_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (entry.id, entry.state, json.dumps(entry.body), entry.reply_topic, entry.correlation,
             entry.received_at, entry.expires_at, entry.seq,
             json.dumps(entry.final_message) if entry.final_message else None, self._store.now(), entry.signer,
             entry.keep_until)))

    def set_state(self, command_id: str, state: str, seq: int | None = None,
                  final_message: dict[str, Any] | None = None) -> None:
        """A finished command keeps its id and final message, not its body (the ledger stays small)."""
        self.durable = True
        self.statements.append((
            "UPDATE ledger SET state = ?, seq = COALESCE(?, seq), final_message = COALESCE(?, final_message), "
            "body = CASE WHEN ? = 'final' THEN '{}' ELSE body END, updated_at = ? WHERE id = ?",
            (state, seq, json.dumps(final_message) if final_message else None, state, self._store.now(), command_id)))

    def requeue(self, command_id: str) -> None:
        """A command marked started that never ran is queued again (a clean stop)."""
        self.durable = True
        self.statements.append(("UPDATE ledger SET state = 'queued' WHERE id = ? AND state = 'started'", (command_id,)))

    def forget(self, command_id: str) -> None:
        """Removes a command from the ledger: its refusal was transient, the same id may come again."""
        self.durable = True
        self.statements.append(("DELETE FROM ledger WHERE id = ?", (command_id,)))

    def publish(self, message: Outgoing, durable: bool = True) -> None:
        """Into the outbox. `durable=False` for a message a power loss may lose (a transient refusal,
        not remembered: the backend sends the id again); a SIGKILL loses it all the same never."""
        self.durable = self.durable or durable
        self.statements.append((
            "INSERT INTO outbox (command_id, topic, payload, correlation, created_at) VALUES (?, ?, ?, ?, ?)",
            (message.command_id, message.topic, message.payload, message.correlation, self._store.now())))

    def replace(self, n: int) -> None:
        """Deletes outbox message `n` in this batch's commit: what the batch publishes replaces it (a
        response re-cut into chunks), so a crash leaves the one or the other, never both."""
        self.statements.append(("DELETE FROM outbox WHERE n = ?", (n,)))

    def save_fault_set(self, component: str, faults: dict[int, int]) -> None:
        """Replaces a component's last known faults (DTC -> status byte)."""
        self.statements.append(("DELETE FROM fault_sets WHERE component = ?", (component,)))
        now = self._store.now()
        self.statements += [("INSERT INTO fault_sets (component, dtc, status, updated_at) VALUES (?, ?, ?, ?)",
                             (component, dtc, status, now)) for dtc, status in sorted(faults.items())]

    def commit(self, defer: bool = False) -> None:
        """Commits the statements. With `defer`, a write the storage cannot take now is kept in memory
        and stored before the next write that succeeds (StoreError is still raised)."""
        if self.statements:
            statements, self.statements = self.statements, []
            try:
                self._store._write(statements, defer=defer, durable=self.durable)
            except StoreError:
                self.statements = [] if defer else statements
                raise

    def commit_later(self, on_done: Callable[[BaseException | None], None], defer: bool = False,
                     company: bool = False) -> Write | None:
        """Hands the statements over without waiting for the commit: `on_done(None)` once they are
        stored (synced if `durable`), or `on_done(error)` (a StoreError when SQLite failed); it runs on
        whichever thread committed them, outside the store's locks. With `defer`, as in `commit`.
        With `company`, the caller knows another commit follows soon (another worker's, or one it
        asks for with `Store.hurry` when it needs this one): the statements go with it, or alone after
        COMPANY_WAIT_S. Returns the write handed over (for `Store.hurry`), None when there was nothing
        to write. Raises StoreError only when the store is closing."""
        if not self.statements:
            on_done(None)
            return None
        statements, self.statements = self.statements, []
        write = Write("write", functools.partial(execute_all, statements=statements), self.durable,
                      statements if defer else None, lambda write: on_done(write.error))
        self._store._later(write, company)
        return write


def execute_all(db: sqlite3.Connection, statements: Statements) -> None:
    for sql, args in statements:
        db.execute(sql, args)
