"""Frames between the bus owner and the ISO-TP state machines: the bounded queue each link reads from
(filled on the notifier thread, drained by the one worker thread that uses the link) and the
conversions between python-can and can-isotp frames."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import can
import isotp

from agent.bus.owner import BusCounters

log = logging.getLogger(__name__)

FRAME_QUEUE_SIZE = 4096  # frames; a 4095-byte PDU is 586 classic frames
DROP_LOG_EVERY_S = 60.0
T = TypeVar("T")


class FrameQueue(Generic[T]):
    """A bounded FIFO of frames (or wake-up markers): a full queue drops the frame and counts it."""

    def __init__(self, counters: BusCounters, name: str, size: int = FRAME_QUEUE_SIZE) -> None:
        self.name = name
        self._counters = counters
        self._queue: queue.Queue[T] = queue.Queue(maxsize=size)
        self._drops_unlogged = 0
        self._logged_at = -DROP_LOG_EVERY_S

    def put(self, item: T, counted: bool = True) -> bool:
        """Queues without blocking (notifier thread); False when full. A dropped frame is counted in
        `dropped`; `counted=False` for a marker whose loss does not matter (a full queue wakes anyway)."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if counted:
                self._counters.dropped += 1
                self._log_drop()
            return False
        return True

    def _log_drop(self) -> None:
        """A dropped frame breaks the answer it belonged to: said at once, then at most once a minute."""
        self._drops_unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= DROP_LOG_EVERY_S:
            log.warning("%s: frame queue full, %d frame(s) dropped (the answers they belonged to are lost)",
                        self.name, self._drops_unlogged, extra={"queue": self.name, "dropped": self._drops_unlogged})
            self._logged_at, self._drops_unlogged = now, 0

    def get(self, timeout: float) -> T | None:
        """The next item, waiting up to `timeout` seconds (0: not at all); None when there is none."""
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def qsize(self) -> int:
        """How many items wait (approximate while the notifier thread puts)."""
        return self._queue.qsize()

    def drain(self, handle: Callable[[T], None] | None = None) -> int:
        """Takes everything queued right now, without waiting: each item to `handle`, or dropped when
        there is none (stale frames before a new request). Returns how many items it took."""
        taken = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            taken += 1
            if handle is not None:
                handle(item)
        if taken and handle is None:
            log.debug("%s: flushed %d stale frame(s)", self.name, taken)
        return taken


def to_isotp(msg: can.Message) -> isotp.CanMessage:
    return isotp.CanMessage(arbitration_id=msg.arbitration_id, data=bytes(msg.data), dlc=msg.dlc,
                            extended_id=msg.is_extended_id, is_fd=msg.is_fd, bitrate_switch=msg.bitrate_switch)


def to_can(frame: isotp.CanMessage) -> can.Message:
    return can.Message(arbitration_id=frame.arbitration_id, data=frame.data, is_extended_id=frame.is_extended_id,
                       is_fd=frame.is_fd, bitrate_switch=frame.bitrate_switch, check=False)
