"""Polls the CAN interface's state and counters, estimates bus load, and reports state changes.

An observer of the bus, not a metric: the service publishes each change as a `bus_state` event, and the
metrics sink reads the last reading at scrape time (`current`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.bus.canstate import CanLink, bus_load, frame_bits, read_link
from agent.bus.owner import BusOwner
from agent.config.model import BusConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BusReading:
    """One reading of the CAN interface: the kernel's state and counters (socketcan), else the owner's."""

    interface: str
    state: str = "unknown"
    tx_errors: int | None = None
    rx_errors: int | None = None
    bus_off: int = 0
    restarts: int = 0
    rx_frames: int = 0
    tx_frames: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    load: float | None = None
    rebuilds: int = 0
    send_errors: int = 0  # these three are the agent's own, whatever the interface
    recv_errors: int = 0
    frames_dropped: int = 0
    handler_errors: int = 0

StateChange = Callable[[str, str, str], None]  # interface, state, previous


class BusMonitor:
    """On socketcan the kernel is asked (state, error counters, frames); elsewhere the bus owner's own
    counters are used and the state is `unknown`. A bus the owner lost is `stopped` either way."""

    def __init__(self, config: BusConfig, owner: BusOwner, interval_s: float, on_change: StateChange,
                 reader: Callable[[str], CanLink | None] = read_link) -> None:
        self._config = config
        self._owner = owner
        self._interval = interval_s
        self._on_change = on_change
        self._reader = reader
        self._kernel = config.interface == "socketcan"
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_totals: tuple[float, int, int] | None = None  # (time, frames, bytes)
        self._kernel_seen: CanLink | None = None  # the last link the kernel gave: its counters stay the source
        self.reading = BusReading(interface=config.channel)
        self._polled = False
        self.heartbeat = time.monotonic()

    def start(self) -> None:
        self.poll()
        self._thread = threading.Thread(target=self._run, name="bus-monitor", daemon=True)
        self._thread.start()

    @property
    def current(self) -> BusReading | None:
        """The last reading; None before the first poll, so that no empty reading (0 for every counter, a
        fall Prometheus takes for a reset after an agent restart) is ever served."""
        return self.reading if self._polled else None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poke(self, *_: object) -> None:
        """Re-read now (the owner just lost or regained the bus)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            self.heartbeat = time.monotonic()
            if not self._stop.is_set():
                try:
                    self.poll()
                except Exception:
                    log.exception("bus monitor poll failed")

    def poll(self) -> BusReading:
        """Once the kernel has answered, its counters stay the source: a read that fails (`ip` timed out,
        the adapter re-enumerating) keeps its last counters, says `unknown` and gives no load, rather than
        switching to the agent's own far smaller counts (a fall Prometheus would take for a reset)."""
        counters = self._owner.counters
        link = self._reader(self._config.channel) if self._kernel else None
        if link is not None:
            self._kernel_seen = link
        known = link or self._kernel_seen
        if known is not None:
            reading = BusReading(
                interface=self._config.channel, state=known.state if link else "unknown",
                tx_errors=link.tx_errors if link else None, rx_errors=link.rx_errors if link else None,
                bus_off=known.bus_off, restarts=known.restarts, rx_frames=known.rx_frames, tx_frames=known.tx_frames,
                rx_bytes=known.rx_bytes, tx_bytes=known.tx_bytes, rebuilds=counters.rebuilds)
            bitrate = known.bitrate or self._config.bitrate
        else:
            reading = BusReading(
                interface=self._config.channel, state="unknown", rx_frames=counters.frames_rx,
                tx_frames=counters.frames_tx, rx_bytes=counters.bytes_rx, tx_bytes=counters.bytes_tx,
                rebuilds=counters.rebuilds)
            bitrate = self._config.bitrate
        reading = replace(reading, send_errors=counters.send_errors, recv_errors=counters.recv_errors,
                          frames_dropped=counters.dropped, handler_errors=counters.handler_errors)
        if not self._owner.is_up:
            reading = replace(reading, state="stopped")
        held = link is None and known is not None  # the kernel did not answer: no new figures, no load
        reading = replace(reading, load=None if held else self._load(reading, bitrate))
        previous = self.reading.state
        self.reading = reading
        self._polled = True
        if reading.state != previous:
            log.info("CAN bus state %s -> %s", previous, reading.state, extra={"interface": reading.interface})
            try:
                self._on_change(reading.interface, reading.state, previous)
            except Exception:
                log.exception("bus state listener failed")
        return reading

    def _load(self, reading: BusReading, bitrate: int) -> float | None:
        now = time.monotonic()
        frames = reading.rx_frames + reading.tx_frames
        octets = reading.rx_bytes + reading.tx_bytes
        last, self._last_totals = self._last_totals, (now, frames, octets)
        if last is None or frames < last[1]:
            return None if last is None else 0.0
        return bus_load(frame_bits(frames - last[1], octets - last[2]), now - last[0], bitrate)

