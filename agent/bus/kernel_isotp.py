"""Kernel ISO-TP (CAN_ISOTP sockets) for one ECU, and the check whether this kernel has it."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import isotp

from agent.config.model import IsoTpConfig
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


class KernelIsoTpLink:
    """The same send/recv/flush interface as IsoTpLink, with the kernel doing the protocol."""

    def __init__(self, interface: str, address: isotp.Address, config: IsoTpConfig, name: str) -> None:
        self.name = name
        self._interface = interface
        self._address = address
        self._config = config
        self._sock: isotp.socket | None = None

    def _socket(self) -> isotp.socket:
        if self._sock is None:
            try:
                sock = isotp.socket()
                pad = self._config.padding
                sock.set_opts(txpad=pad, rxpad=pad)
                sock.set_fc_opts(bs=self._config.block_size, stmin=self._config.st_min)
                if self._config.fd:
                    sock.set_ll_opts(mtu=isotp.socket.LinkLayerProtocol.CAN_FD, tx_dl=self._config.data_length)
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
            self._drop()
            raise BusDownError(f"{self.name}: send failed on {self._interface}: {err}") from err

    def recv(self, timeout: float) -> bytes | None:
        sock = self._socket()
        sock.settimeout(max(timeout, 0.001))
        try:
            return sock.recv(self._config.max_pdu + 8)
        except TimeoutError:
            return None
        except OSError as err:
            self._drop()
            raise BusDownError(f"{self.name}: receive failed on {self._interface}: {err}") from err

    def flush(self) -> None:
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

    def close(self) -> None:
        self._drop()
