"""CAN interface state and counters from the kernel (`ip -details -statistics -json link show`). Parsing is pure.

iproute2 versions differ: `sample_point` is a string in some, a number in others; drivers without
error counters omit `berr_counter`; vcan has no `info_data` at all. All of them parse here.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass

log = logging.getLogger(__name__)

STATES = ("error-active", "error-warning", "error-passive", "bus-off", "stopped", "unknown")
_KERNEL_STATES = {"ERROR-ACTIVE": "error-active", "ERROR-WARNING": "error-warning",
                  "ERROR-PASSIVE": "error-passive", "BUS-OFF": "bus-off", "STOPPED": "stopped"}


@dataclass(frozen=True)
class CanLink:
    """One reading of a CAN interface."""

    interface: str
    kind: str  # "can", "vcan", ...
    up: bool
    state: str  # one of STATES
    bitrate: int | None = None
    sample_point: float | None = None
    tx_errors: int | None = None  # transmit error counter (TEC)
    rx_errors: int | None = None  # receive error counter (REC)
    restarts: int = 0
    bus_off: int = 0
    error_warning: int = 0
    error_passive: int = 0
    rx_frames: int = 0
    tx_frames: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0


def parse_ip_link(text: str, interface: str) -> CanLink:
    """Parses `ip -details -statistics -json link show dev IFACE` output; ValueError if it is not that."""
    try:
        links = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not ip -json output: {err}") from None
    link = next((entry for entry in links if entry.get("ifname") == interface), None)
    if link is None:
        raise ValueError(f"no interface {interface} in ip output")
    info = link.get("linkinfo") or {}
    data = info.get("info_data") or {}
    xstats = info.get("info_xstats") or {}
    stats = link.get("stats64") or link.get("stats") or {}
    rx, tx = stats.get("rx") or {}, stats.get("tx") or {}
    up = "UP" in (link.get("flags") or []) or link.get("operstate") in ("UP", "UNKNOWN")
    # vcan and other interfaces without a CAN controller report no state at all
    state = _KERNEL_STATES.get(str(data.get("state", "")).upper(), "unknown")
    if not up:
        state = "stopped"  # any interface that is down, vcan included
    timing = data.get("bittiming") or {}
    berr = data.get("berr_counter") or {}
    sample_point = timing.get("sample_point")
    return CanLink(
        interface=interface, kind=str(info.get("info_kind", "unknown")), up=up, state=state,
        bitrate=_int(timing.get("bitrate")),
        sample_point=float(sample_point) if sample_point is not None else None,
        tx_errors=_int(berr.get("tx")), rx_errors=_int(berr.get("rx")),
        restarts=_int(xstats.get("restarts")) or 0, bus_off=_int(xstats.get("bus_off")) or 0,
        error_warning=_int(xstats.get("error_warning")) or 0, error_passive=_int(xstats.get("error_passive")) or 0,
        rx_frames=_int(rx.get("packets")) or 0, tx_frames=_int(tx.get("packets")) or 0,
        rx_bytes=_int(rx.get("bytes")) or 0, tx_bytes=_int(tx.get("bytes")) or 0,
    )


def _int(value: object) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def read_link(interface: str) -> CanLink | None:
    """Asks the kernel through iproute2; None (and a debug line) when that is not possible here."""
    ip = shutil.which("ip")
    if ip is None:
        return None
    try:
        out = subprocess.run([ip, "-details", "-statistics", "-json", "link", "show", "dev", interface],
                             capture_output=True, text=True, timeout=2, check=True).stdout
        return parse_ip_link(out, interface)
    except (subprocess.SubprocessError, OSError, ValueError) as err:
        log.debug("cannot read %s: %s", interface, err)
        return None


def frame_bits(frames: int, payload_bytes: int, extended: bool = False) -> int:
    """Approximate bits on the wire for classic CAN frames, with worst-case-ish bit stuffing."""
    overhead = 67 if extended else 47  # SOF, id, control, CRC, ACK, EOF, IFS
    return int((frames * overhead + payload_bytes * 8) * 1.1)


def bus_load(bits: int, seconds: float, bitrate: int) -> float:
    """The share of bit time used over an interval (0..1)."""
    if seconds <= 0 or bitrate <= 0:
        return 0.0
    return min(1.0, bits / (bitrate * seconds))
