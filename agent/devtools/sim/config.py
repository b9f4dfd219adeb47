"""Simulator YAML (config/sim/*.yaml) into frozen objects, with the same path-exact errors as the agent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config.ecu import BYTE, NAME, key_algorithm, parse_addressing, parse_isotp
from agent.config.model import Addressing, BusConfig, IsoTpConfig
from agent.config.parse import load_yaml
from agent.config.reader import InvalidValueError, Node, Problems, boolean, hex_bytes, integer, join, text
from agent.devtools.sim.dynamics import Schedule, Wave, parse_schedule, parse_wave
from agent.devtools.sim.obd import SimObd, parse_obd
from agent.errors import ConfigError
from agent.wire.dtc import parse_code

U16 = integer(0, 0xFFFF, "a 16-bit id")


@dataclass(frozen=True)
class Fault:
    """Injected misbehaviour for requests of one service (optionally only those starting with `match`)."""

    service: int
    match: bytes = b""  # bytes right after the service id, e.g. the DID "F190"
    delay_ms: int = 0
    pending: int = 0  # this many 0x78 before the answer
    busy: int = 0  # this many 0x21 before serving the request
    nrc: int | None = None
    no_answer: bool = False  # with `pending`: that many NRC 0x78, then silence
    reply: bytes | None = None  # answer with exactly these bytes instead (a wrong echo, another service's answer)
    repeat: int = 0  # send the (final) answer this many more times: two answers to one request


@dataclass(frozen=True)
class SimDid:
    id: int
    value: bytes
    writable: bool = False
    io: bool = False
    wave: Wave | None = None  # the value moves over time (agent/devtools/sim/dynamics.py)


@dataclass(frozen=True)
class SimDtc:
    dtc: int
    status: int
    snapshots: tuple[tuple[int, tuple[tuple[int, bytes], ...]], ...] = ()
    extended: tuple[tuple[int, bytes], ...] = ()
    schedule: Schedule | None = None  # the status changes over time (agent/devtools/sim/dynamics.py)


@dataclass(frozen=True)
class SimRoutine:
    id: int
    result: bytes = b""


@dataclass(frozen=True)
class SimSecurity:
    level: int
    algorithm: str
    params: tuple[tuple[str, Any], ...] = ()
    seed: bytes | None = None  # fixed seed; random when absent


@dataclass(frozen=True)
class SimEcu:
    name: str
    addressing: Addressing
    isotp: IsoTpConfig
    dids: tuple[SimDid, ...] = ()
    dtcs: tuple[SimDtc, ...] = ()
    routines: tuple[SimRoutine, ...] = ()
    security: tuple[SimSecurity, ...] = ()
    s3_ms: int = 5000
    faults: tuple[Fault, ...] = ()
    obd: SimObd | None = None  # answers OBD-II (services 0x01, 0x03, 0x07, 0x09, 0x0A), also functionally
    uds_standard: int = 2013  # 2006: session responses without the P2/P2* record
    fc_wait_frames: int = 0  # FC.WAIT frames sent before every "continue to send" flow control


@dataclass(frozen=True)
class SimConfig:
    bus: BusConfig | None
    ecus: tuple[SimEcu, ...]


def load_sim_config(path: str | Path) -> SimConfig:
    path = Path(path)
    problems = Problems()
    root = Node(load_yaml(path), "", problems)
    bus_node = root.child("bus")
    bus = None
    if bus_node is not None:
        fd = bus_node.get("fd", boolean, False)
        bus = BusConfig(interface=bus_node.get("interface", text()), channel=bus_node.get("channel", text()), fd=fd)
        bus_node.finish()
    fd_bus = BusConfig(interface="virtual", channel="-", fd=True)
    ecus = tuple(e for e in (_ecu(Node(item, p, problems), fd_bus) for p, item in root.items_of("ecus")) if e)
    root.finish()
    if problems:
        raise ConfigError(str(path), problems.items)
    return SimConfig(bus=bus, ecus=ecus)


def _ecu(node: Node, bus: BusConfig) -> SimEcu | None:
    if not node.ok:
        return None
    ecu = SimEcu(
        name=node.get("name", NAME),
        addressing=parse_addressing(node.child("addressing"), node),
        isotp=parse_isotp(node.child("isotp"), bus, node.problems),
        dids=tuple(_did(Node(i, p, node.problems)) for p, i in node.items_of("dids")),
        dtcs=tuple(_dtc(Node(i, p, node.problems)) for p, i in node.items_of("dtcs")),
        routines=tuple(_routine(Node(i, p, node.problems)) for p, i in node.items_of("routines")),
        security=tuple(_security(Node(i, p, node.problems)) for p, i in node.items_of("security")),
        s3_ms=node.get("s3_ms", integer(100, 600_000), 5000),
        faults=tuple(parse_fault(Node(i, p, node.problems)) for p, i in node.items_of("faults")),
        obd=parse_obd(node.child("obd")),
        uds_standard=node.get("uds_standard", integer(2006, 2020), 2013),
        fc_wait_frames=node.get("fc_wait_frames", integer(0, 100), 0),
    )
    node.finish()
    return ecu


def _value(node: Node) -> bytes:
    """A DID value given as exactly one of ascii / hex / fill {length, byte} (a wave is taken by _did)."""
    given = [k for k in ("ascii", "hex", "fill") if node.has(k)]
    if len(given) != 1:
        node.problems.add(node.path, "give exactly one of ascii, hex, fill or wave")
        for key in given:
            node.raw(key)
        return b""
    if given[0] == "ascii":
        ascii_text = node.get("ascii", text(max_len=4092))  # None after a problem was recorded
        return ascii_text.encode("ascii", errors="replace") if ascii_text is not None else b""
    if given[0] == "hex":
        return node.get("hex", hex_bytes) or b""
    fill = node.child("fill")
    if fill is None:  # `fill:` with nothing after it
        node.problems.add(join(node.path, "fill"), "expected a mapping {length, byte}, got nothing")
        return b""
    length = fill.get("length", integer(1, 65535))
    byte = fill.get("byte", BYTE, 0)
    counting = fill.get("counting", boolean, False)  # byte, byte+1, ... so truncation shows in tests
    fill.finish()
    return bytes((byte + i) & 0xFF if counting else byte for i in range(length or 0))


def _did(node: Node) -> SimDid:
    did_id = node.get("id", U16)
    wave_node = node.child("wave")
    wave = parse_wave(wave_node, did_id or 0) if wave_node is not None and wave_node.ok else None
    others = [k for k in ("ascii", "hex", "fill") if node.has(k)]
    if wave_node is not None and others:
        node.problems.add(node.path, f"give exactly one of ascii, hex, fill or wave, not wave and {others[0]}")
        for key in others:
            node.raw(key)
    value = wave.at(0.0) if wave is not None else b"" if wave_node is not None else _value(node)
    did = SimDid(id=did_id, value=value, writable=node.get("writable", boolean, False),
                 io=node.get("io", boolean, False), wave=wave)
    if wave_node is not None and (did.writable or did.io):
        node.problems.add(node.path, "a moving (wave) DID cannot be writable or io-controlled")
    node.finish()
    return did


def _dtc(node: Node) -> SimDtc:
    def code(value: Any) -> int:
        try:
            return parse_code(text()(value))
        except ValueError as err:
            raise InvalidValueError(str(err)) from None

    snapshots = []
    for path, item in node.items_of("snapshots"):
        s = Node(item, path, node.problems)
        dids_node = s.child("dids")
        values = []
        if dids_node is not None:
            for key, value in dids_node.data.items():
                did = dids_node.convert(str(key), key, U16)
                data = dids_node.convert(str(key), value, hex_bytes)
                dids_node.raw(key)
                if did is not None and data is not None:
                    values.append((did, data))
        snapshots.append((s.get("record", integer(1, 0xFE)), tuple(values)))
        s.finish()
    extended = []
    for path, item in node.items_of("extended"):
        e = Node(item, path, node.problems)
        extended.append((e.get("record", integer(1, 0xFE)), e.get("hex", hex_bytes)))
        e.finish()
    schedule = parse_schedule(node)
    status = node.get("status", BYTE, 0) if schedule is not None else node.get("status", BYTE)
    dtc = SimDtc(dtc=node.get("code", code), status=status, snapshots=tuple(snapshots),
                 extended=tuple(extended), schedule=schedule)
    node.finish()
    return dtc


def _routine(node: Node) -> SimRoutine:
    routine = SimRoutine(id=node.get("id", U16), result=node.get("result", hex_bytes, b""))
    node.finish()
    return routine


def _security(node: Node) -> SimSecurity:
    params = node.child("params")
    if params is not None:
        for key in params.data:
            params.raw(key)
    sec = SimSecurity(
        level=node.get("level", integer(1, 0x7D)), algorithm=node.get("algorithm", key_algorithm),
        params=tuple(sorted(params.data.items())) if params else (), seed=node.get("seed", hex_bytes, None),
    )
    node.finish()
    return sec


def parse_fault(node: Node) -> Fault:
    fault = Fault(
        service=node.get("service", BYTE), match=node.get("match", hex_bytes, b""),
        delay_ms=node.get("delay_ms", integer(0, 600_000), 0), pending=node.get("pending", integer(0, 1000), 0),
        busy=node.get("busy", integer(0, 1000), 0), nrc=node.get("nrc", BYTE, None),
        no_answer=node.get("no_answer", boolean, False), reply=node.get("reply", hex_bytes, None),
        repeat=node.get("repeat", integer(0, 100), 0),
    )
    node.finish()
    return fault


def fault_from_dict(data: dict[str, Any]) -> Fault:
    """Builds a Fault from a plain dict (tests and the CLI inject faults at run time)."""
    problems = Problems()
    fault = parse_fault(Node(data, "fault", problems))
    if problems:
        raise ConfigError("fault", problems.items)
    return fault


