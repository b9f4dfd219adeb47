"""OBD-II (SAE J1979 / ISO 15031-5 over ISO 15765-4): PIDs by name, requests and decoded responses. Pure.

Service 0x01 PIDs are decoded with the J1979 formulas into values with units; bitmaps of supported
PIDs, service 0x09 vehicle information (VIN, calibration ids, CVNs, ECU name) and the DTC lists of
services 0x03 (stored), 0x07 (pending) and 0x0A (permanent) as J2012 codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.config.reader import InvalidValueError, describe
from agent.wire.dtc import format_code, with_text

CURRENT_DATA, VEHICLE_INFO = 0x01, 0x09
DTC_SERVICES = {"stored": 0x03, "pending": 0x07, "permanent": 0x0A}
MAX_PIDS_PER_REQUEST = 6  # J1979 on CAN; older ECUs refuse more (and some refuse more than one)
BITMAP_PIDS = (0x00, 0x20, 0x40, 0x60, 0x80, 0xA0, 0xC0, 0xE0)

_PCT = 100 / 255
_TRIM = 100 / 128


@dataclass(frozen=True)
class Pid:
    """One service 0x01 PID: raw big-endian unsigned of `length` bytes; `kind` says how it becomes a value.

    linear: raw * scale + offset, in `unit`. enum: a label from `values`. bitmap: the supported
    PIDs it lists. monitor: MIL and DTC count. fuel_system: the state of fuel systems 1 and 2.
    """

    pid: int
    name: str
    length: int
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    kind: str = "linear"
    values: tuple[tuple[int, str], ...] = ()


def _lin(pid: int, name: str, length: int, unit: str, scale: float = 1.0, offset: float = 0.0) -> Pid:
    return Pid(pid, name, length, unit, scale, offset)


_FUEL_SYSTEM = ((0, "off"), (1, "open_loop_cold"), (2, "closed_loop"), (4, "open_loop_load"),
                (8, "open_loop_failure"), (16, "closed_loop_fault"))
_OBD_STANDARDS = (
    (1, "OBD-II (CARB)"), (2, "OBD (EPA)"), (3, "OBD and OBD-II"), (4, "OBD-I"), (5, "not OBD compliant"),
    (6, "EOBD"), (7, "EOBD and OBD-II"), (8, "EOBD and OBD"), (9, "EOBD, OBD and OBD-II"), (10, "JOBD"),
    (11, "JOBD and OBD-II"), (12, "JOBD and EOBD"), (13, "JOBD, EOBD and OBD-II"), (17, "EMD"), (18, "EMD+"),
    (19, "HD OBD-C"), (20, "HD OBD"), (21, "WWH OBD"), (23, "HD EOBD-I"), (24, "HD EOBD-I N"),
    (25, "HD EOBD-II"), (26, "HD EOBD-II N"), (28, "OBDBr-1"), (29, "OBDBr-2"), (30, "KOBD"),
    (31, "IOBD I"), (32, "IOBD II"), (33, "HD EOBD-IV"),
)
_FUEL_TYPES = (
    (0, "not_available"), (1, "gasoline"), (2, "methanol"), (3, "ethanol"), (4, "diesel"), (5, "lpg"),
    (6, "cng"), (7, "propane"), (8, "electric"), (9, "bifuel_gasoline"), (10, "bifuel_methanol"),
    (11, "bifuel_ethanol"), (12, "bifuel_lpg"), (13, "bifuel_cng"), (14, "bifuel_propane"),
    (15, "bifuel_electric"), (16, "bifuel_electric_combustion"), (17, "hybrid_gasoline"),
    (18, "hybrid_ethanol"), (19, "hybrid_diesel"), (20, "hybrid_electric"),
    (21, "hybrid_electric_combustion"), (22, "hybrid_regenerative"), (23, "bifuel_diesel"),
)

PIDS: dict[int, Pid] = {p.pid: p for p in (
    *(Pid(b, f"pids_supported_{b + 1:02x}_{(b + 0x20) & 0xFF:02x}", 4, kind="bitmap") for b in BITMAP_PIDS),
    Pid(0x01, "monitor_status", 4, kind="monitor"),
    Pid(0x03, "fuel_system_status", 2, kind="fuel_system", values=_FUEL_SYSTEM),
    _lin(0x04, "engine_load", 1, "%", _PCT),
    _lin(0x05, "coolant_temperature", 1, "degC", offset=-40),
    _lin(0x06, "short_term_fuel_trim_bank1", 1, "%", _TRIM, -100),
    _lin(0x07, "long_term_fuel_trim_bank1", 1, "%", _TRIM, -100),
    _lin(0x08, "short_term_fuel_trim_bank2", 1, "%", _TRIM, -100),
    _lin(0x09, "long_term_fuel_trim_bank2", 1, "%", _TRIM, -100),
    _lin(0x0A, "fuel_pressure", 1, "kPa", 3),
    _lin(0x0B, "intake_manifold_pressure", 1, "kPa"),
    _lin(0x0C, "engine_speed", 2, "rpm", 0.25),
    _lin(0x0D, "vehicle_speed", 1, "km/h"),
    _lin(0x0E, "timing_advance", 1, "deg", 0.5, -64),
    _lin(0x0F, "intake_air_temperature", 1, "degC", offset=-40),
    _lin(0x10, "maf_air_flow", 2, "g/s", 0.01),
    _lin(0x11, "throttle_position", 1, "%", _PCT),
    Pid(0x1C, "obd_standard", 1, kind="enum", values=_OBD_STANDARDS),
    _lin(0x1F, "run_time", 2, "s"),
    _lin(0x21, "distance_with_mil", 2, "km"),
    _lin(0x22, "fuel_rail_pressure_relative", 2, "kPa", 0.079),
    _lin(0x23, "fuel_rail_gauge_pressure", 2, "kPa", 10),
    _lin(0x2C, "commanded_egr", 1, "%", _PCT),
    _lin(0x2D, "egr_error", 1, "%", _TRIM, -100),
    _lin(0x2E, "commanded_evaporative_purge", 1, "%", _PCT),
    _lin(0x2F, "fuel_level", 1, "%", _PCT),
    _lin(0x30, "warmups_since_clear", 1, "count"),
    _lin(0x31, "distance_since_clear", 2, "km"),
    _lin(0x33, "barometric_pressure", 1, "kPa"),
    _lin(0x3C, "catalyst_temperature_b1s1", 2, "degC", 0.1, -40),
    _lin(0x3D, "catalyst_temperature_b2s1", 2, "degC", 0.1, -40),
    _lin(0x3E, "catalyst_temperature_b1s2", 2, "degC", 0.1, -40),
    _lin(0x3F, "catalyst_temperature_b2s2", 2, "degC", 0.1, -40),
    _lin(0x42, "control_module_voltage", 2, "V", 0.001),
    _lin(0x43, "absolute_load", 2, "%", _PCT),
    _lin(0x44, "commanded_equivalence_ratio", 2, "ratio", 2 / 65536),
    _lin(0x45, "relative_throttle_position", 1, "%", _PCT),
    _lin(0x46, "ambient_air_temperature", 1, "degC", offset=-40),
    _lin(0x47, "absolute_throttle_position_b", 1, "%", _PCT),
    _lin(0x48, "absolute_throttle_position_c", 1, "%", _PCT),
    _lin(0x49, "accelerator_pedal_position_d", 1, "%", _PCT),
    _lin(0x4A, "accelerator_pedal_position_e", 1, "%", _PCT),
    _lin(0x4B, "accelerator_pedal_position_f", 1, "%", _PCT),
    _lin(0x4C, "commanded_throttle_actuator", 1, "%", _PCT),
    _lin(0x4D, "time_with_mil", 2, "min"),
    _lin(0x4E, "time_since_clear", 2, "min"),
    Pid(0x51, "fuel_type", 1, kind="enum", values=_FUEL_TYPES),
    _lin(0x52, "ethanol_fuel", 1, "%", _PCT),
    _lin(0x59, "fuel_rail_absolute_pressure", 2, "kPa", 10),
    _lin(0x5A, "relative_accelerator_pedal_position", 1, "%", _PCT),
    _lin(0x5B, "hybrid_battery_remaining", 1, "%", _PCT),
    _lin(0x5C, "engine_oil_temperature", 1, "degC", offset=-40),
    _lin(0x5D, "fuel_injection_timing", 2, "deg", 1 / 128, -210),
    _lin(0x5E, "engine_fuel_rate", 2, "L/h", 0.05),
    _lin(0x61, "demanded_engine_torque", 1, "%", offset=-125),
    _lin(0x62, "actual_engine_torque", 1, "%", offset=-125),
    _lin(0x63, "engine_reference_torque", 2, "Nm"),
    _lin(0xA6, "odometer", 4, "km", 0.1),
)}
PIDS_BY_NAME: dict[str, Pid] = {p.name: p for p in PIDS.values()}

# Service 0x09 info types: name -> (info type, bytes per data item or None for a bitmap, ascii?)
INFO_TYPES: dict[str, tuple[int, int | None, bool]] = {
    "supported_info": (0x00, None, False),
    "vin": (0x02, 17, True),
    "calibration_ids": (0x04, 16, True),
    "cvns": (0x06, 4, False),
    "ecu_name": (0x0A, 20, True),
}


class ObdResponseError(ValueError):
    """The ECU's OBD answer does not match the request or cannot be split by the J1979 layout."""


# ---- requests ----------------------------------------------------------------------------------

def pid_request(pids: list[int] | tuple[int, ...]) -> bytes:
    """Service 0x01 request for 1..6 PIDs; an unknown PID (no length known) must be asked alone."""
    if not 1 <= len(pids) <= MAX_PIDS_PER_REQUEST:
        raise ValueError(f"1 to {MAX_PIDS_PER_REQUEST} PIDs per request, got {len(pids)}")
    if len(pids) > 1 and any(p not in PIDS for p in pids):
        raise ValueError("a PID without a known length can only be requested alone")
    return bytes([CURRENT_DATA, *pids])


def info_request(name: str) -> bytes:
    return bytes([VEHICLE_INFO, INFO_TYPES[name][0]])


def lookup_pid(text: str) -> Pid | int:
    """A PID by name or by "0xNN" (an int for PIDs this table does not know); ValueError otherwise."""
    if text.lower().startswith("0x"):
        try:
            number = int(text, 16)
        except ValueError:
            raise ValueError(f"{text!r} is not a PID") from None
        if not 0 <= number <= 0xFF:
            raise ValueError(f"{text} is not a PID (0x00..0xFF)")
        return PIDS.get(number, number)
    pid = PIDS_BY_NAME.get(text)
    if pid is None:
        raise ValueError(f"no OBD-II PID named {text!r}")
    return pid


def parse_pid(value: Any) -> int:
    """The PID number a command or plan names (a name or "0xNN"); InvalidValueError for a field error."""
    if not isinstance(value, str):
        raise InvalidValueError(f"expected a PID name or \"0xNN\", got {describe(value)}")
    try:
        found = lookup_pid(value)
    except ValueError as err:
        raise InvalidValueError(str(err)) from None
    return found if isinstance(found, int) else found.pid


# ---- decoding ----------------------------------------------------------------------------------

def decode_pid(pid: int, data: bytes) -> Any:
    """The value of one PID's data bytes (J1979 formulas); unknown PIDs give {"raw": hex}."""
    spec = PIDS.get(pid)
    if spec is None:
        return {"raw": data.hex()}
    if len(data) != spec.length:
        raise ObdResponseError(f"PID 0x{pid:02X} needs {spec.length} bytes, got {len(data)}")
    raw = int.from_bytes(data, "big")
    if spec.kind == "linear":
        return round(raw * spec.scale + spec.offset, 6) if (spec.scale, spec.offset) != (1.0, 0.0) else raw
    if spec.kind == "bitmap":
        return supported_from_bitmap(pid, data)
    if spec.kind == "enum":
        return dict(spec.values).get(raw, raw)
    if spec.kind == "monitor":
        return {"mil": bool(data[0] & 0x80), "dtc_count": data[0] & 0x7F,
                "ignition": "compression" if data[1] & 0x08 else "spark"}
    states = dict(spec.values)  # fuel_system
    return {"system_1": states.get(data[0], f"0x{data[0]:02X}"),
            "system_2": states.get(data[1], f"0x{data[1]:02X}")}


def pid_value(pid: int, data: bytes) -> dict[str, Any]:
    """One entry of an `obd` result's `values`: {"pid", "value"[, "unit"]}."""
    entry: dict[str, Any] = {"pid": f"0x{pid:02X}", "value": decode_pid(pid, data)}
    unit = PIDS[pid].unit if pid in PIDS else None
    if unit:
        entry["unit"] = unit
    return entry


def pid_name(pid: int) -> str:
    return PIDS[pid].name if pid in PIDS else f"0x{pid:02X}"


def supported_from_bitmap(base: int, data: bytes) -> list[int]:
    """The PIDs a 4-byte bitmap of PID `base` lists: its MSB is PID base+1, its LSB base+0x20."""
    bits = int.from_bytes(data, "big")
    return [base + 1 + i for i in range(32) if bits & (1 << (31 - i))]


def split_pid_response(response: bytes, requested: list[int] | tuple[int, ...]) -> dict[int, bytes]:
    """The data bytes of each PID in a service 0x01 response (0x41 pid data pid data ...).

    ECUs leave out PIDs they do not support; a PID that was not requested, or one answered twice,
    makes the response invalid (it cannot belong to this request).
    """
    if not response or response[0] != CURRENT_DATA + 0x40:
        raise ObdResponseError(f"not a service 0x01 response: {response[:1].hex()}")
    out: dict[int, bytes] = {}
    pos = 1
    while pos < len(response):
        pid = response[pos]
        if pid not in requested or pid in out:
            raise ObdResponseError(f"answer for PID 0x{pid:02X}, which was not asked for (or twice)")
        length = PIDS[pid].length if pid in PIDS else len(response) - pos - 1
        if pos + 1 + length > len(response):
            raise ObdResponseError(f"PID 0x{pid:02X} truncated: {len(response) - pos - 1} of {length} bytes")
        out[pid] = response[pos + 1:pos + 1 + length]
        pos += 1 + length
    return out


def decode_info(name: str, response: bytes) -> Any:
    """A service 0x09 answer (0x49 infotype [NODI] items): text, a list of texts or hex, or supported types."""
    infotype, size, ascii_text = INFO_TYPES[name]
    if len(response) < 2 or response[0] != VEHICLE_INFO + 0x40 or response[1] != infotype:
        raise ObdResponseError(f"not an answer to service 0x09 info type 0x{infotype:02X}: {response[:2].hex()}")
    body = response[2:]
    if size is None:
        if len(body) != 4:
            raise ObdResponseError(f"info type bitmap needs 4 bytes, got {len(body)}")
        return supported_from_bitmap(infotype, body)
    if len(body) % size == 1 and body[0] * size == len(body) - 1:
        body = body[1:]  # ISO 15765-4: the number of data items comes first
    elif len(body) % size != 0 or not body:
        raise ObdResponseError(f"info type 0x{infotype:02X}: {len(body)} bytes are not items of {size}")
    items = [body[i:i + size] for i in range(0, len(body), size)]
    texts = [_text(item) if ascii_text else item.hex().upper() for item in items]
    return texts[0] if name in ("vin", "ecu_name") and len(texts) == 1 else texts


def _text(item: bytes) -> str:
    return item.strip(b"\x00 ").decode("ascii", errors="replace")


def decode_dtcs(service: int, response: bytes) -> list[int]:
    """The 2-byte DTCs of a service 0x03/0x07/0x0A answer (0x43 [count] dtc dtc ...); 0x0000 is padding."""
    if not response or response[0] != service + 0x40:
        raise ObdResponseError(f"not a service 0x{service:02X} response: {response[:1].hex()}")
    body = response[1:]
    if body and len(body) % 2 == 1 and body[0] * 2 == len(body) - 1:
        body = body[1:]  # ISO 15765-4 (CAN): the number of DTCs comes first
    elif len(body) % 2:
        raise ObdResponseError(f"{len(body)} bytes of DTCs are not whole 2-byte codes")
    codes = [int.from_bytes(body[i:i + 2], "big") for i in range(0, len(body), 2)]
    return [c for c in codes if c]


def dtc_entry(dtc: int) -> dict[str, Any]:
    """An OBD DTC as an `obd` result lists it: {"code": "P0301", "dtc": "0x0301"}."""
    return {"code": format_code(dtc << 8), "dtc": f"0x{dtc:04X}"}


# ---- encoding (the simulator answers with these) -----------------------------------------------

def encode_pid(pid: int, value: float) -> bytes:
    """The data bytes of a linear PID for a physical value (clamped to what the bytes can hold)."""
    spec = PIDS[pid]
    if spec.kind != "linear":
        raise ValueError(f"PID 0x{pid:02X} ({spec.name}) is not a linear value")
    raw = round((value - spec.offset) / spec.scale)
    raw = max(0, min((1 << (8 * spec.length)) - 1, raw))
    return raw.to_bytes(spec.length, "big")


def bitmap_for(base: int, supported: set[int]) -> bytes:
    """The 4-byte bitmap PID `base` answers for a set of supported PIDs (inverse of supported_from_bitmap)."""
    bits = 0
    for i in range(32):
        if base + 1 + i in supported:
            bits |= 1 << (31 - i)
    return bits.to_bytes(4, "big")


# ---- an `obd` command as requests and the result of each answer ---------------------------------

def plan(pids: tuple[int, ...], info: tuple[str, ...], dtcs: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """The requests of an `obd` command besides the supported-PID walk, each with the part it answers.

    Each is a single frame, so the same plan serves a physical request and a functional one (where
    `interpret` runs once per answering ECU).
    """
    parts: list[tuple[str, bytes]] = [("pids", pid_request(pids))] if pids else []
    parts += [(f"info:{name}", info_request(name)) for name in info]
    parts += [(f"dtcs:{kind}", bytes([DTC_SERVICES[kind]])) for kind in dtcs]
    return parts


def interpret(part: str, request: bytes, response: bytes, result: dict[str, Any],
              texts: tuple[tuple[str, str], ...] = ()) -> None:
    """Adds what one answer says to `result` (ObdResponseError when it does not answer `request`)."""
    kind, _, name = part.partition(":")
    if kind == "pids":
        asked = tuple(request[1:])
        data = split_pid_response(response, asked)
        result["values"] = {pid_name(x): pid_value(x, data[x]) for x in asked if x in data}
        missing = [f"0x{x:02X}" for x in asked if x not in data]
        if missing:
            result["unsupported"] = missing
    elif kind == "info":
        result.setdefault("info", {})[name] = decode_info(name, response)
    else:
        codes = decode_dtcs(request[0], response)
        result.setdefault("dtcs", {})[name] = [with_text(dtc_entry(d), texts, d << 8) for d in codes]
