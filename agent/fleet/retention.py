"""Keeps the store within its bounds: the outbox's count, age and bytes, the ledger's retention and
bytes. A part of Outbox, whose thread runs it every MAINTENANCE_S; what it drops is counted and logged."""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.config.model import StoreConfig
from agent.store.sqlite import Store

log = logging.getLogger(__name__)


class Retention:
    """The bounds pass (Outbox sets the attributes below)."""

    _store: Store
    _config: StoreConfig
    _now: Callable[[], float]
    _wall: Callable[[], float | None]
    dropped: int
    ledger_dropped: int
    ledger_held_bytes: int

    def _maintain(self) -> None:
        now = self._now()
        dropped = self._store.trim_outbox(self._config.outbox_max_messages, self._config.outbox_max_age_s, now)
        if dropped:
            self.dropped += dropped
            log.warning("outbox over its bounds: dropped %d oldest messages", dropped,
                        extra={"max_messages": self._config.outbox_max_messages})
        self._bound_bytes()
        pruned = self._store.prune_ledger(self._config.ledger_retention_s, now, self._wall())
        if pruned:
            log.info("forgot %d old command ids", pruned)

    def _bound_bytes(self) -> None:
        """The byte bounds of the outbox and the ledger (an SD card's budget); drops counted and logged."""
        dropped = self._store.trim_outbox_bytes(self._config.outbox_max_bytes)
        if dropped:
            self.dropped += dropped
            log.warning("outbox over its byte bound: dropped %d oldest messages", dropped,
                        extra={"max_bytes": self._config.outbox_max_bytes})
        trimmed = self._store.trim_ledger_bytes(self._config.ledger_max_bytes, self._wall())
        self.ledger_held_bytes = trimmed.held_bytes
        if trimmed.forgotten:
            self.ledger_dropped += trimmed.forgotten
            log.warning("ledger over its byte bound: forgot %d finished command ids before their retention time",
                        trimmed.forgotten, extra={"max_bytes": self._config.ledger_max_bytes})
        if trimmed.over_bound:
            log.error("ledger over its byte bound with ids it must keep: %d bytes of unfinished commands and "
                      "of commands that ran and could still be accepted before their expires_at; kept",
                      trimmed.held_bytes, extra={"max_bytes": self._config.ledger_max_bytes,
                                                 "held_bytes": trimmed.held_bytes})

    def maintain(self) -> None:
        """One retention pass now (tests; the outbox thread runs one every MAINTENANCE_S)."""
        self._maintain()
