"""What an ODX import found, and the config text it becomes. Pure (no odxtools here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.config.emit import comment, flow, scalar


@dataclass
class Did:
    name: str
    id: int
    codec: str = "raw"
    length: int | None = None
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    values: dict[int, str] = field(default_factory=dict)
    writable: bool = False
    note: str = ""  # why it is raw, or what it is
    service: str = ""  # the ODX service it came from
    dop: Any = None  # the odxtools DOP (tests decode with it)


@dataclass
class Ecu:
    name: str
    layer: str
    kind: str
    request_id: int | None = None
    response_id: int | None = None
    functional_id: int | None = None
    bitrate: int | None = None
    dids: list[Did] = field(default_factory=list)
    routines: list[tuple[str, int]] = field(default_factory=list)
    security_levels: list[int] = field(default_factory=list)
    dtcs: dict[str, str] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)


def did_entry(did: Did) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": did.name, "id": did.id, "codec": did.codec}
    if did.length is not None:
        entry["length"] = did.length
    if did.scale != 1.0:
        entry["scale"] = did.scale
    if did.offset != 0.0:
        entry["offset"] = did.offset
    if did.unit:
        entry["unit"] = did.unit
    if did.values:
        entry["values"] = dict(did.values)
    if did.writable:
        entry["writable"] = True
    return entry


def render(ecus: list[Ecu], source: str, odxtools_version: str) -> str:
    """A config with one `ecus:` entry per imported ECU; what could not be expressed is said in comments."""
    bitrates = {e.bitrate for e in ecus if e.bitrate}
    bitrate = bitrates.pop() if len(bitrates) == 1 else 500_000
    lines = [f"# Imported by `sovd-edge import-odx` from {comment(source)} (odxtools {comment(odxtools_version)}).",
             "# Check the CAN ids and names, give the vehicle id, then `sovd-edge check-config -c THIS_FILE`.",
             'vehicle: "CHANGE-ME"',
             f"bus: {flow({'interface': 'socketcan', 'channel': 'can0', 'bitrate': bitrate})}"
             + ("  # CP_Baudrate in the ODX" if bitrates or any(e.bitrate for e in ecus) else ""),
             "ecus:"]
    for ecu in ecus:
        lines += [f"  # {comment(line)}" for line in _notes(ecu)]
        lines.append(f"  - name: {ecu.name}")
        lines.append(f"    addressing: {flow(_addressing(ecu))}" + ("" if ecu.request_id is not None and
                     ecu.response_id is not None else "  # NOT IN THE ODX: set the ECU's CAN ids"))
        if ecu.dids:
            lines.append("    dids:")
            for did in ecu.dids:
                note = f"  # {comment(did.note)}" if did.note else ""
                lines.append(f"      - {flow(did_entry(did))}{note}")
        if ecu.routines:
            lines.append("    routines:")
            lines += [f"      - {flow({'name': name, 'id': rid})}" for name, rid in ecu.routines]
        if ecu.dtcs:
            lines.append("    dtcs:")
            lines += [f"      {code}: {scalar('text', text)}" for code, text in ecu.dtcs.items()]
    return "\n".join(lines) + "\n"


def _addressing(ecu: Ecu) -> dict[str, Any]:
    request = ecu.request_id if ecu.request_id is not None else 0x7E0
    response = ecu.response_id if ecu.response_id is not None else 0x7E8
    extended = max(request, response) > 0x7FF
    entry: dict[str, Any] = {"mode": "normal_29bit" if extended else "normal_11bit", "request_id": request,
                             "response_id": response}
    if ecu.functional_id is not None and (ecu.functional_id > 0x7FF) == extended:
        entry["functional_id"] = ecu.functional_id
    return entry


def _notes(ecu: Ecu) -> list[str]:
    notes = [f"{ecu.name}: ODX layer {ecu.layer} ({ecu.kind})"]
    if ecu.variants:
        notes.append(f"ECU variants: {', '.join(ecu.variants)} (import one with --ecu NAME)")
    if ecu.security_levels:
        levels = ", ".join(str(level) for level in sorted(set(ecu.security_levels)))
        notes.append(f"security levels in the ODX: {levels}; add each under security: with its key algorithm")
    for name, why in ecu.skipped:
        notes.append(f"not imported: {name} ({why})")
    return notes
