"""The store's bounds: what the ledger's byte bound and retention, and the outbox's count, age and byte bounds
forget, and what they must hold.

The ledger's byte bound (`trim_ledger_bytes`) never forgets an id whose command could be accepted
again: an unfinished command, or one that ran (or was signed, however it ended) and whose `keep_until`
(its `expires_at`, wall-clock epoch seconds, set by intake) has not passed. Forgetting such an id would
let a captured signed envelope run a second time, or run after its final said it never would. Of the
rest it forgets ids that never ran (`rejected`, `expired`) first, then the least recently finished.
What it must hold is never forgotten, even when it alone exceeds the bound: `LedgerTrim.over_bound`
says so (the caller logs and counts it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from agent.store.records import LedgerTrim

T = TypeVar("T")

# Bytes of a ledger row and of an outbox row, as the byte bounds count them.
LEDGER_ROW_BYTES = ("(length(id) + length(body) + length(reply_topic) + IFNULL(length(correlation), 0)"
                    " + IFNULL(length(final_message), 0) + 48)")
OUTBOX_ROW_BYTES = "(length(payload) + length(topic) + IFNULL(length(correlation), 0) + 32)"
# A finished command that never ran (refused, or expired before it started): a resend can do no more than
# run it once. The rest of the finished ones ran.
_NEVER_RAN = "(IFNULL(json_extract(final_message, '$.status'), '') IN ('rejected', 'expired'))"
# Ledger rows the bounds may forget (two parameters: the wall clock twice, None when it cannot be trusted):
# finished, and not a command that could still be accepted again: one that ran, or a signed one whatever its
# end. A signed command that `expired` before it ran (an MQTT Message Expiry Interval is outside the signature)
# or was refused after it was accepted has had its final answer: its captured envelope must not run later.
_FORGETTABLE = (f"(state = 'final' AND (keep_until IS NULL OR (signer IS NULL AND {_NEVER_RAN})"
                " OR (? IS NOT NULL AND keep_until <= ?)))")


class Bounds:
    """The bounds' passes over the store (a part of Store: it needs the store's transactions and reads)."""

    if TYPE_CHECKING:  # provided by Store
        def _transaction(self, operation: str, work: Callable[[sqlite3.Connection], T],
                         durable: bool = True) -> T: ...

        def _read(self, work: Callable[[sqlite3.Connection], T], operation: str = "read") -> T: ...

    def ledger_bytes(self) -> int:
        return self._read(lambda db: db.execute(f"SELECT IFNULL(SUM({LEDGER_ROW_BYTES}), 0) FROM ledger").fetchone()[0])

    def trim_ledger_bytes(self, max_bytes: int, wall: float | None) -> LedgerTrim:
        """Forgets finished commands while the ledger holds more than `max_bytes`: first those that never
        ran, then the least recently finished. Never an unfinished one, nor one that ran whose `keep_until`
        is after `wall` (wall-clock epoch seconds; None: the clock cannot be trusted, every `keep_until`
        holds). What it must hold is reported, never forgotten (see the module docstring). Not synced: an
        id remembered a little longer after a power loss harms nothing."""
        def work(db: sqlite3.Connection) -> LedgerTrim:
            held = db.execute(f"SELECT IFNULL(SUM({LEDGER_ROW_BYTES}), 0) FROM ledger WHERE NOT ({_FORGETTABLE})",
                              (wall, wall)).fetchone()[0]
            forgotten = db.execute(
                "DELETE FROM ledger WHERE rowid IN (SELECT rowid FROM ("
                f" SELECT rowid, SUM({LEDGER_ROW_BYTES}) OVER (ORDER BY {_NEVER_RAN} ASC, updated_at DESC,"
                f" rowid DESC) AS total FROM ledger WHERE {_FORGETTABLE})"
                " WHERE total > ? - ?)", (wall, wall, max_bytes, held)).rowcount
            return LedgerTrim(forgotten, held, max_bytes)

        return self._transaction("maintain", work, durable=False)

    def trim_outbox(self, max_messages: int, max_age_s: float, now: float) -> int:
        """Drops the oldest messages beyond the bounds; returns how many were dropped."""
        def work(db: sqlite3.Connection) -> int:
            aged = db.execute("DELETE FROM outbox WHERE created_at < ?", (now - max_age_s,)).rowcount
            over = db.execute(
                "DELETE FROM outbox WHERE n IN (SELECT n FROM outbox ORDER BY n DESC LIMIT -1 OFFSET ?)",
                (max_messages,)).rowcount
            return aged + over

        return self._transaction("maintain", work, durable=False)

    def trim_outbox_bytes(self, max_bytes: int) -> int:
        """Drops the oldest messages while the outbox holds more than `max_bytes`; returns how many."""
        def work(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM outbox WHERE n IN (SELECT n FROM ("
                f" SELECT n, SUM({OUTBOX_ROW_BYTES}) OVER (ORDER BY n DESC) AS total FROM outbox)"
                " WHERE total > ?)", (max_bytes,)).rowcount

        return self._transaction("maintain", work, durable=False)

    def prune_ledger(self, retention_s: float, now: float, wall: float | None = None) -> int:
        """Forgets final commands older than the retention time (`now` in the store's time), except those
        the byte bound holds too (ran, `keep_until` after `wall`); returns how many."""
        return self._transaction("maintain", lambda db: db.execute(
            f"DELETE FROM ledger WHERE {_FORGETTABLE} AND updated_at < ?", (wall, wall, now - retention_s)).rowcount,
            durable=False)
