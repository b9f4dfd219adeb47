"""DTCs: SAE J2012 code text, ISO 14229 status bits, snapshot records. Pure."""

from __future__ import annotations

import re
from typing import Any

from agent.config.model import DidSpec
from agent.wire.codecs import decode

STATUS_BITS = (
    "test_failed",
    "test_failed_this_operation_cycle",
    "pending",
    "confirmed",
    "test_not_completed_since_last_clear",
    "test_failed_since_last_clear",
    "test_not_completed_this_operation_cycle",
    "warning_indicator_requested",
)
_SYSTEMS = "PCBU"
_CODE = re.compile(r"([PCBU])([0-3])([0-9A-F]{3})(?:-?([0-9A-F]{2}))?")


def format_code(dtc: int) -> str:
    """The J2012 text of a 3-byte UDS DTC's first two bytes: 0x030100 -> 'P0301'."""
    high = (dtc >> 16) & 0xFF
    system = _SYSTEMS[high >> 6]
    return f"{system}{(high >> 4) & 0x3}{high & 0xF:X}{(dtc >> 8) & 0xFF:02X}"


def parse_code(code: str) -> int:
    """'P0301' or 'P0301-1A' (failure type byte) -> 24-bit DTC; ValueError otherwise."""
    match = _CODE.fullmatch(code.strip().upper())
    if not match:
        raise ValueError(f"{code!r} is not a J2012 code like P0301 or P0301-1A")
    system, first, rest, ftb = match.groups()
    high = (_SYSTEMS.index(system) << 6) | (int(first) << 4) | int(rest[0], 16)
    return (high << 16) | (int(rest[1:], 16) << 8) | int(ftb or "00", 16)


def status_dict(status: int) -> dict[str, Any]:
    """{"raw": "0x2F", "test_failed": True, ...} with every ISO 14229 status bit named."""
    out: dict[str, Any] = {"raw": f"0x{status:02X}"}
    for bit, name in enumerate(STATUS_BITS):
        out[name] = bool(status & (1 << bit))
    return out


def fault_dict(dtc: int, status: int) -> dict[str, Any]:
    return {
        "code": format_code(dtc),
        "failure_type": f"0x{dtc & 0xFF:02X}",
        "dtc": f"0x{dtc:06X}",
        "status": status_dict(status),
    }


def with_text(entry: dict[str, Any], texts: tuple[tuple[str, str], ...], dtc: int) -> dict[str, Any]:
    """Adds `text` to a fault entry from a component's `dtcs:` table (keys as config.ecu normalises them).

    The most specific key wins: the 24-bit DTC ("0x030100"), the code with its failure type
    ("P0301-1A"), then the code alone ("P0301").
    """
    if texts:
        table = dict(texts)
        code = format_code(dtc)
        for key in (f"0x{dtc:06X}", f"{code}-{dtc & 0xFF:02X}", code):
            if key in table:
                entry["text"] = table[key]
                break
    return entry


def split_snapshot_records(data: bytes, specs: dict[int, DidSpec]) -> list[dict[str, Any]]:
    """Parses 0x19 0x04 record data (after DTC+status): [record, count, (DID, data)...]...

    DID lengths come from the config; where a length is unknown the rest of the record list is
    returned raw rather than guessed.
    """
    records: list[dict[str, Any]] = []
    pos = 0
    while pos < len(data):
        if pos + 2 > len(data):
            records.append({"raw": data[pos:].hex()})
            break
        number, count = data[pos], data[pos + 1]
        pos += 2
        values: dict[str, Any] = {}
        for _ in range(count):
            if pos + 2 > len(data):
                break
            did = int.from_bytes(data[pos:pos + 2], "big")
            spec = specs.get(did)
            length = spec.length if spec else None
            if spec is None or length is None or pos + 2 + length > len(data):
                records.append({"record": number, "values": values, "raw": data[pos:].hex()})
                return records
            values[spec.name] = decode(spec, data[pos + 2:pos + 2 + length])
            pos += 2 + length
        records.append({"record": number, "values": values})
    return records
