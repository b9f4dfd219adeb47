"""The ECU entries of a config (shared with the simulator's): addressing, ISO-TP, timing, DIDs, security."""

from __future__ import annotations

import importlib
import re
from typing import Any

from agent.config import model as m
from agent.config.reader import (
    InvalidValueError,
    Node,
    Problems,
    boolean,
    choice,
    describe,
    integer,
    join,
    number,
    text,
)
from agent.config.transport import isotp_address, validated_params

NAME = text(r"[a-z][a-z0-9_]{0,62}", "a name of lowercase letters, digits and _ starting with a letter")
CAN_11 = integer(0, 0x7FF, "an 11-bit CAN id")
CAN_29 = integer(0, 0x1FFFFFFF, "a 29-bit CAN id")
BYTE = integer(0, 0xFF, "a byte (0..0xFF)")
FD_LENGTHS = (8, 12, 16, 20, 24, 32, 48, 64)


def parse_ecu(node: Node, bus: m.BusConfig) -> m.EcuConfig | None:
    """One ECU entry; shared by the agent config and the simulator config."""
    if not node.ok:
        return None
    name = node.get("name", NAME)
    addressing = parse_addressing(node.child("addressing"), node)
    isotp = parse_isotp(node.child("isotp"), bus, node.problems)
    timing = _timing(node.child("timing"))
    dids = _dids(node)
    routines = _named_ids(node, "routines", integer(0, 0xFFFF, "a 16-bit routine id"))
    security = _security(node)
    allow_items = [node.check(p, v, choice(*m.ALL_COMMANDS)) for p, v in node.items_of("allow")]
    allow = frozenset(a for a in allow_items if a) if node.has("allow") else frozenset(m.DEFAULT_ALLOWED)
    queue_size = node.get("queue_size", integer(1, 10_000), 16)
    dtc_texts = _dtc_texts(node.child("dtcs"))
    uds_standard = node.get("uds_standard", _uds_standard, 2013)
    raw_services = frozenset(s for s in (node.check(p, v, _raw_service) for p, v in node.items_of("raw_services"))
                             if s is not None)
    allow_undeclared = node.get("allow_undeclared_ids", boolean, False)
    for index, did in enumerate(dids):
        if did.length is not None and did.length + 3 > isotp.max_pdu:
            node.problems.add(join(node.path, f"dids[{index}].length"),
                              f"{did.length} bytes do not fit isotp.max_pdu {isotp.max_pdu} (with 3 header bytes)")
    node.finish()
    return m.EcuConfig(
        name=name, addressing=addressing, isotp=isotp, timing=timing, dids=dids,
        routines=tuple(m.RoutineSpec(n, i) for n, i in routines), security=security,
        allow=allow, queue_size=queue_size, dtc_texts=dtc_texts, uds_standard=uds_standard,
        raw_services=raw_services, allow_undeclared_ids=allow_undeclared,
    )


def _uds_standard(value: Any) -> int:
    year = integer(2006, 2020, "an ISO 14229 edition")(value)
    if year not in m.UDS_STANDARDS:
        raise InvalidValueError(f"expected one of {', '.join(map(str, m.UDS_STANDARDS))}, got {year}")
    return year


def _raw_service(value: Any) -> int:
    service = integer(0, 0xFF, "a service id byte")(value)
    if service in m.COMMAND_OF_SERVICE:
        command = m.COMMAND_OF_SERVICE[service]
        raise InvalidValueError(f"0x{service:02X} has its own command: allow {command} to send it with raw")
    if 0x40 <= service <= 0x7F or service >= 0xC0:
        raise InvalidValueError(f"0x{service:02X} is not a request service id")
    return service


def parse_addressing(node: Node | None, parent: Node) -> m.Addressing:
    if node is None:
        parent.problems.add(join(parent.path, "addressing"), "required field is missing")
        return m.Addressing(mode="normal_11bit")
    mode = node.get("mode", choice(*m.ADDRESSING_MODES), "normal_11bit")
    can_id = CAN_29 if mode.endswith("29bit") else CAN_11
    needs_ids = mode != "normal_fixed_29bit"
    needs_addresses = mode.startswith(("extended", "normal_fixed")) or mode == "mixed_29bit"
    addressing = m.Addressing(
        mode=mode,
        request_id=node.get("request_id", can_id) if needs_ids else node.get("request_id", can_id, None),
        response_id=node.get("response_id", can_id) if needs_ids else node.get("response_id", can_id, None),
        functional_id=node.get("functional_id", can_id, None),
        target_address=node.get("target_address", BYTE) if needs_addresses
        else node.get("target_address", BYTE, None),
        source_address=node.get("source_address", BYTE) if needs_addresses
        else node.get("source_address", BYTE, None),
        address_extension=node.get("address_extension", BYTE) if mode.startswith("mixed")
        else node.get("address_extension", BYTE, None),
    )
    if needs_ids and addressing.request_id is not None and addressing.request_id == addressing.response_id:
        node.problems.add(join(node.path, "response_id"), "must differ from request_id")
    elif addressing.functional_id is not None and not mode.startswith("normal"):
        node.problems.add(join(node.path, "functional_id"),
                          "functional requests are supported with normal addressing modes only")
    elif not any(p.startswith(node.path) for p, _ in node.problems.items):
        try:  # what can-isotp would refuse at start-up is refused here, with the path
            isotp_address(addressing)
        except ValueError as err:
            node.problems.add(node.path, f"not a valid ISO-TP address: {err}")
    node.finish()
    return addressing


def parse_isotp(node: Node | None, bus: m.BusConfig, problems: Problems) -> m.IsoTpConfig:
    if node is None:
        return m.IsoTpConfig()
    fd = node.get("fd", boolean, False)
    length = node.get("data_length", integer(8, 64), 64 if fd else 8)
    if length not in FD_LENGTHS:
        problems.add(join(node.path, "data_length"), f"{length} is not a CAN FD length ({FD_LENGTHS})")
    elif length > 8 and not fd:
        problems.add(join(node.path, "data_length"), "lengths above 8 need fd: true")
    if fd and not bus.fd:
        problems.add(join(node.path, "fd"), "this ECU uses CAN FD but bus.fd is false")
    config = m.IsoTpConfig(
        padding=node.get("padding", BYTE, None),
        block_size=node.get("block_size", BYTE, 0),
        st_min=node.get("st_min", integer(0, 0xFF, "an ISO-TP STmin byte"), 0),
        fd=fd,
        data_length=length,
        max_pdu=node.get("max_pdu", integer(8, 0xFFFFFFFF), 8192),
        wftmax=node.get("wftmax", integer(0, 255, "a number of FC.WAIT frames (0..255)"), m.IsoTpConfig.wftmax),
        bitrate_switch=fd and bus.data_bitrate is not None,
    )
    if not any(p.startswith(node.path) for p, _ in problems.items):
        try:
            validated_params(config)
        except ValueError as err:
            problems.add(node.path, f"not valid ISO-TP parameters: {err}")
    node.finish()
    return config


def _timing(node: Node | None) -> m.Timing:
    if node is None:
        return m.Timing()
    ms = integer(1, 600_000)
    timing = m.Timing(
        p2_ms=node.get("p2_ms", ms, 1000),
        p2_star_ms=node.get("p2_star_ms", ms, 5000),
        request_ms=node.get("request_ms", ms, 10_000),
        s3_keepalive_ms=node.get("s3_keepalive_ms", integer(100, 60_000), 2000),
        busy_retries=node.get("busy_retries", integer(0, 20), 3),
    )
    node.finish()
    return timing


def _dids(node: Node) -> tuple[m.DidSpec, ...]:
    dids: list[m.DidSpec] = []
    names: set[str] = set()
    ids: set[int] = set()
    for path, item in node.items_of("dids"):
        d = Node(item, path, node.problems)
        if not d.ok:
            continue
        spec = parse_did(d)
        if spec.name in names:
            node.problems.add(join(path, "name"), f"duplicate DID name {spec.name!r}")
        if spec.id in ids:
            node.problems.add(join(path, "id"), f"duplicate DID id 0x{spec.id:04X}")
        names.add(spec.name)
        ids.add(spec.id)
        dids.append(spec)
    return tuple(dids)


def parse_did(d: Node) -> m.DidSpec:
    codec = d.get("codec", choice(*m.CODECS), "raw")
    limits = {"ascii": (1, 65535), "unsigned": (1, 8), "signed": (1, 8), "enum": (1, 4), "raw": (1, 65535)}[codec]
    needs_length = codec != "raw"
    length_conv = integer(*limits, f"a {codec} length ({limits[0]}..{limits[1]} bytes)")
    length = d.get("length", length_conv) if needs_length else d.get("length", length_conv, None)
    enum_node = d.child("values")
    enum: list[tuple[int, str]] = []
    if enum_node is not None:
        for key, label in enum_node.data.items():
            key_int = enum_node.convert(str(key), key, integer(0, None))
            label_text = enum_node.convert(str(key), label, text())
            if key_int is not None and label_text is not None:
                enum.append((key_int, label_text))
                enum_node.raw(key)
        enum_node.finish()
    if codec == "enum" and not enum:
        d.problems.add(join(d.path, "values"), "an enum DID needs a values table")
    if codec != "enum" and enum_node is not None:
        d.problems.add(join(d.path, "values"), "only enum DIDs take a values table")
    numeric = codec in ("unsigned", "signed")
    scale = d.get("scale", number(), 1.0)
    offset = d.get("offset", number(), 0.0)
    unit = d.get("unit", text(), None)
    if not numeric and (scale != 1.0 or offset != 0.0 or unit):
        d.problems.add(d.path, f"scale/offset/unit only apply to unsigned and signed DIDs, not {codec}")
    spec = m.DidSpec(
        name=d.get("name", NAME), id=d.get("id", integer(0, 0xFFFF, "a 16-bit DID")), codec=codec,
        length=length, scale=scale, offset=offset, unit=unit, enum=tuple(enum),
        writable=d.get("writable", boolean, False),
    )
    d.finish()
    return spec


def _named_ids(node: Node, key: str, id_conv: Any) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for path, item in node.items_of(key):
        r = Node(item, path, node.problems)
        if r.ok:
            out.append((r.get("name", NAME), r.get("id", id_conv)))
            r.finish()
    return out


def _security(node: Node) -> tuple[m.SecurityLevel, ...]:
    levels: list[m.SecurityLevel] = []
    for path, item in node.items_of("security"):
        s = Node(item, path, node.problems)
        if not s.ok:
            continue
        level = s.get("level", _odd_level)
        algorithm = s.get("algorithm", key_algorithm)
        params_node = s.child("params")
        params = tuple(sorted(params_node.data.items())) if params_node else ()
        if params_node:
            for key in params_node.data:
                params_node.raw(key)
        s.finish()
        levels.append(m.SecurityLevel(level=level, algorithm=algorithm, params=params))
    return tuple(levels)


def _odd_level(value: Any) -> int:
    level = integer(1, 0x7D, "a security level (1..0x7D)")(value)
    if level % 2 == 0:
        raise InvalidValueError(f"{level} is not odd (levels are requestSeed sub-functions: 1, 3, 5, ...)")
    return level


def key_algorithm(value: Any) -> str:
    """A "module:function" reference that must import and be callable."""
    ref = text(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", "a module:function reference")(value)
    try:
        resolve_callable(ref)
    except (ImportError, AttributeError, TypeError) as err:
        raise InvalidValueError(f"{ref!r} cannot be loaded: {err}") from None
    return ref


def resolve_callable(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    target = getattr(importlib.import_module(module_name), attr)
    if not callable(target):
        raise TypeError(f"{ref} is not callable")
    return target


DTC_CODE = re.compile(r"([PCBU][0-3][0-9A-F]{3})(?:-?([0-9A-F]{2}))?")


def dtc_key(value: Any) -> str:
    """A `dtcs:` key: a J2012 code (P0301, P0301-1A) or a 24-bit DTC number, normalised for lookup."""
    if isinstance(value, str) and (match := DTC_CODE.fullmatch(value.strip().upper())):
        return match.group(1) + (f"-{match.group(2)}" if match.group(2) else "")
    try:
        return f"0x{integer(0, 0xFFFFFF)(value):06X}"
    except InvalidValueError:
        raise InvalidValueError(f"{describe(value)} is not a DTC code like P0301, P0301-1A or 0x030100") from None


def _dtc_texts(node: Node | None) -> tuple[tuple[str, str], ...]:
    if node is None:
        return ()
    texts: dict[str, str] = {}
    for key, value in node.data.items():
        node.raw(key)
        code = node.convert(str(key), key, dtc_key)
        label = node.convert(str(key), value, text(max_len=1024))
        if code is not None and code in texts:
            node.problems.add(join(node.path, str(key)), f"{code} is given twice")
        elif code is not None and label is not None:
            texts[code] = label
    return tuple(sorted(texts.items()))
