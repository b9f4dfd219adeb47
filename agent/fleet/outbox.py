"""Publishes the durable outbox in order; a message leaves the store only after the broker's PUBACK."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from agent.config.model import StoreConfig
from agent.store.sqlite import Outgoing, Store, StoreError

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 100  # messages handed to paho and not yet acknowledged
MAINTENANCE_S = 60.0


class Outbox:
    """Hands stored messages to the link while connected; paho resends its unacknowledged ones itself
    after a reconnect, and after a restart everything still stored is sent again (at least once)."""

    def __init__(self, store: Store, config: StoreConfig, publish: Callable[[Outgoing], int | None],
                 connected: Callable[[], bool]) -> None:
        self._store = store
        self._config = config
        self._publish = publish
        self._connected = connected
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acked: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._by_mid: dict[int, int] = {}
        self._handed = 0  # highest outbox row handed to paho in this process
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()
        self.dropped = 0
        self.ledger_dropped = 0  # ids forgotten early by the ledger's byte bound
        self.acknowledged = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self, *_: object) -> None:
        self._wake.set()

    def published(self, mid: int) -> None:
        """PUBACK for `mid` (called on the MQTT loop thread: only hands over, never touches SQLite)."""
        self._acked.put(mid)
        self._wake.set()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, timeout: float) -> bool:
        """Waits until everything stored has been acknowledged (or `timeout`); True if empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.wake()
            if self._store.outbox_stats()[0] == 0:
                return True
            time.sleep(0.02)
        return self._store.outbox_stats()[0] == 0

    def _run(self) -> None:
        next_maintenance = time.monotonic()
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._settle_acks()
                if self._connected():
                    self._hand_over()
                if time.monotonic() >= next_maintenance:
                    self._maintain()
                    next_maintenance = time.monotonic() + MAINTENANCE_S
            except StoreError as err:  # counted and reported by the store; health says so
                log.warning("outbox pass failed, store unavailable: %s", err)
                self._stop.wait(1.0)
            except Exception:
                log.exception("outbox pass failed; retrying")
                self._stop.wait(1.0)
        self._settle_acks()

    def _settle_acks(self) -> None:
        done: list[int] = []
        while True:
            try:
                mid = self._acked.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                n = self._by_mid.pop(mid, None)
            if n is not None:
                done.append(n)
        if done:
            self._store.acknowledge(done)
            self.acknowledged += len(done)

    def _hand_over(self) -> None:
        with self._lock:
            room = MAX_IN_FLIGHT - len(self._by_mid)
        if room <= 0:
            return
        for row in self._store.pending(self._handed, room):
            mid = self._publish(row.message)
            if mid is None:
                return  # try again on the next pass
            with self._lock:
                self._by_mid[mid] = row.n
                self._handed = row.n

    def _maintain(self) -> None:
        dropped = self._store.trim_outbox(self._config.outbox_max_messages, self._config.outbox_max_age_s, time.time())
        if dropped:
            self.dropped += dropped
            log.warning("outbox over its bounds: dropped %d oldest messages", dropped,
                        extra={"max_messages": self._config.outbox_max_messages})
        self._bound_bytes()
        pruned = self._store.prune_ledger(self._config.ledger_retention_s, time.time())
        if pruned:
            log.info("forgot %d old command ids", pruned)

    def _bound_bytes(self) -> None:
        """The byte bounds of the outbox and the ledger (an SD card's budget); drops counted and logged."""
        dropped = self._store.trim_outbox_bytes(self._config.outbox_max_bytes)
        if dropped:
            self.dropped += dropped
            log.warning("outbox over its byte bound: dropped %d oldest messages", dropped,
                        extra={"max_bytes": self._config.outbox_max_bytes})
        forgotten = self._store.trim_ledger_bytes(self._config.ledger_max_bytes)
        if forgotten:
            self.ledger_dropped += forgotten
            log.warning("ledger over its byte bound: forgot %d finished command ids before their retention time",
                        forgotten, extra={"max_bytes": self._config.ledger_max_bytes})
