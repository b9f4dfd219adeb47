"""One simulated ECU on the bus: a thread serving UDS over ISO-TP, with injectable faults."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

import can
import isotp

from agent.bus.isotp_link import IsoTpLink
from agent.bus.owner import BusOwner
from agent.config.model import IsoTpConfig
from agent.config.transport import isotp_address, rx_ids
from agent.devtools.sim.config import Fault, SimEcu
from agent.devtools.sim.server import UdsServer
from agent.errors import BusDownError, TransportTimeoutError
from agent.wire.dtc import parse_code

log = logging.getLogger(__name__)

PENDING_INTERVAL_S = 0.02
FUNCTIONAL_SILENT_NRCS = frozenset({0x11, 0x12, 0x31, 0x7E, 0x7F})
FC_WAIT_INTERVAL_S = 0.05
_FLOW_CONTROL = 0x3


class WaitingLink(IsoTpLink):
    """An ECU's link that answers a first frame with FC.WAIT frames before its "continue to send".

    can-isotp's receiver never sends FC.WAIT; this one rewrites the flow control it is about to send.
    """

    def __init__(self, owner: BusOwner, address: isotp.Address, config: IsoTpConfig, name: str, waits: int) -> None:
        super().__init__(owner, address, config, name=name)
        self._waits = waits
        self._pci_at = len(address.get_tx_payload_prefix())

    def _txfn(self, frame: isotp.CanMessage) -> None:
        data = bytearray(frame.data)
        if len(data) > self._pci_at and data[self._pci_at] == _FLOW_CONTROL << 4:  # continue to send
            wait = bytearray(data)
            wait[self._pci_at] = (_FLOW_CONTROL << 4) | 1
            for _ in range(self._waits):
                super()._txfn(isotp.CanMessage(arbitration_id=frame.arbitration_id, data=bytes(wait),
                                               extended_id=frame.is_extended_id, is_fd=frame.is_fd,
                                               bitrate_switch=frame.bitrate_switch))
                time.sleep(FC_WAIT_INTERVAL_S)
        super()._txfn(frame)


class SimulatedEcu:
    """Serves requests in order; `received` counts every request seen, `server.executed` those run."""

    def __init__(self, config: SimEcu, owner: BusOwner, journal: Callable[[str], None] | None = None) -> None:
        self.config = config
        self._journal = journal
        self.name = config.name
        self.server = UdsServer(config, epoch=time.monotonic())
        self._state = threading.Lock()  # the server's state: requests here, injections from other threads
        self.received: Counter[int] = Counter()
        self._faults = list(config.faults)
        self._busy_left: dict[int, int] = {}
        self._lock = threading.Lock()
        address = isotp_address(config.addressing, server=True)
        self._link = (WaitingLink(owner, address, config.isotp, f"sim-{config.name}", config.fc_wait_frames)
                      if config.fc_wait_frames else IsoTpLink(owner, address, config.isotp, name=f"sim-{config.name}"))
        self._physical_rx = rx_ids(address)[0]
        self._functional: collections.deque[bytes] = collections.deque(maxlen=64)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sim-{config.name}", daemon=True)

    def on_functional_frame(self, msg: can.Message) -> None:
        """A single frame on the functional id (notifier thread): served like a physical request, but
        marked, so that the answers ISO 14229-1 suppresses for functional requests are not sent."""
        data = bytes(msg.data)
        length, start = (data[0] & 0x0F, 1) if data and data[0] & 0x0F else (data[1] if len(data) > 1 else 0, 2)
        if not data or data[0] >> 4 != 0 or not 0 < length <= len(data) - start:
            return  # only single frames exist on a functional id
        self._functional.append(data[start:start + length])
        # into the physical link's queue under the physical id: can-isotp then treats it as a request
        self._link._on_frame(can.Message(arbitration_id=self._physical_rx[0], data=data, is_fd=msg.is_fd,
                                         is_extended_id=self._physical_rx[1], bitrate_switch=msg.bitrate_switch))

    def set_faults(self, faults: list[Fault]) -> None:
        """Replaces the injected faults (tests change them between commands)."""
        with self._lock:
            self._faults = list(faults)
            self._busy_left.clear()

    def set_dtc(self, code: str | int, status: int) -> None:
        """Gives a DTC a status from now on, as if the ECU's diagnostics had changed it; 0 clears it.

        `code` is a 24-bit DTC or its J2012 text ("P0301", "U0100-87"). A schedule step that comes later
        overrides it.
        """
        dtc = parse_code(code) if isinstance(code, str) else code
        if not 0 <= dtc <= 0xFFFFFF or not 0 <= status <= 0xFF:
            raise ValueError(f"DTC 0x{dtc:X} / status 0x{status:X} out of range")
        with self._state:
            self.server.advance(time.monotonic())  # schedule steps already due do not override the injection
            self.server.set_dtc(dtc, status)
        log.info("simulated %s: DTC 0x%06X status 0x%02X", self.name, dtc, status)

    def dtc_statuses(self) -> dict[int, int]:
        """The DTCs the ECU stores now, with their status bytes."""
        with self._state:
            self.server.advance(time.monotonic())
            return {dtc: d.status for dtc, d in self.server.dtcs.items()}

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()
        self._link.wake()

    def stop(self, timeout: float = 2.0) -> None:
        self.request_stop()
        self._thread.join(timeout)

    def _fault_for(self, request: bytes) -> Fault | None:
        """The first fault for this service whose `match` bytes follow the service id."""
        with self._lock:
            return next((f for f in self._faults
                         if f.service == request[0] and request[1:].startswith(f.match)), None)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                request = self._link.recv(timeout=0.5)
                if request:
                    self._serve(request)
            except (BusDownError, TransportTimeoutError) as err:
                log.debug("simulated %s: %s", self.name, err)
                self._stop.wait(0.05)
            except Exception:
                log.exception("simulated ECU %s failed on a request", self.name)

    def _serve(self, request: bytes) -> None:
        functional = bool(self._functional) and self._functional[0] == request
        if functional:
            self._functional.popleft()
        self.received[request[0]] += 1
        fault = self._fault_for(request)
        sid = request[0]
        repeat = fault.repeat if fault is not None else 0
        if fault is not None:
            if fault.no_answer and not fault.pending:
                return
            key = id(fault)
            with self._lock:
                left = self._busy_left.setdefault(key, fault.busy)
                if left > 0:
                    self._busy_left[key] = left - 1
            if left > 0:
                self._send(bytes([0x7F, sid, 0x21]))
                return
            if fault.delay_ms:
                time.sleep(fault.delay_ms / 1000)
            for _ in range(fault.pending):
                self._send(bytes([0x7F, sid, 0x78]))
                time.sleep(PENDING_INTERVAL_S)
            if fault.no_answer:  # "pending", then silence
                return
            if fault.nrc is not None:
                self._send(bytes([0x7F, sid, fault.nrc]), repeat)
                return
            if fault.reply is not None:
                self._send(fault.reply, repeat)
                return
        with self._state:
            response = self.server.handle(request, time.monotonic())
        if self._journal is not None:
            self._journal(f"{self.name} {request.hex()}")
        if functional and response is not None and response[0] == 0x7F and response[2] in FUNCTIONAL_SILENT_NRCS:
            return  # ISO 14229-1: no such negative answer to a functionally addressed request
        if response is not None:
            self._send(response, repeat)

    def _send(self, payload: bytes, repeat: int = 0) -> None:
        for _ in range(1 + repeat):
            self._link.send(payload, timeout=2.0)
