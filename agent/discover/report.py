"""What discovery found, as a commented config that `check-config` accepts, or as JSON. Pure."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from agent.config.emit import comment, flow
from agent.config.model import BusConfig, IsoTpConfig
from agent.discover.identify import IDENT_DIDS, Identity
from agent.discover.probe import OBD_FUNCTIONAL_11BIT, OBD_FUNCTIONAL_29BIT, Responder, Traffic
from agent.wire import obd

FOUND_BY = {"obd_11bit": "OBD-II functional request on 0x7DF", "obd_29bit": "OBD-II functional request on "
            "0x18DB33F1", "scan_11bit": "TesterPresent scan (11-bit)", "scan_29bit": "TesterPresent scan (29-bit)"}
VIN = re.compile(r"[A-Z0-9]{17}")  # ISO 3779 leaves out I, O, Q; test benches do not


@dataclass
class Ecu:
    name: str
    responder: Responder
    found_by: list[str]
    isotp: IsoTpConfig
    identity: Identity = field(default_factory=Identity)


@dataclass
class Report:
    bus: BusConfig
    traffic: Traffic | None
    ecus: list[Ecu]
    when: str = ""


def ecu_name(identity: Identity, responder: Responder, taken: set[str]) -> str:
    """From F197 (system name), else the OBD-II ECU name's acronym, else the request id; unique."""
    candidates = [_ascii(identity.dids.get(0xF197, b"")), (identity.obd_name or "").split("\x00")[0].split("-")[0]]
    base = next((n for n in (_snake(c) for c in candidates) if n), "")
    if not base:
        a = responder.addressing
        base = f"ecu_{a.request_id:x}" if a.request_id is not None else f"ecu_18da{a.target_address:02x}f1"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def _snake(text: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40]
    return name if re.fullmatch(r"[a-z][a-z0-9_]*", name) else ""


def _ascii(data: bytes) -> str:
    text = data.rstrip(b"\x00 ").lstrip(b" ")
    return text.decode("ascii") if text and all(0x20 <= b < 0x7F for b in text) else ""


def vehicle_id(ecus: list[Ecu]) -> str | None:
    """The VIN most ECUs agree on, if any looks like a VIN."""
    vins = [v for e in ecus for v in (_ascii(e.identity.dids.get(0xF190, b"")), e.identity.obd_vin or "")
            if VIN.fullmatch(v)]
    return Counter(vins).most_common(1)[0][0] if vins else None


def ecu_config(ecu: Ecu) -> dict[str, Any]:
    """The `ecus:` entry for one found ECU (only what it showed: ids, frame format, identification DIDs)."""
    a = ecu.responder.addressing
    addressing: dict[str, Any] = {"mode": a.mode}
    if a.mode == "normal_fixed_29bit":
        addressing.update(target_address=a.target_address, source_address=a.source_address)
    else:
        addressing.update(request_id=a.request_id, response_id=a.response_id)
    if "obd_11bit" in ecu.found_by:
        addressing["functional_id"] = OBD_FUNCTIONAL_11BIT
    elif "obd_29bit" in ecu.found_by:
        addressing["functional_id"] = OBD_FUNCTIONAL_29BIT
    isotp: dict[str, Any] = {"padding": ecu.isotp.padding} if ecu.isotp.padding is not None else {}
    if ecu.isotp.fd:
        isotp.update(fd=True, data_length=ecu.isotp.data_length)
    entry: dict[str, Any] = {"name": ecu.name, "addressing": addressing}
    if isotp:
        entry["isotp"] = isotp
    dids = []
    for did, name in IDENT_DIDS:
        data = ecu.identity.dids.get(did)
        if data:
            dids.append({"name": name, "id": did, "codec": "ascii" if _ascii(data) else "raw", "length": len(data)})
    if dids:
        entry["dids"] = dids
    return entry


def config_dict(report: Report) -> dict[str, Any]:
    bus: dict[str, Any] = {"interface": report.bus.interface, "channel": report.bus.channel}
    if report.bus.interface != "virtual":
        bus["bitrate"] = report.bus.bitrate
    if report.bus.fd:
        bus["fd"] = True
    if report.bus.options:
        bus["options"] = dict(report.bus.options)
    return {"vehicle": vehicle_id(report.ecus) or "CHANGE-ME", "bus": bus,
            "ecus": [ecu_config(e) for e in report.ecus]}


def render_yaml(report: Report) -> str:
    """The config as YAML text, with what was found and how in comments."""
    config = config_dict(report)
    lines = [f"# Written by `sovd-edge discover` on {report.bus.interface}:{report.bus.channel}"
             + (f" at {report.when}" if report.when else "") + ".",
             *(f"# {line}" for line in _traffic_lines(report.traffic)),
             "# It sent only OBD-II services 0x01 and 0x09 and UDS 0x22 and 0x3E.",
             "# Next: check the names, add the DIDs you need (from the ECU's documentation or",
             "# `sovd-edge import-odx`), then `sovd-edge check-config -c THIS_FILE`.",
             f"vehicle: {json.dumps(config['vehicle'])}" + ("" if vehicle_id(report.ecus) else
                                                           "  # no VIN found: set the vehicle id"),
             f"bus: {flow(config['bus'])}"]
    if not report.ecus:
        lines += ["# No ECU answered: ignition on? bitrate right? try --scan.", "ecus: []"]
        return "\n".join(lines) + "\n"
    lines.append("ecus:")
    for ecu, entry in zip(report.ecus, config["ecus"], strict=True):
        lines += [f"  # {line}" for line in _ecu_comments(ecu)]
        lines.append(f"  - name: {entry['name']}")
        lines.append(f"    addressing: {flow(entry['addressing'])}")
        if "isotp" in entry:
            lines.append(f"    isotp: {flow(entry['isotp'])}")
        if "dids" in entry:
            lines.append("    dids:")
            for did in entry["dids"]:
                data = ecu.identity.dids[did["id"]]
                shown = json.dumps(_ascii(data)) if did["codec"] == "ascii" else data.hex()
                lines.append(f"      - {flow(did)}  # {shown[:60]}")
    return "\n".join(lines) + "\n"


def _traffic_lines(traffic: Traffic | None) -> list[str]:
    if traffic is None:
        return ["Bus: not listened to (--listen 0)."]
    busiest = sorted(traffic.ids, key=lambda i: -i[2])[:8]
    shown = ", ".join(f"{can_id_text(i, ext)} {rate:g}/s" for i, ext, _, rate in busiest)
    rising = {True: "RISING (wrong bitrate? wiring?)", False: "steady", None: "not readable here"}
    return [f"Bus: {len(traffic.ids)} ids talking in {traffic.seconds:g} s" + (f" ({shown})" if shown else "")
            + f"; error counters {rising[traffic.errors_rising]}."]


def can_id_text(can_id: int, extended: bool) -> str:
    return f"0x{can_id:08X}" if extended else f"0x{can_id:03X}"


def _ecu_comments(ecu: Ecu) -> list[str]:
    lines = ["found by " + ", ".join(FOUND_BY.get(f, f) for f in ecu.found_by)]
    if ecu.identity.obd_pids is not None:
        names = [obd.pid_name(p) for p in ecu.identity.obd_pids]
        text = ", ".join(names)
        lines.append(f"OBD-II PIDs: {text[:400]}" + ("..." if len(text) > 400 else ""))
        if ecu.identity.obd_vin:
            lines.append(f"OBD-II VIN: {ecu.identity.obd_vin}")
    refused = [f"{k} ({v})" for k, v in ecu.identity.refused.items()]
    if refused:
        lines.append("no answer for: " + ", ".join(refused))
    return [comment(line) for line in lines]


def as_json(report: Report) -> dict[str, Any]:
    """Everything found, for tools: traffic, each ECU with its identification, and the config."""
    traffic = None
    if report.traffic is not None:
        t = report.traffic
        traffic = {"seconds": t.seconds, "alive": t.alive, "errors_rising": t.errors_rising,
                   "error_frames": t.error_frames,
                   "ids": [{"id": f"0x{i:X}", "extended": ext, "frames": n, "per_second": r} for i, ext, n, r in t.ids]}
    ecus = []
    for ecu in report.ecus:
        ident = {name: (_ascii(ecu.identity.dids[did]) or ecu.identity.dids[did].hex())
                 for did, name in IDENT_DIDS if did in ecu.identity.dids}
        item: dict[str, Any] = {"name": ecu.name, "found_by": ecu.found_by, "config": ecu_config(ecu),
                                "identification": ident, "refused": ecu.identity.refused}
        if ecu.identity.obd_pids is not None:
            item["obd"] = {"vin": ecu.identity.obd_vin, "ecu_name": ecu.identity.obd_name,
                           "pids": [obd.pid_name(p) for p in ecu.identity.obd_pids]}
        ecus.append(item)
    return {"bus": {"interface": report.bus.interface, "channel": report.bus.channel}, "when": report.when,
            "traffic": traffic, "ecus": ecus, "config": config_dict(report)}
