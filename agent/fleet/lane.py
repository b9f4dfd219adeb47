"""Feeds collection's messages to the broker behind command responses: telemetry batches move from their
own bounded lane into the outbox only while no response waits there, a few at a time; the retained
state of each component is published directly (only the newest matters; the store keeps it until sent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agent.store.collection import CollectionStore
from agent.store.sqlite import Outgoing

log = logging.getLogger(__name__)

STEP = 2  # telemetry batches moved into the outbox at once: at most this many ahead of a new response
IDLE_S = 1.0  # how often the lane looks again while batches wait behind responses
QUIET_S = 30.0  # how often it looks when nothing waits (it is woken when something comes)


class TelemetryLane:
    def __init__(self, tables: CollectionStore, publish: Callable[[Outgoing], int | None],
                 connected: Callable[[], bool], wake_outbox: Callable[[], None]) -> None:
        self._tables = tables
        self._publish = publish
        self._connected = connected
        self._wake_outbox = wake_outbox
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()
        self.promoted = 0
        self.states_sent = 0

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
            if self._publish(Outgoing(row.topic, row.payload, retain=True)) is None:
                return True
            self._tables.state_sent(row.component, row.generation)
            self.states_sent += 1
        return left > 0
