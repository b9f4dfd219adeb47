"""Publishes the durable outbox in order; a message leaves the store only after the broker took it.

A PUBACK with a reason code below 0x80 is delivery. One of 0x80 or above is not: the message stays
and is retried with backoff when the code can pass later (quota exceeded, unspecified), or is set
aside in the store's `refused` table when it never can (not authorized, topic name invalid, packet
too large, payload format invalid): never deleted as if delivered, always logged and reported.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from agent.config.model import StoreConfig
from agent.fleet.packets import PacketTooLargeError
from agent.fleet.refusals import CONNECTION_DROPPED, NEVER_PASSES, QUOTA_EXCEEDED, Refusal, reason_name, rechunk
from agent.fleet.retention import Retention
from agent.store.sqlite import Outgoing, Pending, Store, StoreError
from agent.wire import messages as m

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 100  # messages handed to paho and not yet acknowledged
MAINTENANCE_S = 60.0
IDLE_WAIT_S = 1.0  # the outbox thread reads the outbox at least this often, however often woken (safety net)
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0
MAX_ATTEMPTS = 5  # for refusals that may pass but keep failing (quota exceeded is retried for ever)


@dataclass
class _Retry:
    attempts: int  # refusals so far (the backoff)
    due: float  # monotonic
    failed: int = 0  # of them refusals other than quota exceeded (MAX_ATTEMPTS)


class Outbox(Retention):
    """Hands stored messages to the link while connected; paho resends its unacknowledged ones itself
    after a reconnect, and after a restart everything still stored is sent again (at least once).

    `now` is agent time (the store's stamps): the age bound does not follow wall-clock steps.
    """

    def __init__(self, store: Store, config: StoreConfig,
                 publish: Callable[[Outgoing, Callable[[int], None]], int | None],
                 connected: Callable[[], bool], now: Callable[[], float] | None = None,
                 on_refused: Callable[[Refusal], None] = lambda refusal: None,
                 window: Callable[[], int] = lambda: MAX_IN_FLIGHT,
                 wall: Callable[[], float | None] = time.time) -> None:
        self._store = store
        self._config = config
        self._publish = publish
        self._connected = connected
        self._now = now or store.now
        self._on_refused = on_refused
        self._window = window
        self._wall = wall  # the wall clock while it can be trusted, else None: when commands' expiries pass
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._acked: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()  # (row, reason code) to settle
        self._by_mid: dict[int, int] = {}  # on the wire: handed to paho, no PUBACK yet (in the order handed)
        self._handed = 0  # highest outbox row handed to paho in this process
        self._retries: dict[int, _Retry] = {}  # row -> when to hand it over again
        self._lock = threading.Lock()
        self._pass = threading.Lock()  # one pass over acks and the stored messages at a time (any thread)
        self._pass_owner: int | None = None  # the thread in a pass (a commit it leads may call send_now)
        # Something may have been stored (or the link changed) since the last pass read the outbox. A pass
        # woken by PUBACKs alone only settles them: no read of the outbox, unless the last hand-over
        # stopped for want of room (`_room_limited`), or a deadline has come (`_next_wait`: a due retry,
        # or IDLE_WAIT_S since the last read, the safety net), however often PUBACKs woke the thread.
        self._fresh = True
        self._fresh_lock = threading.Lock()  # a wake's flag is never reset unread by a pass taking it
        self._room_limited = False
        # (store generation, `_handed`) after a read that handed over all it found: while both stay the
        # same nothing new is stored, and the read is skipped (a commit's callbacks each hand over).
        self._read_through: tuple[int, int] | None = None
        self._send_due: float | None = None  # stored messages allowed to wait until then (send_soon)
        self._safety_due = time.monotonic() + IDLE_WAIT_S  # the outbox thread reads the outbox by then
        self._thread: threading.Thread | None = None
        # rows the link took back from paho (cuts.py), for the outbox thread: set aside (None: the broker cut
        # connections on it) or made smaller (over a limit learned or announced after it was handed over)
        self._taken_back: list[tuple[int, PacketTooLargeError | None]] = []
        self.heartbeat = time.monotonic()
        self.dropped = 0
        self.ledger_dropped = 0  # ids forgotten early by the ledger's byte bound
        self.ledger_held_bytes = 0  # what the byte bound had to hold at its last pass (may exceed the bound)
        self.acknowledged = 0
        self.refused: dict[str, int] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self, *_: object) -> None:
        with self._fresh_lock:
            self._fresh = True
        self._wake.set()

    def send_now(self, *_: object, wait: bool = False) -> None:
        """Called by the thread that just committed messages: hands them to the link itself, in order
        (everything stored and not yet handed over goes, the oldest first), instead of waking the outbox
        thread and waiting for it to be scheduled. When the outbox thread is in a pass of its own, or
        the link is down, it is woken instead (its pass reads what is stored after it began).
        With `wait` (the caller publishes something around the store next, which must go after what is
        stored), a pass under way on another thread is waited for and the hand-over done here after it;
        a pass of the calling thread itself (a commit it leads runs this as a callback) only wakes."""
        with self._in_pass(blocking=wait and self._pass_owner != threading.get_ident()) as held:
            if not held or self._stop.is_set() or not self._connected():
                self.wake()
                return
            try:
                self._hand_over()
            except Exception:  # the outbox thread tries again (and logs what fails there)
                log.debug("handing over on the committing thread failed; the outbox thread tries", exc_info=True)
                self.wake()

    @contextmanager
    def _in_pass(self, blocking: bool = True) -> Iterator[bool]:
        """Holds the pass (yields False when `blocking` is off and another thread has it), noting which
        thread holds it: a commit that thread leads may call send_now, which must not wait for itself."""
        if not self._pass.acquire(blocking=blocking):
            yield False
            return
        self._pass_owner = threading.get_ident()
        try:
            yield True
        finally:
            self._pass_owner = None
            self._pass.release()

    def send_soon(self, within: float) -> None:
        """Messages were stored that may wait up to `within` seconds: whatever hands over before then
        (a final's `send_now`) takes them along, else the outbox thread hands them over at that time."""
        due = time.monotonic() + within
        with self._lock:
            if self._send_due is not None and self._send_due <= due:
                return
            self._send_due = due
        self._wake.set()  # the outbox thread waits for the new due time (a pass that only settles PUBACKs)

    def published(self, mid: int, code: int = 0) -> None:
        """PUBACK for `mid` (called on the MQTT loop thread: only hands over, never touches SQLite)."""
        with self._lock:
            n = self._by_mid.pop(mid, None)  # off the wire now, though the pass settling it may lag behind
        if n is not None:
            self._acked.put((n, code))
        self._wake.set()

    def struck(self, mid: int) -> bool:
        """The link dropped `mid` for good: the broker cut connection after connection on it (cuts.py).
        If it is one of ours (True), its row is set aside by the outbox thread (MQTT loop thread: no SQLite)."""
        return self._take_back(mid, None)

    def too_large(self, mid: int, size: int, limit: int) -> bool:
        """The link dropped `mid` (a `size`-byte packet) as over the `limit` it learned from the broker's cuts
        after it was handed over. If it is one of ours (True), the outbox thread makes it smaller or sets
        it aside, as for a message the limit refuses when handed over (MQTT loop thread: no SQLite)."""
        return self._take_back(mid, PacketTooLargeError(size, limit))

    def _take_back(self, mid: int, too_large: PacketTooLargeError | None) -> bool:
        with self._lock:
            n = self._by_mid.pop(mid, None)
            if n is None:
                return False
            self._taken_back.append((n, too_large))
        self.wake()
        return True

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def flush(self, timeout: float) -> bool:
        """Waits until everything stored has been acknowledged (or `timeout`); True if empty. False at once
        when the store cannot be read (a stop goes on: what waits is sent after the restart)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.wake()
                if self._store.outbox_stats()[0] == 0:
                    return True
                time.sleep(0.02)
            return self._store.outbox_stats()[0] == 0
        except StoreError as err:
            log.error("outbox not flushed: the store cannot be read (%s)", err,
                      extra={"store": str(self._store.path)})
            return False

    def _run(self) -> None:
        next_maintenance = time.monotonic()
        failing = False  # the last pass failed for the store: the next failures are not logged again
        while not self._stop.is_set():
            self.heartbeat = waited_from = time.monotonic()
            wait = self._next_wait()  # <= 0 when a deadline has passed already
            self._wake.wait(max(0.01, wait))  # never a spin (a due retry may find no room in the window)
            self._wake.clear()
            overdue = time.monotonic() - waited_from >= wait  # a deadline came, whatever woke the thread
            with self._fresh_lock:
                fresh, self._fresh = self._fresh or overdue, False
            if fresh:
                self._safety_due = time.monotonic() + IDLE_WAIT_S
            try:
                with self._in_pass():
                    self._settle_acks()
                    self._settle_taken_back()
                    if self._connected() and (fresh or self._room_limited):
                        self._hand_over()
                    if time.monotonic() >= next_maintenance:
                        self._maintain()
                        next_maintenance = time.monotonic() + MAINTENANCE_S
                if failing:
                    failing = False
                    log.info("outbox passes read the store again")
            except StoreError as err:  # counted and reported by the store; health says so
                # once while it lasts: a pass runs every IDLE_WAIT_S, and the log is on the failing card too
                log.log(logging.DEBUG if failing else logging.WARNING, "outbox pass failed, store unavailable: %s",
                        err, extra={"store": str(self._store.path)})
                failing = True
                self._stop.wait(1.0)
            except Exception:
                log.exception("outbox pass failed; retrying")
                self._stop.wait(1.0)
        with self._in_pass():
            self._settle_acks()

    def _next_wait(self) -> float:
        """Until the next pass must read the outbox though nothing stored woke it: a retry or a held-back
        message falling due, or IDLE_WAIT_S after the last such read (the safety net). Deadlines, not
        waits: PUBACK wakes in between (a pass that only settles them) never put them off."""
        if not self._connected():  # nothing due can be handed over; the link coming up wakes the thread
            return IDLE_WAIT_S
        with self._pass:  # `_retries` changes in passes, and a pass may run on a committing thread (send_now)
            # with no room in the window a due retry cannot go either: the PUBACK that makes room wakes the pass
            retries = [r.due for r in self._retries.values()] if self._room() > 0 else []
            due = min([self._safety_due, *retries])
        with self._lock:
            if self._send_due is not None:
                due = min(due, self._send_due)
        return min(IDLE_WAIT_S, due - time.monotonic())

    # ---- PUBACKs -------------------------------------------------------------------------------
    def _settle_acks(self) -> None:
        done: list[int] = []
        while True:
            try:
                n, code = self._acked.get_nowait()
            except queue.Empty:
                break
            if code < 0x80:
                done.append(n)
                self._retries.pop(n, None)
            else:
                self._not_delivered(n, code)
        if done:
            self._store.acknowledge(done)
            self.acknowledged += len(done)

    def _not_delivered(self, n: int, code: int) -> None:
        row = self._row(n)
        if row is None:  # the bounds dropped it meanwhile
            self._retries.pop(n, None)
            return
        retry = self._retries.get(n, _Retry(0, 0.0))
        retry.attempts += 1
        retry.failed += code != QUOTA_EXCEEDED
        if code in NEVER_PASSES or retry.failed >= MAX_ATTEMPTS:
            self._retries.pop(n, None)
            self._set_aside(row, reason_name(code), code)
            return
        # (the exponent is capped: quota exceeded is retried for ever, and 2.0 ** 1024 overflows)
        retry.due = time.monotonic() + min(RETRY_MAX_S, RETRY_MIN_S * 2.0 ** min(retry.attempts - 1, 32))
        self._retries[n] = retry
        log.warning("broker refused a message for now (reason 0x%02X %s); retrying in %.0f s", code,
                    reason_name(code), retry.due - time.monotonic(),
                    extra={"topic": row.message.topic, "command_id": row.message.command_id,
                           "attempts": retry.attempts})

    def _settle_taken_back(self) -> None:
        """Settles the rows the link took back from paho (`struck`, `too_large`): no PUBACK will come for them."""
        with self._lock:
            taken_back, self._taken_back = self._taken_back, []
        for n, too_large in taken_back:
            self._retries.pop(n, None)  # a retried row taken back: it leaves the outbox, or is re-cut
            row = self._row(n)
            if row is None:
                continue
            if too_large is None:
                self._set_aside(row, CONNECTION_DROPPED, None)
            else:
                self._too_large(row, too_large)

    def _set_aside(self, row: Pending, reason: str, code: int | None) -> None:
        forgotten = self._store.set_aside(row.n, reason)
        if forgotten:
            log.warning("refused messages kept for inspection over their bound: forgot the %d oldest", forgotten)
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.error("the broker will not take this message: set aside, not delivered (%s%s)", reason,
                  f", reason code 0x{code:02X}" if code is not None else "",
                  extra={"topic": row.message.topic, "command_id": row.message.command_id,
                         "bytes": len(row.message.payload), "reason": reason})
        self._on_refused(Refusal(row.message, reason, code))

    def _row(self, n: int) -> Pending | None:
        rows = self._store.pending(n - 1, 1)
        return rows[0] if rows and rows[0].n == n else None

    # ---- handing over --------------------------------------------------------------------------
    def _hand_over(self) -> None:
        self._room_limited = True  # until it gets through: an exception or a full window leaves it set
        with self._lock:  # everything stored until now is read here (or waits for room, `_room_limited`)
            self._send_due = None
            room = self._room()
        now = time.monotonic()
        for n in sorted(n for n, r in self._retries.items() if r.due <= now):
            if room <= 0:
                return
            row = self._row(n)
            if row is None:
                self._retries.pop(n, None)
                continue
            if not self._send(row):  # the link cannot take it now: due again after a while, never left
                self._retries[n].due = now + RETRY_MIN_S  # marked in flight with no PUBACK to come
                return
            retry = self._retries.get(n)  # gone when the row left the outbox instead (re-cut or set aside)
            if retry is not None:
                retry.due = float("inf")  # in flight again; its PUBACK decides
            room -= 1
        if room <= 0:
            return
        generation = self._store.generation  # noted before the read: a commit after it makes the next call read
        if self._read_through == (generation, self._handed):
            self._room_limited = False
            return
        self._read_through = None
        rows = self._store.pending(self._handed, room)
        for row in rows:
            if row.n in self._retries:
                continue
            if not self._send(row):
                return
            with self._lock:
                self._handed = max(self._handed, row.n)
        self._room_limited = len(rows) >= room  # it read as many as there was room for: there may be more
        self._read_through = None if self._room_limited else (generation, self._handed)

    def _room(self) -> int:
        """Messages the broker's Receive Maximum still takes, less one for the link's status message
        unless it is 1 (the link's window holds back whatever exceeds it: one at a time, never none)."""
        return min(MAX_IN_FLIGHT, max(1, self._window() - 1)) - len(self._by_mid)

    def _send(self, row: Pending) -> bool:
        """Hands one row to the link; False when the link cannot take more now."""
        try:
            mid = self._publish(row.message, lambda mid: self._on_the_wire(mid, row.n))
        except PacketTooLargeError as err:
            self._too_large(row, err)
            self._retries.pop(row.n, None)  # it left the outbox (re-cut into chunks, or set aside)
            with self._lock:
                self._handed = max(self._handed, row.n)
            return True
        return mid is not None  # None: try again on the next pass

    def _on_the_wire(self, mid: int, n: int) -> None:
        """Called by the link before any PUBACK for `mid` can be handled (under paho's lock)."""
        with self._lock:
            self._by_mid[mid] = n

    def _too_large(self, row: Pending, err: PacketTooLargeError) -> None:
        """Splits a response into chunks the broker takes, or sets aside what cannot be split."""
        pieces = rechunk(row.message, err.limit - (err.size - len(row.message.payload)))
        if pieces is None:
            self._set_aside(row, "packet_too_large", 0x95)
            return
        batch = self._store.batch()
        for piece in pieces:
            batch.publish(Outgoing(row.message.topic, m.encode(piece), row.message.correlation,
                                   row.message.command_id))
        batch.replace(row.n)  # in the same commit: a crash never leaves both (two sets of chunks after it)
        batch.commit()
        log.info("response split into %d chunks for the broker's maximum packet size %d", len(pieces), err.limit,
                 extra={"command_id": row.message.command_id, "bytes": len(row.message.payload)})
        self.wake()
