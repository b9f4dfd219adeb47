"""Feeds collection's messages to the broker behind command responses: telemetry batches move from their
own bounded lane into the outbox only while no response waits there, a few at a time; the retained
state of each component is published directly (only the newest matters; the store keeps it until the
broker acknowledged it, one in flight per component). Each state fails alone: one too large for the payload
limit goes without the values that do not fit (named in `truncated`), or is set aside when even that does
not fit; one the broker refuses is retried or set aside by its PUBACK's reason code, as the outbox does;
the others go all the same.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable

from agent.fleet.packets import PacketTooLargeError
from agent.fleet.refusals import CONNECTION_DROPPED, NEVER_PASSES, QUOTA_EXCEEDED, Refusal, reason_name
from agent.store.collection import CollectionStore, StateRow
from agent.store.sqlite import Outgoing
from agent.wire import messages as m

log = logging.getLogger(__name__)

STEP = 2  # telemetry batches moved into the outbox at once: at most this many ahead of a new response
IDLE_S = 1.0  # how often the lane looks again while batches wait behind responses
QUIET_S = 30.0  # how often it looks when nothing waits (it is woken when something comes)
RETRY_MIN_S = 1.0  # a state the broker refused for now is tried again after this, doubling
RETRY_MAX_S = 60.0
MAX_FAILED = 5  # refusals of a state that may pass (other than quota exceeded) before it is set aside


class TelemetryLane:
    def __init__(self, tables: CollectionStore, publish: Callable[[Outgoing, Callable[[int], None]], int | None],
                 connected: Callable[[], bool], wake_outbox: Callable[[], None],
                 limit: Callable[[str], int] = lambda topic: 256 * 1024,
                 on_oversize: Callable[[str, str], None] = lambda component, outcome: None,
                 on_refused: Callable[[Refusal], None] = lambda refusal: None) -> None:
        """`limit(topic)`: the largest payload the broker takes there now; `on_oversize(component, outcome)`
        counts a state that did not fit (`trimmed` or `set_aside`); `on_refused` reports one the broker
        will not take (reason code, or connections cut on it), as for the outbox's messages."""
        self._tables = tables
        self._limit = limit
        self._on_oversize = on_oversize
        self._on_refused = on_refused
        self._lock = threading.Lock()
        self._in_flight: dict[int, StateRow] = {}  # mid -> the state (as sent) awaiting its PUBACK
        self._answers: queue.SimpleQueue[tuple[StateRow, int | None]] = queue.SimpleQueue()  # code None: struck
        # component -> (refusals, failed, retry due, generation of the state they were of)
        self._refusals: dict[str, tuple[int, int, float, int]] = {}
        self._oversize: set[str] = set()  # components whose state did not fit: logged once until it fits again
        self._publish = publish
        self._connected = connected
        self._wake_outbox = wake_outbox
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heartbeat = time.monotonic()
        self.states_set_aside = 0  # too large for the payload limit
        self.states_refused = 0  # refused by the broker, or cut on

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="telemetry-lane", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self, *_: object) -> None:
        self._wake.set()

    def published(self, mid: int, code: int = 0) -> None:
        """PUBACK (MQTT loop thread: hands over, never touches SQLite)."""
        self._answer(mid, code)

    def struck(self, mid: int) -> bool:
        """The link dropped `mid` for good: the broker cut connection after connection on it (cuts.py).
        True when it was one of the states in flight."""
        return self._answer(mid, None)

    def too_large(self, mid: int, size: int = 0, limit: int = 0) -> bool:
        """The link dropped `mid` as over a limit it learned after the state was published: the state stays
        unsent and goes again, made to fit the limit (True when it was one of the states in flight)."""
        return self._answer(mid, None, settle=False)

    def _answer(self, mid: int, code: int | None, settle: bool = True) -> bool:
        """Takes `mid` off the wire (paho may give the mid to another message at once) and, with `settle`,
        hands its answer to the lane's pass (code None: struck); True when it was one of our states."""
        with self._lock:
            row = self._in_flight.pop(mid, None)
        if row is None:
            return False
        if settle:
            self._answers.put((row, code))
        self._wake.set()
        return True

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
        """Moves what may go now; True while something still waits (behind responses, unsent or unanswered)."""
        moved, left = self._tables.promote_telemetry(STEP)
        if moved:
            self._wake_outbox()
        self._settle()
        with self._lock:
            busy = {row.component for row in self._in_flight.values()}
        now = time.monotonic()
        for row in self._tables.unsent_states():
            if row.component in busy or self._refusals.get(row.component, (0, 0, now, 0))[2] > now:
                continue  # its last state awaits its PUBACK (one in flight each: in order), or a retry is due later
            sent = self._send_state(row)
            if sent is None:
                return True
            if not sent:  # set aside: not published, and not tried again
                self._tables.state_sent(row.component, row.generation)
        with self._lock:
            answers_due = bool(self._in_flight)
        return left > 0 or answers_due or bool(self._refusals)

    def _settle(self) -> None:
        """PUBACKs and struck states: a state leaves the store once the broker took it (a newer one stored
        meanwhile stays unsent); a refusal is retried or sets the state aside, as the outbox does."""
        while True:
            try:
                row, code = self._answers.get_nowait()
            except queue.Empty:
                return
            if code is not None and code < 0x80:
                self._refusals.pop(row.component, None)
                self._tables.state_sent(row.component, row.generation)
                continue
            refusals, failed, _, generation = self._refusals.get(row.component, (0, 0, 0.0, row.generation))
            if generation != row.generation:  # a newer state: the refusals counted were its predecessor's
                refusals, failed = 0, 0
            refusals, failed = refusals + 1, failed + (code != QUOTA_EXCEEDED)
            if code is None or code in NEVER_PASSES or failed >= MAX_FAILED:
                self._refusals.pop(row.component, None)
                self._tables.state_sent(row.component, row.generation)
                self._set_aside(row, CONNECTION_DROPPED if code is None else reason_name(code), code)
                continue
            delay = min(RETRY_MAX_S, RETRY_MIN_S * 2.0 ** min(refusals - 1, 32))
            self._refusals[row.component] = (refusals, failed, time.monotonic() + delay, row.generation)
            log.warning("broker refused the state of %s for now (reason 0x%02X %s); retrying in %.0f s",
                        row.component, code, reason_name(code), delay,
                        extra={"component": row.component, "topic": row.topic, "attempts": refusals})

    def _set_aside(self, row: StateRow, reason: str, code: int | None) -> None:
        self.states_refused += 1
        log.error("the broker will not take the state of %s: set aside, not delivered (%s%s)", row.component,
                  reason, f", reason code 0x{code:02X}" if code is not None else "",
                  extra={"component": row.component, "topic": row.topic, "bytes": len(row.payload),
                         "reason": reason})
        self._on_refused(Refusal(Outgoing(row.topic, row.payload, retain=True), reason, code))

    def _send_state(self, row: StateRow) -> bool | None:
        """Publishes one state, made to fit the limit: True when handed to the link (its PUBACK settles it),
        False when set aside as too large, None when the link cannot take it now (kept unsent)."""
        limit = self._limit(row.topic)
        for _ in range(2):  # the broker's limit may have changed since `limit` was asked: once more with it
            payload = m.trim_state(row.payload, limit)
            if payload is None:
                self._too_large(row, limit, None)
                return False
            track = functools.partial(self._track, row=StateRow(row.component, row.topic, payload, row.generation))
            try:
                mid = self._publish(Outgoing(row.topic, payload, retain=True), track)
            except PacketTooLargeError as err:
                limit = err.limit - (err.size - len(payload))
                continue
            if mid is None:
                return None
            if payload is not row.payload:
                self._too_large(row, limit, payload)
            else:
                self._oversize.discard(row.component)
            return True
        self._too_large(row, limit, None)
        return False

    def _track(self, mid: int, row: StateRow) -> None:
        """Called by the link before any PUBACK for `mid` can be handled (under paho's lock)."""
        with self._lock:
            self._in_flight[mid] = row

    def _too_large(self, row: StateRow, limit: int, sent: bytes | None) -> None:
        """A state over the limit: sent trimmed (`sent`) or set aside (None); counted, logged once."""
        outcome = "trimmed" if sent is not None else "set_aside"
        if sent is None:
            self.states_set_aside += 1
        self._on_oversize(row.component, outcome)
        if row.component in self._oversize:
            return
        self._oversize.add(row.component)
        log.warning("state of %s is larger than the payload limit (%d > %d bytes): %s", row.component,
                    len(row.payload), limit, "values left out" if sent is not None else "not published",
                    extra={"component": row.component, "bytes": len(row.payload), "max_bytes": limit,
                           "outcome": outcome})
