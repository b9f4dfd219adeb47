"""Feeds collection's messages to the broker behind command responses: telemetry batches move from their
own bounded lane into the outbox only while no response waits there, a few at a time; the retained
state of each component is published directly (only the newest matters; the store keeps it until sent).
Each state fails alone: one too large for the payload limit goes without the values that do not fit
(named in `truncated`), or is set aside when even that does not fit; the others go all the same.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.fleet.packets import PacketTooLargeError
from agent.store.collection import CollectionStore, StateRow
from agent.store.sqlite import Outgoing
from agent.wire import messages as m

log = logging.getLogger(__name__)

STEP = 2  # telemetry batches moved into the outbox at once: at most this many ahead of a new response
IDLE_S = 1.0  # how often the lane looks again while batches wait behind responses
QUIET_S = 30.0  # how often it looks when nothing waits (it is woken when something comes)


class TelemetryLane:
    def __init__(self, tables: CollectionStore, publish: Callable[[Outgoing], int | None],
                 connected: Callable[[], bool], wake_outbox: Callable[[], None],
                 limit: Callable[[str], int] = lambda topic: 256 * 1024,
                 on_oversize: Callable[[str, str], None] = lambda component, outcome: None) -> None:
        """`limit(topic)`: the largest payload the broker takes there now; `on_oversize(component, outcome)`
        counts a state that did not fit (`trimmed` or `set_aside`)."""
        self._tables = tables
        self._limit = limit
        self._on_oversize = on_oversize
        self._oversize: set[str] = set()  # components whose state did not fit: logged once until it fits again
        self._publish = publish
        self._connected = connected
        self._wake_outbox = wake_outbox
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()
        self.promoted = 0
        self.states_sent = 0
        self.states_trimmed = 0
        self.states_set_aside = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="telemetry-lane", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self, *_: object) -> None:
        self._wake.set()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        waiting = True
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            self._wake.wait(IDLE_S if waiting else QUIET_S)
            self._wake.clear()
            if not self._connected():
                waiting = True
                continue
            try:
                waiting = self.pass_once()
            except Exception:  # a store or link failure: logged, tried again on the next pass
                log.exception("telemetry lane pass failed; retrying")
                self._stop.wait(IDLE_S)

    def pass_once(self) -> bool:
        """Moves what may go now; True while something still waits (behind responses, or unsent)."""
        moved, left = self._tables.promote_telemetry(STEP)
        if moved:
            self.promoted += moved
            self._wake_outbox()
        for row in self._tables.unsent_states():
            if not self._send_state(row):
                return True
            self._tables.state_sent(row.component, row.generation)
        return left > 0

    def _send_state(self, row: StateRow) -> bool:
        """Publishes one state, made to fit the limit; False when the link cannot take it now (kept unsent)."""
        limit = self._limit(row.topic)
        for _ in range(2):  # the broker's limit may have changed since `limit` was asked: once more with it
            payload = m.trim_state(row.payload, limit)
            if payload is None:
                self._too_large(row, limit, None)
                return True
            try:
                mid = self._publish(Outgoing(row.topic, payload, retain=True))
            except PacketTooLargeError as err:
                limit = err.limit - (err.size - len(payload))
                continue
            if mid is None:
                return False
            if payload is not row.payload:
                self._too_large(row, limit, payload)
            else:
                self._oversize.discard(row.component)
            self.states_sent += 1
            return True
        self._too_large(row, limit, None)
        return True

    def _too_large(self, row: StateRow, limit: int, sent: bytes | None) -> None:
        """A state over the limit: sent trimmed (`sent`) or set aside (None); counted, logged once."""
        outcome = "trimmed" if sent is not None else "set_aside"
        if sent is None:
            self.states_set_aside += 1
        else:
            self.states_trimmed += 1
        self._on_oversize(row.component, outcome)
        if row.component in self._oversize:
            return
        self._oversize.add(row.component)
        log.warning("state of %s is larger than the payload limit (%d > %d bytes): %s", row.component,
                    len(row.payload), limit, "values left out" if sent is not None else "not published",
                    extra={"component": row.component, "bytes": len(row.payload), "max_bytes": limit,
                           "outcome": outcome})
