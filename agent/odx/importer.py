"""ODX (a PDX file) into `ecus:` config entries, with odxtools. Runs on a workstation: this module imports
odxtools at load time, so only `sovd-edge import-odx` imports it, and only when it runs."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import odxtools
from odxtools.compumethods.identicalcompumethod import IdenticalCompuMethod
from odxtools.compumethods.linearcompumethod import LinearCompuMethod
from odxtools.compumethods.texttablecompumethod import TexttableCompuMethod
from odxtools.dataobjectproperty import DataObjectProperty
from odxtools.odxtypes import DataType
from odxtools.parameters.codedconstparameter import CodedConstParameter
from odxtools.parameters.matchingrequestparameter import MatchingRequestParameter
from odxtools.parameters.valueparameter import ValueParameter
from odxtools.standardlengthtype import StandardLengthType

from agent.config.ecu import DTC_CODE
from agent.odx.entries import Did, Ecu

NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
BUILT_IN = {0x10: "set_session", 0x11: "reset", 0x14: "clear_faults", 0x19: "read_faults", 0x2F: "io_control",
            0x3E: "tester_present"}


class OdxImportError(ValueError):
    """The file cannot be read as a PDX, or names an ECU it does not have."""


class SelectionError(OdxImportError):
    """The layers asked for are not in the file, or cannot be one config together."""


def load(path: Path) -> Any:
    try:
        return odxtools.load_pdx_file(str(path))
    except Exception as err:  # odxtools raises many kinds for a broken file; each is "not a PDX we can read"
        raise OdxImportError(f"{path}: not a readable PDX ({type(err).__name__}: {err})") from err


def layers(database: Any, names: list[str] | None) -> list[Any]:
    """The diag layers to import: the named ones, else each base variant (or its only ECU variant)."""
    by_name = {dl.short_name: dl for dl in [*database.base_variants, *database.ecu_variants]}
    if names:
        names = list(dict.fromkeys(names))  # `--ecu X --ecu X` is X once
        others = {dl.short_name: dl for dl in database.diag_layers}  # protocols, functional groups, shared data
        for name in names:
            if name not in by_name and name in others:
                raise SelectionError(f"{name} is a {type(others[name]).__name__} layer, not an ECU "
                                     f"(ECUs: {', '.join(sorted(by_name))})")
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SelectionError(f"no ECU named {', '.join(unknown)} (has: {', '.join(sorted(by_name))})")
        return [by_name[n] for n in names]
    chosen = []
    for base in database.base_variants:
        variants = _variants_of(database, base)
        chosen.append(variants[0] if len(variants) == 1 else base)
    return chosen or list(database.ecu_variants)


def _variants_of(database: Any, base: Any) -> list[Any]:
    return [v for v in database.ecu_variants
            if any(getattr(ref.layer_ref, "ref_id", None) == base.odx_id.local_id for ref in v.parent_refs)]


def import_layer(database: Any, layer: Any) -> Ecu:
    kind = type(layer).__name__
    ecu = Ecu(name=_snake(layer.short_name) or "ecu", layer=layer.short_name, kind=kind,
              variants=[v.short_name for v in _variants_of(database, layer)] if kind == "BaseVariant" else [])
    for getter, attr in ((layer.get_can_receive_id, "request_id"), (layer.get_can_send_id, "response_id"),
                         (layer.get_can_func_req_id, "functional_id"), (layer.get_can_baudrate, "bitrate")):
        try:
            setattr(ecu, attr, getter())
        except Exception:  # a comparam odxtools cannot resolve is just not imported
            setattr(ecu, attr, None)
    writes: set[int] = set()
    for service in layer.services:
        try:
            _service(ecu, service, writes)
        except Exception as err:  # one service odxtools built but this importer cannot read fails alone
            ecu.skipped.append((getattr(service, "short_name", "?"), f"cannot be read: {type(err).__name__}: {err}"))
    for did in ecu.dids:
        did.writable = did.id in writes
    ecu.dtcs = _dtcs(layer)
    return ecu


def _service(ecu: Ecu, service: Any, writes: set[int]) -> None:
    request = getattr(service, "request", None)
    if request is None:
        ecu.skipped.append((service.short_name, "no request"))
        return
    prefix, rest = _prefix(request.parameters)
    sid = prefix[0] if prefix else None
    if sid == 0x22 and len(prefix) == 3 and not rest:
        did_id = int.from_bytes(prefix[1:3], "big")
        first = next((d for d in ecu.dids if d.id == did_id), None)
        if first is not None:
            ecu.skipped.append((service.short_name, f"reads DID 0x{did_id:04X} too, imported as {first.name}"))
        else:
            ecu.dids.append(_did(service, did_id, {d.name for d in ecu.dids}))
    elif sid == 0x2E and len(prefix) == 3:
        writes.add(int.from_bytes(prefix[1:3], "big"))
    elif sid == 0x31 and len(prefix) >= 4:
        routine = int.from_bytes(prefix[2:4], "big")
        if routine not in {r for _, r in ecu.routines}:
            name = _unique(_snake(re.sub(r"(?i)_?(start|stop|results?|request_?results?)$", "", service.short_name))
                           or f"routine_{routine:04x}", {n for n, _ in ecu.routines})
            ecu.routines.append((name, routine))
    elif sid == 0x27 and len(prefix) == 2 and prefix[1] % 2 == 1:
        ecu.security_levels.append(prefix[1])
    elif sid == 0x22:
        ecu.skipped.append((service.short_name, "service 0x22 without a 16-bit identifier"))
    elif sid in BUILT_IN:
        ecu.skipped.append((service.short_name, f"service 0x{sid:02X}: the agent's {BUILT_IN[sid]} command"))
    elif sid is not None and sid != 0x27:
        ecu.skipped.append((service.short_name, f"service 0x{sid:02X}: no config entry for it (raw command)"))
    else:
        ecu.skipped.append((service.short_name, "no coded service id"))


def _prefix(parameters: Any) -> tuple[bytes, list[Any]]:
    """The leading constant bytes of a request (service id, sub-function, identifier) and the other params."""
    out = bytearray()
    params = list(parameters)
    while params:
        p = params[0]
        dct = getattr(p, "diag_coded_type", None)
        bits = getattr(dct, "bit_length", None)
        if not isinstance(p, CodedConstParameter) or not bits or bits % 8 or (p.byte_position or 0) != len(out) \
                or (p.bit_position or 0) or not isinstance(p.coded_value, int):
            break
        out += p.coded_value.to_bytes(bits // 8, "big")
        params.pop(0)
    return bytes(out), params


def _did(service: Any, did_id: int, taken: set[str]) -> Did:
    base = _snake(re.sub(r"(?i)^(read_?(data_?by_?identifier)?_?|rdbi_?)", "", service.short_name))
    name = _unique(base or f"did_{did_id:04x}", taken)
    did = Did(name=name, id=did_id, service=service.short_name)
    responses = list(service.positive_responses)
    if not responses:
        did.note = "no positive response in the ODX"
        return did
    values = [p for p in responses[0].parameters
              if not isinstance(p, CodedConstParameter | MatchingRequestParameter)]
    if len(values) != 1 or not isinstance(values[0], ValueParameter) \
            or not isinstance(values[0].dop, DataObjectProperty) or (values[0].byte_position or 3) != 3:
        names = ", ".join(p.short_name for p in values)
        did.note = f"a structure ({names}): kept raw"
        return did
    did.dop = values[0].dop
    _codec(did, values[0].dop)
    return did


def _codec(did: Did, dop: Any) -> None:
    """Sets the agent's codec for an ODX data object property where one expresses it; else raw with a note."""
    dct, cm = dop.diag_coded_type, dop.compu_method
    if not isinstance(dct, StandardLengthType) or dct.bit_mask is not None or dct.bit_length % 8 \
            or dct.bit_length <= 0:
        did.note = f"{type(dct).__name__} of {getattr(dct, 'bit_length', '?')} bits: kept raw"
        return
    length, base = dct.bit_length // 8, dct.base_data_type
    did.length = length
    if base == DataType.A_ASCIISTRING and isinstance(cm, IdenticalCompuMethod):
        did.codec = "ascii"
    elif base not in (DataType.A_UINT32, DataType.A_INT32) or length > 8:
        did.note = f"{base.value}, {length} bytes: no codec for it in the agent, kept raw"
    elif length > 1 and not dct.is_highlow_byte_order:
        did.note = "little-endian (low-high byte order): kept raw"
    elif isinstance(cm, IdenticalCompuMethod):
        did.codec = "signed" if base == DataType.A_INT32 else "unsigned"
        did.unit = _unit(dop)
    elif isinstance(cm, LinearCompuMethod):
        segment = cm.segment
        if not segment.denominator:
            did.note = "linear computation with a zero denominator: kept raw"
            return
        scale, offset = segment.factor / segment.denominator, segment.offset / segment.denominator
        if not (math.isfinite(scale) and math.isfinite(offset)):  # YAML would read `inf` back as a string
            did.note = "linear computation with a factor or offset that is not a finite number: kept raw"
            return
        did.codec = "signed" if base == DataType.A_INT32 else "unsigned"
        did.scale, did.offset = scale, offset
        did.unit = _unit(dop)
    elif isinstance(cm, TexttableCompuMethod) and length <= 4:
        table: dict[int, str] = {}
        negative = False
        for scale in cm.compu_internal_to_phys.compu_scales if cm.compu_internal_to_phys else []:
            low, high = scale.lower_limit, scale.upper_limit
            label = scale.compu_const.vt if scale.compu_const is not None else None
            if low is None or (high is not None and high.value != low.value) or not label:
                table = {}
                break
            negative = negative or int(low.value) < 0
            table[int(low.value)] = label
        if negative:  # the enum codec reads the bytes unsigned, and the config takes no negative keys
            did.note = "text table with a negative value: kept raw"
        elif table:
            did.codec, did.values = "enum", table
        else:
            did.note = "text table with ranges: kept raw"
    else:
        did.note = f"{cm.category.value} computation: kept raw"
    if did.codec == "raw" and not did.note:
        did.note = "kept raw"


def _unit(dop: Any) -> str | None:
    unit = getattr(dop, "unit", None)
    return (unit.display_name or unit.short_name) if unit is not None else None


def _dtcs(layer: Any) -> dict[str, str]:
    texts: dict[str, str] = {}
    spec = layer.diag_data_dictionary_spec
    for dop in spec.dtc_dops if spec is not None else []:
        for dtc in dop.dtcs:
            display = (dtc.display_trouble_code or "").strip().upper()
            match = DTC_CODE.fullmatch(display)
            if match:
                key = match.group(1) + (f"-{match.group(2)}" if match.group(2) else "")
            elif 0 <= dtc.trouble_code <= 0xFFFFFF:
                key = f"0x{dtc.trouble_code:06X}"
            else:
                continue
            text = getattr(dtc.text, "text", dtc.text)
            if isinstance(text, str) and text.strip():
                texts.setdefault(key, " ".join(text.split())[:1024])
    return texts


def _snake(text: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "_", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text).lower()).strip("_")[:60]
    return name if NAME_RE.fullmatch(name) else ""


def _unique(base: str, taken: set[str]) -> str:
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def import_pdx(path: Path, names: list[str] | None = None) -> list[Ecu]:
    """Every selected ECU of a PDX file as config material; OdxImportError for unreadable files or names."""
    database = load(path)
    selected = layers(database, names)
    if not selected:  # a comparam-only PDX, or any zip odxtools can open: an empty `ecus:` is not a config
        raise OdxImportError(f"{path}: no ECU in it (no base variant or ECU variant layer)")
    ecus = [import_layer(database, layer) for layer in selected]
    answering: dict[int, Ecu] = {}
    for ecu in ecus:  # the agent routes answers by CAN id alone: the config would refuse the second
        if ecu.response_id is None:
            continue
        first = answering.setdefault(ecu.response_id, ecu)
        if first is not ecu:
            raise SelectionError(f"{first.layer} and {ecu.layer} answer on the same CAN id 0x{ecu.response_id:X} "
                                 "(variants of one ECU?): import one of them")
    taken: set[str] = set()
    for ecu in ecus:
        ecu.name = _unique(ecu.name, taken)
    return ecus
