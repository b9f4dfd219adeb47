"""Userspace ISO-TP for one ECU: can-isotp's pure state machine, driven by the thread that uses it.

can-isotp's own threaded stacks run two polling threads per ECU; here the worker thread drives the
state machine only while a request is in flight, so an idle agent costs nothing per ECU. Frames
arrive through the bus owner's router into a bounded queue.
"""

from __future__ import annotations

import logging
import time

import can
import isotp

from agent.bus.frames import FrameQueue, to_can, to_isotp
from agent.bus.owner import BusOwner, FaultMark
from agent.config.model import IsoTpConfig
from agent.config.transport import isotp_params, rx_ids
from agent.errors import BusDownError, TransportTimeoutError

log = logging.getLogger(__name__)

_SLICE = 0.05  # longest single block inside process(); frames wake it at once
_WAKE = object()  # put in the frame queue to interrupt a blocked send/recv
# ISO-TP errors after which the PDU being sent was abandoned by can-isotp
_SEND_ABORTS = (isotp.errors.FlowControlTimeoutError, isotp.errors.MaximumWaitFrameReachedError,
                isotp.errors.UnsupportedWaitFrameError, isotp.errors.OverflowError)
# ISO-TP errors after which the PDU being received was given up (can-isotp refused or dropped it)
_RECV_ABORTS = (isotp.errors.ConsecutiveFrameTimeoutError, isotp.errors.WrongSequenceNumberError,
                isotp.errors.FrameTooLongError, isotp.errors.InvalidCanFdFirstFrameRXDL)


class IsoTpLink:
    """Send and receive whole ISO-TP PDUs to/from one peer over the shared bus."""

    def __init__(self, owner: BusOwner, address: isotp.Address, config: IsoTpConfig, name: str) -> None:
        self.name = name
        self._owner = owner
        self._fd = config.fd
        self._frames: FrameQueue[isotp.CanMessage | object] = FrameQueue(owner.counters, name)
        self._error: str | None = None
        self._send_aborted: str | None = None
        self._recv_aborted: str | None = None  # an answer that broke off since the last flush / whole PDU
        self._woken = False
        self._block = False
        self._logic = isotp.TransportLayerLogic(
            rxfn=self._rxfn, txfn=self._txfn, address=address,
            error_handler=self._on_error, params=isotp_params(config),
        )
        self._faults = FaultMark(owner)
        self._prefix = len(address.get_tx_payload_prefix())  # the address byte of extended/mixed addressing
        self._tx_dl = config.data_length
        for can_id, extended in rx_ids(address):
            owner.subscribe(can_id, extended, self._on_frame)
        owner.watch_faults(self._on_bus_fault)

    # ---- fed by the notifier thread ------------------------------------------------------------
    def _on_frame(self, msg: can.Message) -> None:
        self._frames.put(to_isotp(msg))

    def _on_bus_fault(self, reason: str) -> None:
        self._frames.put(_WAKE, counted=False)  # a blocked wait looks at the bus again at once

    # ---- callables for the state machine -------------------------------------------------------
    def _rxfn(self, timeout: float) -> isotp.CanMessage | None:
        # process() calls rxfn in a loop until it returns None, each time with the same timeout: only
        # the first call of a pass may block; the rest drain what is queued. (Blocking on every call
        # would sit out the timeout after each frame; never blocking would spin.)
        block = self._block and timeout > 0 and not self._woken
        self._block = False
        frame = self._frames.get(timeout if block else 0)
        return None if frame is _WAKE else frame  # type: ignore[return-value]

    def _process(self, rx_timeout: float) -> isotp.TransportLayerLogic.ProcessStats:
        """One pass of the state machine, blocking at most `rx_timeout` seconds for the first frame."""
        self._block = True
        return self._logic.process(rx_timeout=rx_timeout)

    def _txfn(self, frame: isotp.CanMessage) -> None:
        self._owner.send(to_can(frame))

    def _on_error(self, error: isotp.IsoTpError) -> None:
        self._error = f"{type(error).__name__}: {error}"
        if isinstance(error, _SEND_ABORTS):
            self._send_aborted = self._error
        elif isinstance(error, _RECV_ABORTS):
            self._recv_aborted = self._error
        log.debug("ISO-TP error on %s: %s", self.name, self._error)

    # ---- used by one worker thread -------------------------------------------------------------
    def send(self, payload: bytes, timeout: float) -> None:
        """Transmits one PDU; returns when the last frame is on the bus.

        Never spins: while a flow control frame is due it blocks on the frame queue, between
        consecutive frames for STmin (woken at once by any frame that arrives meanwhile).
        """
        self._error = self._send_aborted = None
        self._faults.reset()
        self._logic.send(payload)
        deadline = time.monotonic() + timeout
        stalled = False
        try:
            while self._logic.transmitting():
                self._faults.check(self.name, "during the exchange")
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._woken:
                    self._logic.stop_sending()
                    why = self._error or "no flow control"
                    raise TransportTimeoutError(f"{self.name}: ISO-TP send timed out ({why})")
                delay = self._logic.next_cf_delay()
                if self._logic.tx_state == isotp.TransportLayerLogic.TxState.WAIT_FC or stalled:
                    rx_timeout = min(remaining, _SLICE)
                else:
                    rx_timeout = min(delay or 0.0, remaining)
                stats = self._process(rx_timeout)
                if self._send_aborted and self._logic.transmitting():
                    # can-isotp reports an FC.WAIT it may not accept (wftmax 0) and then goes on sending on
                    # a later CTS: the ECU would run a request this send reports as not sent.
                    self._logic.stop_sending()
                    break
                stalled = rx_timeout == 0 and stats.sent == 0 and stats.received == 0
        except BusDownError:
            self._logic.reset()
            raise
        if self._send_aborted and not self._single_frame(len(payload)):  # it gave up on this PDU: not on the bus
            raise TransportTimeoutError(f"{self.name}: ISO-TP send failed: {self._send_aborted}")
        if self._send_aborted:  # a flow control (overflow) for no transfer of ours: a single frame has none
            log.debug("%s: ignoring %s, which came while a single frame was sent", self.name, self._send_aborted)

    def _single_frame(self, size: int) -> bool:
        """Whether a PDU of `size` bytes goes out as one single frame (can-isotp's own test)."""
        offset = 1 if size + self._prefix <= 7 else 2
        return size <= self._tx_dl - offset - self._prefix

    def recv(self, timeout: float, limit: float | None = None) -> bytes | None:
        """The next whole PDU from the peer, or None if none has started within `timeout` seconds.

        `timeout` (P2 for UDS) bounds the wait for the first frame; once a multi-frame reception is
        under way, it runs to its end, each consecutive frame bounded by the N_Cr timeout and the
        whole by `limit` (monotonic seconds; the command's deadline). When nothing whole came, but an
        answer started and broke off (N_Cr, a wrong sequence number, too long), that is raised
        (TransportTimeoutError) instead of returning None, as the kernel link does: not "no response".
        """
        now = time.monotonic()
        deadline = now + timeout
        limit = now + max(timeout, 3600.0) if limit is None else limit
        try:
            while True:
                data = self._logic.recv(block=False)
                if data is not None:
                    self._recv_aborted = None
                    return bytes(data)
                self._faults.check(self.name, "during the exchange")
                receiving = self._logic.is_rx_active()
                now = time.monotonic()
                if self._woken:
                    return None
                if not receiving and now >= min(deadline, limit):
                    if self._recv_aborted is not None:
                        why, self._recv_aborted = self._recv_aborted, None
                        raise TransportTimeoutError(f"{self.name}: an answer broke off under way ({why})")
                    return None
                if now >= limit:
                    self._logic.stop_receiving()
                    raise TransportTimeoutError(f"{self.name}: ISO-TP reception not complete by the deadline")
                busy = receiving or self._logic.transmitting()
                # Idle: no timer can fire, so block until a frame or the deadline.
                self._process(min(_SLICE if busy else deadline - now, limit - now))
        except BusDownError:
            self._logic.reset()
            raise

    def flush(self) -> None:
        """Forgets stale frames, half-done transfers and past bus faults before a new request."""
        self._frames.drain()
        self._logic.reset()
        self._recv_aborted = None
        self._faults.reset()

    def wake(self) -> None:
        """Makes a blocked send/recv return now, and every later one at once (used to stop)."""
        self._woken = True
        self._frames.put(_WAKE, counted=False)  # a full queue wakes the reader anyway

    def close(self) -> None:
        self.wake()
        self.flush()
