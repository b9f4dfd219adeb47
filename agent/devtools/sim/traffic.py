"""The simulated vehicle's own periodic frames (what its ECUs broadcast while awake), with a sleep switch.

A real vehicle's bus carries periodic frames while it is awake and falls silent when it sleeps; the
agent's sleep detection watches for exactly that. `sleep()` stops the frames, `wake()` starts them again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import can

from agent.bus.owner import BusOwner
from agent.errors import BusDownError

log = logging.getLogger(__name__)

# Frames no test vehicle uses for diagnostics: a speed/rpm broadcast and a body status, 11-bit ids.
DEFAULT_FRAMES = ((0x0C9, bytes.fromhex("0010203040506070")), (0x3E9, bytes.fromhex("0100")))


class VehicleTraffic:
    def __init__(self, owner: BusOwner, frames: Sequence[tuple[int, bytes]] = DEFAULT_FRAMES,
                 period_s: float = 0.1) -> None:
        self._owner = owner
        self._frames = tuple(frames)
        self.period_s = period_s
        self._awake = threading.Event()
        self._awake.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    @property
    def awake(self) -> bool:
        return self._awake.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sim-vehicle-traffic", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._awake.set()  # let a sleeping loop see the stop
        if self._thread is not None:
            self._thread.join(timeout)

    def sleep(self) -> None:
        """The vehicle goes to sleep: no more frames until `wake`."""
        self._awake.clear()

    def wake(self) -> None:
        self._awake.set()

    def _run(self) -> None:
        counter = 0
        while not self._stop.is_set():
            self._awake.wait()
            if self._stop.is_set():
                return
            for can_id, data in self._frames:
                if not self._awake.is_set():
                    break
                payload = bytes([counter & 0xFF]) + data[1:]  # a rolling counter, as real broadcasts carry
                try:
                    self._owner.send(can.Message(arbitration_id=can_id, data=payload, is_extended_id=False))
                    self.sent += 1
                except BusDownError:
                    pass  # the bus is being rebuilt; the next period tries again
            counter += 1
            self._stop.wait(self.period_s)
