"""The catalog of protocol v1 commands: each one's params (and the kind of value each takes), its UDS
service, its result and one example. Pure. It is the one source for reading `key=value` words
(`sovd-edge uds`/`call`), for `sovd-edge commands`, and for the command tables in README.md and
docs/protocol.md; tests check it against the validators in wire/parse.py."""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from agent.config.model import ALL_COMMANDS, EcuConfig


class Kind(enum.Enum):
    """How a `key=value` word becomes the JSON value the command's validator reads."""

    TEXT = "text"  # a name, an id like 0x7E0, hex like 3E80: exactly as typed
    DIDS = "dids"  # a DID, or several: a,b,c or a JSON list
    NAMES = "names"  # one name, or several: a,b,c or a JSON list
    INTEGER = "integer"  # decimal digits become a number; 0x.. stays text (the validator reads both)
    BOOLEAN = "boolean"  # true or false
    VALUE = "value"  # a DID value: a number for numeric codecs, else as typed


@dataclass(frozen=True)
class Param:
    name: str
    kind: Kind
    required: bool
    doc: str  # Markdown, for the tables

    @property
    def shown(self) -> str:
        return self.name if self.required else f"[{self.name}]"


@dataclass(frozen=True)
class CommandSpec:
    name: str
    service: str  # the UDS service id, "0x22", or "any"
    params: tuple[Param, ...]
    result: str  # Markdown
    example: str  # words after `sovd-edge uds -c config/demo.yaml`
    needs: str = ""  # ECU state the command relies on, when it does

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _p(name: str, kind: Kind, doc: str, required: bool = True) -> Param:
    return Param(name, kind, required, doc)


_SESSION = "a non-default session: `set_session` first, in the same agent run"
SESSIONS_NOTE = ("Each `sovd-edge uds` run starts in the ECU's default session, where commands that need another "
                 "one get NRC 0x7F; `sovd-edge run` keeps a component's session between commands (TesterPresent), "
                 "so over MQTT they work after `set_session`.")
CATALOG: dict[str, CommandSpec] = {spec.name: spec for spec in (
    CommandSpec("read_data", "0x22", (_p("data", Kind.DIDS, 'a DID name, `"0xF190"`, or a list of them'),),
                '`{"values": {name: value}}`; DIDs the config does not describe give `{"raw": hex}`',
                "engine read_data data=vin,engine_speed"),
    CommandSpec("write_data", "0x2E", (_p("data", Kind.TEXT, "the DID"),
                                       _p("value", Kind.VALUE, "encoded by the DID's codec")),
                "`{}`", "engine write_data data=idle_mode value=high", needs=_SESSION),
    CommandSpec("read_faults", "0x19", (
        _p("status_mask", Kind.INTEGER, 'status mask, default `"0xFF"`', required=False),
        _p("snapshots", Kind.BOOLEAN, "`true` adds snapshot records", required=False),
        _p("extended", Kind.BOOLEAN, "`true` adds extended data", required=False)),
        '`{"faults": [...]}`, each with its code, status bits and, when asked, snapshots and extended data',
        "engine read_faults snapshots=true"),
    CommandSpec("clear_faults", "0x14", (
        _p("group", Kind.TEXT, '`"0xFFFFFF"` (default, all), a 24-bit group, or a code like `"P0301"`',
           required=False),), "`{}`", "engine clear_faults group=P0301"),
    CommandSpec("set_session", "0x10", (
        _p("session", Kind.TEXT, '`default`, `programming`, `extended`, `safety` or `"0xNN"`'),),
        '`{"session", "p2_ms", "p2_star_ms"}` (the ECU\'s announced timing)', "engine set_session session=extended"),
    CommandSpec("reset", "0x11", (_p("type", Kind.TEXT, '`hard`, `key_off_on`, `soft` or `"0xNN"`'),),
                "`{}`", "engine reset type=soft"),
    CommandSpec("security_access", "0x27", (
        _p("level", Kind.INTEGER, "odd integer; the key algorithm comes from the config"),),
        '`{"level", "unlocked": true}`', "engine security_access level=1", needs=_SESSION),
    CommandSpec("operation", "0x31", (
        _p("routine", Kind.TEXT, "routine name or id"),
        _p("action", Kind.TEXT, "`start`, `stop` or `results`"),
        _p("data", Kind.TEXT, "hex option record", required=False)),
        '`{"status_record": hex}`', "engine operation routine=self_test action=start"),
    CommandSpec("io_control", "0x2F", (
        _p("data", Kind.TEXT, "the DID"),
        _p("control", Kind.TEXT, "`return_control`, `reset_default`, `freeze` or `adjust`"),
        _p("value", Kind.VALUE, "with `adjust` only, encoded by the DID's codec", required=False)),
        '`{"values": {name: value}}`', "engine io_control data=engine_speed control=freeze"),
    CommandSpec("tester_present", "0x3E", (), "`{}`", "engine tester_present"),
    CommandSpec("raw", "any (as policy allows, below)", (_p("request", Kind.TEXT, "hex string, service id first"),),
                '`{"response": hex}`; `{"response": "", "suppressed": true}` when the request set the '
                'suppressPosRspMsgIndicationBit and no negative answer came within P2', "engine raw request=3E00"),
    CommandSpec("obd", "0x01, 0x09, 0x03, 0x07, 0x0A", (
        _p("pids", Kind.NAMES, "OBD-II PID names or `\"0xNN\"`, at most 6", required=False),
        _p("supported", Kind.BOOLEAN, "`true` reads the supported-PID bitmaps", required=False),
        _p("info", Kind.NAMES, "vehicle information (service 0x09), e.g. `vin`", required=False),
        _p("dtcs", Kind.NAMES, "`stored`, `pending` and/or `permanent`", required=False)),
        '`{"values", "supported", "info", "dtcs"}`', "engine obd pids=engine_speed,coolant_temperature"),
)}
assert tuple(CATALOG) == ALL_COMMANDS, "the catalog lists every command of protocol v1, in order"

_DECIMAL = re.compile(r"[+-]?[0-9]+")


def params_from_words(command: str, words: list[str], ecu: EcuConfig | None = None) -> dict[str, Any]:
    """The params object from command-line words: `key=value` read as the command's catalog says,
    `key:=JSON` taken as JSON, or a single JSON object. `ecu` (when known) gives DID codecs.

    Raises ValueError naming the params and the word at fault.
    """
    if len(words) == 1 and words[0].lstrip().startswith("{"):
        return _json(words[0], "params")  # valid JSON that starts with { is an object
    spec = CATALOG[command]
    params: dict[str, Any] = {}
    values: list[tuple[str, str]] = []  # DID values, read once `data` is known, wherever it stands
    for word in words:
        key, sep, raw = word.partition("=")
        if not sep or not key or key == ":":
            raise ValueError(f"params: expected key=value, key:=JSON or one JSON object, got {word!r}")
        param = spec.param(key)
        if key.endswith(":"):
            params[key[:-1]] = _json(raw, f"params.{key[:-1]}")
        elif param is not None and param.kind is Kind.VALUE:
            values.append((key, raw))
        else:
            params[key] = _read(param.kind, raw, key) if param else raw
    for key, raw in values:
        params[key] = _did_value(raw, params.get("data"), ecu)
    return params


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno}): {text}") from None


def _read(kind: Kind, raw: str, key: str) -> Any:
    if kind in (Kind.DIDS, Kind.NAMES):
        if raw.lstrip().startswith("["):
            return _json(raw, f"params.{key}")
        return [item.strip() for item in raw.split(",")] if "," in raw else raw
    if kind is Kind.INTEGER:
        return int(raw) if _DECIMAL.fullmatch(raw) else raw
    if kind is Kind.BOOLEAN:
        return {"true": True, "false": False}.get(raw.lower(), raw)
    return raw


def _did_value(raw: str, did: Any, ecu: EcuConfig | None) -> Any:
    """A number when the DID's codec is numeric (1e3 is 1000.0), an enum's integer, else the text."""
    spec = None
    if ecu is not None and isinstance(did, str):
        spec = ecu.did_by_name(did)
        if spec is None and did.lower().startswith("0x"):
            try:
                spec = ecu.did_by_id(int(did, 16))
            except ValueError:
                spec = None
    if spec is None:
        return raw
    codec = spec.codec
    if codec in ("unsigned", "signed"):
        if _DECIMAL.fullmatch(raw):
            return int(raw)
        try:
            number = float(raw)
        except ValueError:
            return raw
        return number if math.isfinite(number) else raw
    if codec == "enum" and _DECIMAL.fullmatch(raw) and raw not in {label for _, label in spec.enum}:
        return int(raw)
    return raw
