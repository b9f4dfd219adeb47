"""Is the vehicle asleep? Watches the bus for frames other than the agent's own diagnostic traffic.

A vehicle's ECUs send periodic frames while it is awake and fall silent when it sleeps. The agent's
own requests and the ECUs' answers to them do not count: polling must not be what keeps collection
(and so the bus) awake. `frame` runs on the bus notifier thread and only stamps a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import can
import isotp

from agent.config.model import EcuConfig
from agent.config.transport import isotp_address

FrameKey = tuple[int, bool]


def diagnostic_ids(ecus: Iterable[EcuConfig]) -> set[FrameKey]:
    """The (arbitration id, extended) pairs of the agent's requests and the ECUs' answers."""
    ids: set[FrameKey] = set()
    for ecu in ecus:
        address = isotp_address(ecu.addressing)
        ids.add((address.get_tx_arbitration_id(isotp.TargetAddressType.Physical), address.is_tx_29bits()))
        ids.add((address.get_rx_arbitration_id(isotp.TargetAddressType.Physical), address.is_rx_29bits()))
        if ecu.addressing.functional_id is not None:
            ids.add((ecu.addressing.functional_id, ecu.addressing.mode.endswith("29bit")))
    return ids


class TrafficWatch:
    """Remembers when a frame from the vehicle (not the agent's diagnostics) was last seen."""

    def __init__(self, own: set[FrameKey], clock: Callable[[], float] = time.monotonic,
                 on_traffic: Callable[[], None] | None = None) -> None:
        self._own = own
        self._clock = clock
        self._on_traffic = on_traffic
        self.last_seen = clock()  # counted as awake at start: silence is measured from here
        self.frames = 0
        self._asleep = threading.Event()

    def frame(self, msg: can.Message) -> None:
        """Bus notifier thread: one received frame."""
        if msg.is_error_frame or msg.is_remote_frame or (msg.arbitration_id, msg.is_extended_id) in self._own:
            return
        self.last_seen = self._clock()
        self.frames += 1
        if self._asleep.is_set():
            self._asleep.clear()
            if self._on_traffic is not None:
                self._on_traffic()

    def silent_for(self) -> float:
        return self._clock() - self.last_seen

    def mark_asleep(self) -> None:
        """The next vehicle frame calls `on_traffic` (once): the waker of a paused scheduler."""
        self._asleep.set()
