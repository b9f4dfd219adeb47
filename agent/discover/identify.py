"""Reads what an ECU says about itself: the identification DIDs (0x22) and, for OBD-II ECUs, the VIN
(0x09) and supported PIDs (0x01). Every refusal or silence is noted, never fatal."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from agent.bus.isotp_link import IsoTpLink
from agent.config.model import Addressing, IsoTpConfig
from agent.config.transport import isotp_address, rx_ids
from agent.discover.tap import BusTap
from agent.errors import BusDownError, TransportTimeoutError
from agent.uds.transaction import InvalidResponseError, NegativeResponseError, Timing, UdsTimeoutError, transact
from agent.wire import obd

IDENT_DIDS = ((0xF190, "vin"), (0xF18C, "serial_number"), (0xF187, "part_number"), (0xF189, "software_version"),
              (0xF191, "hardware_number"), (0xF197, "system_name"), (0xF18A, "supplier"))


@dataclass
class Identity:
    """What one ECU answered: DID data by id, and a reason for each DID or OBD item it did not give."""

    dids: dict[int, bytes] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # "0xF197" / "obd_vin" -> "NRC 0x31 requestOutOfRange"
    obd_vin: str | None = None
    obd_pids: list[int] | None = None
    obd_name: str | None = None


def identify(tap: BusTap, addressing: Addressing, isotp: IsoTpConfig, p2_s: float, obd_ecu: bool) -> Identity:
    """Asks one ECU, one request at a time, over ISO-TP (multi-frame answers such as the VIN)."""
    address = isotp_address(addressing)
    link = IsoTpLink(tap, address, isotp, name=f"discover-{address.get_tx_arbitration_id():X}")  # type: ignore[arg-type]
    timing = Timing(p2_s, max(p2_s, 2.0), busy_retries=1)
    identity = Identity()
    try:
        for did, _ in IDENT_DIDS:
            data = _ask(link, bytes([0x22]) + did.to_bytes(2, "big"), timing, identity, f"0x{did:04X}")
            if data is not None and data[1:3] != did.to_bytes(2, "big"):
                identity.refused[f"0x{did:04X}"] = f"answer for DID {data[1:3].hex()}"
            elif data is not None:
                identity.dids[did] = data[3:]
        if obd_ecu:
            _obd(link, timing, identity)
    finally:
        link.close()
        for can_id, extended in rx_ids(address):
            tap.unsubscribe(can_id, extended)
    return identity


def _obd(link: IsoTpLink, timing: Timing, identity: Identity) -> None:
    for name in ("vin", "ecu_name"):
        data = _ask(link, obd.info_request(name), timing, identity, f"obd_{name}")
        try:
            value = obd.decode_info(name, data) if data is not None else None
        except obd.ObdResponseError as err:
            identity.refused[f"obd_{name}"] = str(err)
            continue
        if name == "vin":
            identity.obd_vin = value if isinstance(value, str) else None
        else:
            identity.obd_name = value if isinstance(value, str) else None
    pids: list[int] = []
    for base in obd.BITMAP_PIDS:
        data = _ask(link, obd.pid_request([base]), timing, identity, f"obd_pids_{base:02x}")
        try:
            split = obd.split_pid_response(data, [base]) if data is not None else {}
        except obd.ObdResponseError as err:
            identity.refused[f"obd_pids_{base:02x}"] = str(err)
            break
        if base not in split:
            break
        listed = obd.supported_from_bitmap(base, split[base])
        pids += listed
        if base + 0x20 not in listed:
            break
    identity.obd_pids = [p for p in pids if p not in obd.BITMAP_PIDS]


def _ask(link: IsoTpLink, request: bytes, timing: Timing, identity: Identity, what: str) -> bytes | None:
    try:
        return transact(link, request, timing, time.monotonic() + timing.p2_star + timing.p2)
    except NegativeResponseError as nrc:
        identity.refused[what] = f"NRC 0x{nrc.code:02X} {nrc.name}"
    except (UdsTimeoutError, TransportTimeoutError):
        identity.refused[what] = "no answer"
    except (InvalidResponseError, BusDownError) as err:
        identity.refused[what] = str(err)
    return None
