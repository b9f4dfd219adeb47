"""Kernel ISO-TP (CAN_ISOTP sockets) for one ECU, and the check whether this kernel has it."""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import can
import isotp

from agent.bus.owner import BusOwner
from agent.config.model import IsoTpConfig
from agent.config.transport import rx_ids
from agent.errors import BusDownError, TransportTimeoutError

log = logging.getLogger(__name__)


def kernel_isotp_available() -> bool:
    """True when this kernel can open an AF_CAN/CAN_ISOTP socket (the only reliable test)."""
    family = getattr(socket, "AF_CAN", None)
    proto = getattr(socket, "CAN_ISOTP", None)
    if family is None or proto is None:
        return False
    try:
        probe = socket.socket(family, socket.SOCK_DGRAM, proto)
    except OSError:
        return False
    probe.close()
    return True


CLASSIC_MAX_PDU = 4095
MAX_PDU_PARAMETER = Path("/sys/module/can_isotp/parameters/max_pdu_size")


def kernel_isotp_max_pdu(parameter: Path = MAX_PDU_PARAMETER) -> int:
    """The largest PDU the kernel's ISO-TP takes: its max_pdu_size parameter (Linux 6.2+), else 4095."""
    try:
        return int(parameter.read_text().strip())
    except (OSError, ValueError):
        return CLASSIC_MAX_PDU


CANFD_BRS = 0x01  # linux/can.h: bit-rate switch (second bitrate for the payload)
_FIRST_FRAME = 0x1
_FRAME_LENGTHS = frozenset({8, 12, 16, 20, 24, 32, 48, 64})  # a first frame fills one: 8 bytes on CAN, a DLC step on FD


def await_pdu(read: Callable[[float], bytes | None], started: Callable[[], bool], timeout: float, limit: float,
              clock: Callable[[], float] = time.monotonic) -> bytes | None:
    """Waits for a whole PDU, bounding only its *first frame* by `timeout` (P2), the whole by `limit`.

    The kernel hands over a PDU only once it is complete, so a socket timeout of P2 would bound the
    whole transfer. Here `read(t)` blocks up to t seconds for a complete PDU (None on timeout) and
    `started()` tells whether a first frame has been seen (the bus owner's raw socket sees every
    frame). Without a first frame the wait ends at `timeout`; with one it goes on until `limit`, the
    kernel bounding each consecutive frame by N_Cr. Pure: the clock and both callables are given.
    """
    end = clock() + timeout
    while True:
        now = clock()
        receiving = started()
        until = limit if receiving else min(end, limit)
        if now >= until:
            if receiving:
                raise TransportTimeoutError("ISO-TP reception not complete by the deadline")
            return None
        data = read(until - now)
        if data is not None:
            return data


class KernelIsoTpLink:
    """The same send/recv/flush interface as IsoTpLink, with the kernel doing the protocol.

    When given the bus owner, it watches the ECU's response id on the raw bus for first frames, so
    that P2 bounds only the first frame of an answer, as in the userspace link.
    """

    def __init__(self, interface: str, address: isotp.Address, config: IsoTpConfig, name: str,
                 owner: BusOwner | None = None, socket_factory: Callable[[], isotp.socket] = isotp.socket) -> None:
        self.name = name
        self._interface = interface
        self._address = address
        self._config = config
        self._factory = socket_factory
        self._sock: isotp.socket | None = None
        self._first_frame = False  # a first frame was seen since the last flush or delivered PDU
        self._pci_at = address.get_rx_prefix_size()  # 1 with extended/mixed addressing: the address byte
        self._owner = owner  # its counters take this link's socket failures (the kernel sends, not the owner)
        if owner is not None:
            for can_id, extended in rx_ids(address):
                owner.subscribe(can_id, extended, self._on_frame)

    def _on_frame(self, msg: can.Message) -> None:
        """Notifier thread: notes a first frame (the kernel socket gets the same frame and reassembles).
        Not one the kernel drops: longer than max_pdu (it answers FC.OVERFLOW) or short enough for a single
        frame (ISO 15765-2: ignored), nor one that does not fill its CAN frame (the kernel takes the sender's
        frame length from it, and drops it unless it is a whole CAN (FD) frame length); waiting to the deadline
        for those would wait for nothing."""
        data = msg.data
        at = self._pci_at
        if len(data) not in _FRAME_LENGTHS or data[at] >> 4 != _FIRST_FRAME:
            return
        length = (data[at] & 0x0F) << 8 | data[at + 1]
        if length == 0:  # escape sequence: a 32-bit length follows (PDUs over 4095 bytes)
            length = int.from_bytes(data[at + 2:at + 6], "big") if len(data) >= at + 6 else 0
        single_frame_max = (7 if len(data) <= 8 else len(data) - 2) - at
        if single_frame_max < length <= self._config.max_pdu:
            self._first_frame = True

    @property
    def bound(self) -> bool:
        """The kernel socket is open: the kernel itself answers this ECU's first frames with flow control."""
        return self._sock is not None

    def _socket(self) -> isotp.socket:
        if self._sock is None:
            try:
                sock = self._factory()
                pad = self._config.padding
                sock.set_opts(txpad=pad, rxpad=pad)
                sock.set_fc_opts(bs=self._config.block_size, stmin=self._config.st_min)
                if self._config.fd:
                    sock.set_ll_opts(mtu=isotp.socket.LinkLayerProtocol.CAN_FD, tx_dl=self._config.data_length,
                                     tx_flags=CANFD_BRS if self._config.bitrate_switch else 0)
                sock.bind(self._interface, self._address)
            except OSError as err:
                raise BusDownError(f"{self.name}: cannot open kernel ISO-TP on {self._interface}: {err}") from err
            self._sock = sock
        return self._sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, payload: bytes, timeout: float) -> None:
        sock = self._socket()
        sock.settimeout(timeout)
        try:
            sock.send(payload)
        except TimeoutError as err:
            raise TransportTimeoutError(f"{self.name}: kernel ISO-TP send timed out") from err
        except OSError as err:
            self._failed("send")
            raise BusDownError(f"{self.name}: send failed on {self._interface}: {err}") from err

    def recv(self, timeout: float, limit: float | None = None) -> bytes | None:
        """The next whole PDU, or None if none has started within `timeout` (see `await_pdu`)."""
        sock = self._socket()
        limit = time.monotonic() + timeout if limit is None else limit
        try:
            data = await_pdu(lambda wait: self._read(sock, wait), lambda: self._first_frame, timeout, limit)
        except TransportTimeoutError as err:
            raise TransportTimeoutError(f"{self.name}: {err}") from err
        if data is not None:
            self._first_frame = False
        return data

    def _read(self, sock: isotp.socket, wait: float) -> bytes | None:
        sock.settimeout(max(wait, 0.001))
        try:
            return sock.recv(self._config.max_pdu + 8)
        except TimeoutError as err:
            if err.errno == errno.ETIMEDOUT:  # the kernel gave up on a consecutive frame (N_Cr)
                self._first_frame = False
                raise TransportTimeoutError(f"{self.name}: ISO-TP reception aborted: {err}") from err
            return None
        except OSError as err:
            self._failed("recv")
            raise BusDownError(f"{self.name}: receive failed on {self._interface}: {err}") from err

    def _failed(self, direction: str) -> None:
        """A socket error: counted where the owner's own are (sovd_can_send/receive_errors_total); the socket
        is closed and opened again at the next use (the kernel's, not the owner's bus, is what failed)."""
        self._drop()
        if self._owner is not None:
            if direction == "send":
                self._owner.counters.send_errors += 1
            else:
                self._owner.counters.recv_errors += 1

    def flush(self) -> None:
        self._first_frame = False
        if self._sock is None:
            return
        self._sock.settimeout(0)
        try:
            while self._sock.recv():
                pass
        except (BlockingIOError, TimeoutError):
            pass
        except OSError:
            self._drop()
