"""A tool's own connection to the bus: sees every frame (no kernel filters), counts ids, and sends only
the services discovery may send."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import can

from agent.bus.owner import BusCounters, open_bus
from agent.config.model import BusConfig
from agent.errors import AgentError, BusDownError

log = logging.getLogger(__name__)

# OBD-II current data and vehicle info, UDS ReadDataByIdentifier and TesterPresent: nothing that writes,
# resets, clears or changes a session.
ALLOWED_SERVICES = frozenset({0x01, 0x09, 0x22, 0x3E})
FrameSink = Callable[[can.Message], None]


class ForbiddenRequestError(AgentError, ValueError):
    """Discovery tried to send something other than a single frame of an allowed service or flow control."""


@dataclass
class IdStats:
    """What one CAN id did while the tap listened."""

    frames: int = 0
    first: float = 0.0
    last: float = 0.0
    fd: bool = False
    lengths: set[int] = field(default_factory=set)


def check_outgoing(data: bytes, prefix_size: int = 0) -> None:
    """Raises ForbiddenRequestError unless `data` is flow control or a single frame of an allowed service."""
    data = data[prefix_size:]
    if data and data[0] >> 4 == 3:
        return  # flow control for a multi-frame answer
    if data and data[0] >> 4 == 0:
        service = data[1] if data[0] else (data[2] if len(data) > 2 else None)
        if service in ALLOWED_SERVICES:
            return
    raise ForbiddenRequestError(f"discovery does not send {bytes(data).hex()}: only single-frame requests of "
                                f"services {', '.join(f'0x{s:02X}' for s in sorted(ALLOWED_SERVICES))}")


class BusTap(can.Listener):
    """Opens its own python-can bus and notifier. `subscribe`/`send`/`counters`/`breaks`/`watch_faults`
    are what an IsoTpLink needs."""

    def __init__(self, config: BusConfig, factory: Callable[[], can.BusABC] | None = None) -> None:
        self.config = config
        self.counters = BusCounters()
        self.sinks: dict[tuple[int, bool], FrameSink] = {}
        self.watchers: list[FrameSink] = []
        self.stats: dict[tuple[int, bool], IdStats] = {}
        self.sent: list[can.Message] = []
        self.error_frames = 0
        self.last_error: str | None = None
        self._fault_watchers: list[Callable[[str], None]] = []
        self._lock = threading.Lock()
        self._bus = (factory or (lambda: open_bus(config)))()
        self._notifier = can.Notifier(self._bus, [self], timeout=0.1)

    def __enter__(self) -> BusTap:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._notifier.stop(timeout=2.0)
        finally:
            self._bus.shutdown()

    # ---- notifier thread -----------------------------------------------------------------------
    def on_message_received(self, msg: can.Message) -> None:
        self.counters.frames_rx += 1
        if msg.is_error_frame:
            self.error_frames += 1
            return
        key = (msg.arbitration_id, msg.is_extended_id)
        now = time.monotonic()
        with self._lock:
            stats = self.stats.get(key)
            if stats is None:
                stats = self.stats[key] = IdStats(first=now)
            stats.frames += 1
            stats.last = now
            stats.fd = stats.fd or msg.is_fd
            stats.lengths.add(len(msg.data))
            watchers = list(self.watchers)
        for watch in watchers:
            watch(msg)
        sink = self.sinks.get(key)
        if sink is not None:
            sink(msg)

    def on_error(self, exc: Exception) -> None:
        self.counters.recv_errors += 1
        self.last_error = f"receive failed: {exc}"
        log.warning("receive failed on %s: %s", self.config.channel, exc)
        for on_fault in list(self._fault_watchers):
            on_fault(self.last_error)

    # ---- what an IsoTpLink and the probes use --------------------------------------------------
    def subscribe(self, can_id: int, extended: bool, sink: FrameSink) -> None:
        self.sinks[(can_id, extended)] = sink

    @property
    def breaks(self) -> int:
        """Receive failures so far: a link waiting for an answer then knows it went with the bus."""
        return self.counters.recv_errors

    def watch_faults(self, on_fault: Callable[[str], None]) -> None:
        """Calls `on_fault(reason)` on the notifier thread after each receive failure."""
        self._fault_watchers.append(on_fault)

    def unsubscribe(self, can_id: int, extended: bool) -> None:
        self.sinks.pop((can_id, extended), None)

    def watch(self, sink: FrameSink) -> Callable[[], None]:
        """Calls `sink` with every frame until the returned function is called."""
        with self._lock:
            self.watchers.append(sink)

        def stop() -> None:
            with self._lock:
                if sink in self.watchers:
                    self.watchers.remove(sink)

        return stop

    def snapshot(self) -> dict[tuple[int, bool], IdStats]:
        with self._lock:
            return {k: IdStats(v.frames, v.first, v.last, v.fd, set(v.lengths)) for k, v in self.stats.items()}

    def send(self, msg: can.Message, prefix_size: int = 0) -> None:
        """Sends one frame after `check_outgoing`; BusDownError when the bus refuses it."""
        check_outgoing(bytes(msg.data), prefix_size)
        try:
            self._bus.send(msg, timeout=0.5)
        except (can.CanError, OSError, ValueError) as err:
            self.counters.send_errors += 1
            raise BusDownError(f"CAN bus {self.config.channel}: send failed: {err}") from err
        self.counters.frames_tx += 1
        self.sent.append(msg)

    def send_frame(self, can_id: int, extended: bool, data: bytes, prefix_size: int = 0) -> None:
        self.send(can.Message(arbitration_id=can_id, is_extended_id=extended, data=data, check=False), prefix_size)
