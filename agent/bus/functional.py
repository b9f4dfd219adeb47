"""Functional ISO-TP for one component: one single frame to every ECU on its functional id, and every
answer reassembled per responding ECU.

A functional request is a single frame (ISO 15765-2 has no flow control for a one-to-many transfer).
Answers come back physically, on each ECU's own response id, and may be multi-frame: each responder
gets its own can-isotp state machine, created at its first frame and driven by the calling worker
thread, which sends the flow control to that ECU's request id. Responders are the configured ECUs
(by name) and, for the OBD-style ids, unconfigured ones (by CAN id): 0x7E8-0x7EF answering 0x7E0-0x7E7
for an 11-bit functional id, 0x18DA<tester><ecu> answering 0x18DA<ecu><tester> for a 29-bit one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import can
import isotp

from agent.bus.frames import FrameQueue, to_can, to_isotp
from agent.bus.owner import BusOwner, FaultMark, RxFilter
from agent.config.model import EcuConfig, IsoTpConfig
from agent.config.transport import isotp_address, isotp_params, rx_ids
from agent.errors import TransportTimeoutError

log = logging.getLogger(__name__)

_SLICE = 0.05
_WAKE = can.Message(arbitration_id=0, check=False)  # put in the frame queue when the bus breaks
OBD_RESPONSES = RxFilter(0x7E8, False, mask=0x7F8)  # 0x7E8..0x7EF
_PHYSICAL_29 = 0x18DA0000
# can-isotp errors after which the answer a responder had under way is lost
_RX_ABORTS = (isotp.errors.ConsecutiveFrameTimeoutError, isotp.errors.WrongSequenceNumberError,
              isotp.errors.ChangingInvalidRXDLError, isotp.errors.FrameTooLongError,
              isotp.errors.InvalidCanFdFirstFrameRXDL)


@dataclass(frozen=True)
class Responder:
    """An ECU that may answer: its key in results, the tester-side address (flow control goes to its
    txid), its ISO-TP settings, whether another stack already sends it flow control, and whether its
    own worker is in a physical exchange with it right now (what it sends then is that exchange's)."""

    key: str
    address: isotp.Address
    config: IsoTpConfig
    passive: Callable[[], bool] = lambda: False
    busy: Callable[[], bool] = lambda: False


def can_id_key(can_id: int, extended: bool) -> str:
    return f"0x{can_id:08X}" if extended else f"0x{can_id:03X}"


def discovery(ecu: EcuConfig) -> tuple[RxFilter | None, Callable[[int, bool], isotp.Address | None]]:
    """The range of response ids unconfigured ECUs answer a functional request of `ecu` on, and the
    tester-side address for one of them (None: not a response to us)."""
    addressing = ecu.addressing
    if addressing.functional_id is None:
        return None, lambda can_id, extended: None
    if not addressing.mode.endswith("29bit"):
        def obd(can_id: int, extended: bool) -> isotp.Address | None:
            if extended or not 0x7E8 <= can_id <= 0x7EF:
                return None
            return isotp.Address(isotp.AddressingMode.Normal_11bits, txid=can_id - 8, rxid=can_id)
        return OBD_RESPONSES, obd
    tester = addressing.source_address
    if tester is None and addressing.response_id is not None and addressing.response_id >> 16 == 0x18DA:
        tester = (addressing.response_id >> 8) & 0xFF
    if tester is None:
        return None, lambda can_id, extended: None
    base = _PHYSICAL_29 | tester << 8

    def physical_29(can_id: int, extended: bool) -> isotp.Address | None:
        if not extended or can_id & 0x1FFFFF00 != base:
            return None
        ecu_address = can_id & 0xFF
        return isotp.Address(isotp.AddressingMode.Normal_29bits, txid=_PHYSICAL_29 | ecu_address << 8 | tester,
                             rxid=can_id)
    return RxFilter(base, True, mask=0x1FFFFF00), physical_29


def known_responders(ecus: list[EcuConfig], passive: Callable[[str], bool],
                     busy: Callable[[str], bool] = lambda name: False) -> dict[tuple[int, bool], Responder]:
    """Every configured ECU by its response id(s). `passive(name)`: another stack sends that ECU's flow
    control; `busy(name)`: that ECU's worker is in a physical exchange with it now."""
    found = {}
    for ecu in ecus:
        address = isotp_address(ecu.addressing)
        for key in rx_ids(address):
            found[key] = Responder(ecu.name, address, ecu.isotp, lambda name=ecu.name: passive(name),
                                   lambda name=ecu.name: busy(name))
    return found


class _Reassembly:
    """One responder's can-isotp state machine, fed frame by frame by the worker thread."""

    def __init__(self, owner: BusOwner, responder: Responder, on_lost: Callable[[str, str], None]) -> None:
        self.responder = responder
        self.frames: collections.deque[isotp.CanMessage] = collections.deque()
        params = {**isotp_params(responder.config), "listen_mode": responder.passive()}
        self.logic = isotp.TransportLayerLogic(
            rxfn=lambda timeout: self.frames.popleft() if self.frames else None,
            txfn=lambda frame: owner.send(to_can(frame)),
            address=responder.address, params=params,
            error_handler=self._on_error)
        self._on_lost = on_lost

    def _on_error(self, error: isotp.IsoTpError) -> None:
        log.debug("functional answer from %s: %s", self.responder.key, error)
        if isinstance(error, _RX_ABORTS):
            self._on_lost(self.responder.key, f"{type(error).__name__}: {error}")


class FunctionalLink:
    """Sends single-frame requests on one functional id and receives whole PDUs from every responder.

    Used by the one worker thread of its component; `open` starts listening (a tap on the bus owner),
    `close` stops it, so that an idle agent pays nothing for functional addressing. Between the two it
    holds the owner's `collecting` lock: one functional collection on the bus at a time.
    """

    def __init__(self, owner: BusOwner, ecu: EcuConfig, known: dict[tuple[int, bool], Responder]) -> None:
        assert ecu.addressing.functional_id is not None
        self.name = ecu.name
        self._owner = owner
        self._id = ecu.addressing.functional_id
        self._extended = ecu.addressing.mode.endswith("29bit")
        self._config = ecu.isotp
        self._known = known
        rx_filter, self._discover = discovery(ecu)
        for can_id, extended in known:
            owner.admit(RxFilter(can_id, extended))
        if rx_filter is not None:
            owner.admit(rx_filter)
        self._frames: FrameQueue[can.Message] = FrameQueue(owner.counters, f"{ecu.name} (functional)")
        self._rx: dict[tuple[int, bool], _Reassembly] = {}
        self._lost: dict[str, str] = {}
        self._busy_skipped: dict[str, int] = {}  # frames left to a responder's physical exchange, this collection
        self._skipped_lock = threading.Lock()  # counted on the notifier thread, logged on the worker's
        self._open = False
        self._faults = FaultMark(owner)
        owner.watch_faults(lambda reason: self._frames.put(_WAKE, counted=False))

    @property
    def single_frame_max(self) -> int:
        """The longest request one frame carries (functional requests are never segmented)."""
        return 7 if not self._config.fd or self._config.data_length == 8 else self._config.data_length - 2

    # ---- notifier thread -------------------------------------------------------------------------
    def _on_frame(self, msg: can.Message) -> None:
        responder = self._known.get((msg.arbitration_id, msg.is_extended_id))
        if responder is not None and responder.key != self.name and responder.busy():
            # Its own worker has a physical request out to it: this frame is that exchange's (whose flow control
            # comes from that link), not an answer to this functional request. Judged as it arrives: by the
            # time this link's worker reads it, that exchange may have ended.
            with self._skipped_lock:
                self._busy_skipped[responder.key] = self._busy_skipped.get(responder.key, 0) + 1
            return
        self._frames.put(msg)

    # ---- worker thread ---------------------------------------------------------------------------
    def open(self, timeout: float) -> None:
        """Starts a collection, waiting up to `timeout` seconds for one of another component to end."""
        if not self._owner.collecting.acquire(timeout=max(timeout, 0)):
            raise TransportTimeoutError(f"{self.name}: another functional request was still collecting answers")
        self._open = True
        self.flush()
        self._lost.clear()
        with self._skipped_lock:
            self._busy_skipped.clear()
        self._faults.reset()
        self._owner.tap(self._on_frame)

    def close(self) -> None:
        """Ends the collection: an answer still under way is given up (in `lost`), the bus let go of."""
        self._owner.untap(self._on_frame)
        self._give_up_under_way("answer not complete by the command deadline")
        self.flush()
        with self._skipped_lock:
            skipped, self._busy_skipped = self._busy_skipped, {}
        for key, frames in skipped.items():
            log.info("%s: %d frame(s) from %s left to its physical exchange under way, not taken as answers to "
                     "the functional request", self.name, frames, key,
                     extra={"component": self.name, "responder": key, "frames": frames})
        if self._open:
            self._open = False
            self._owner.collecting.release()

    def flush(self) -> None:
        self._frames.drain()
        self._rx.clear()

    def lost(self) -> dict[str, str]:
        """Responders whose answer broke off under way since `open` (N_Cr passed between two frames, a
        wrong sequence number, the deadline), with why; kept after `close` until the next `open`."""
        return dict(self._lost)

    def _note_lost(self, key: str, why: str) -> None:
        self._lost[key] = why

    def send(self, payload: bytes, timeout: float) -> None:
        """The request as one single frame on the functional id (padded like the component's frames)."""
        if len(payload) > self.single_frame_max:
            raise ValueError(f"a functional request is one frame: at most {self.single_frame_max} bytes")
        pci = bytes([len(payload)]) if len(payload) <= 7 else bytes([0, len(payload)])
        data = pci + payload
        size = 8 if not self._config.fd else max(8, next(n for n in (8, 12, 16, 20, 24, 32, 48, 64) if n >= len(data)))
        if self._config.padding is not None or self._config.fd:
            data = data.ljust(size, bytes([self._config.padding if self._config.padding is not None else 0xCC]))
        self._owner.send(can.Message(arbitration_id=self._id, data=data, is_extended_id=self._extended,
                                     is_fd=self._config.fd, bitrate_switch=self._config.bitrate_switch, check=False))

    def recv(self, timeout: float, limit: float) -> tuple[str, bytes] | None:
        """The next whole answer as (responder key, PDU), or None when none has started within `timeout`.

        Answers under way when `timeout` passes are received to their end (each frame bounded by
        N_Cr, the whole by `limit`); `recv(0, limit)` returns the next of those, None once none is left.
        An answer that breaks off, or is still under way at `limit`, is given up and listed in `lost`:
        one responder's failure never costs the others' answers. The bus breaking raises BusDownError:
        with answers gone with it, any list of the rest would be a wrong one."""
        deadline = time.monotonic() + timeout
        while True:
            self._take_queued()
            for assembly in self._rx.values():
                data = assembly.logic.recv(block=False)
                if data is not None:
                    return assembly.responder.key, bytes(data)
            self._faults.check(self.name, "while answers were collected")
            receiving = any(a.logic.is_rx_active() for a in self._rx.values())
            now = time.monotonic()
            if not receiving and now >= min(deadline, limit):
                return None
            if now >= limit:
                self._give_up_under_way("answer not complete by the command deadline")
                return None
            wait = min(_SLICE if receiving else deadline - now, limit - now)
            frame = self._frames.get(max(wait, 0))
            if frame is not None:
                self._dispatch(frame)
            for assembly in self._rx.values():
                assembly.logic.process(rx_timeout=0)  # timers, and flow control for a fresh first frame

    def _give_up_under_way(self, why: str) -> None:
        for assembly in self._rx.values():
            if assembly.logic.is_rx_active():
                assembly.logic.stop_receiving()
                self._note_lost(assembly.responder.key, why)

    def _take_queued(self) -> None:
        """Every frame that has already arrived into its responder's state machine, without waiting: an
        answer whose first frame came in time counts as under way even if it still sits in the queue."""
        self._frames.drain(self._dispatch)
        for assembly in self._rx.values():
            assembly.logic.process(rx_timeout=0)

    def _dispatch(self, msg: can.Message) -> None:
        if msg is _WAKE:
            return
        key = (msg.arbitration_id, msg.is_extended_id)
        assembly = self._rx.get(key)
        if assembly is None:
            responder = self._known.get(key)
            if responder is None:
                address = self._discover(*key)
                if address is None:
                    return  # not an answer: other traffic on the bus
                responder = Responder(can_id_key(*key), address, self._config)
            assembly = self._rx[key] = _Reassembly(self._owner, responder, self._note_lost)
        assembly.frames.append(to_isotp(msg))
