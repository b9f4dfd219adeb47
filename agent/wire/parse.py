"""Validates a command object (protocol v1) against the config: pure, every problem with its field path."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.config.model import ALL_COMMANDS, AgentConfig, DidSpec, EcuConfig
from agent.config.reader import (
    InvalidValueError,
    Node,
    Problems,
    boolean,
    describe,
    hex_bytes,
    integer,
    shown,
    text,
)
from agent.errors import AgentError
from agent.wire import codecs, obd
from agent.wire import command as c
from agent.wire.catalog import CATALOG
from agent.wire.dtc import parse_code
from agent.wire.timefmt import parse_rfc3339

ID = text(c.COMMAND_ID.pattern, "1-128 of A-Z a-z 0-9 . _ : -", max_len=128)
def _topic(value: Any) -> str:
    topic = text(max_len=65535)(value)
    problem = c.topic_name_problem(topic)
    if problem is not None:
        raise InvalidValueError(f"not a topic one can publish to: it holds {problem}")
    return topic


TOPIC = _topic
SESSIONS = {"default": 1, "programming": 2, "extended": 3, "safety": 4}
RESETS = {"hard": 1, "key_off_on": 2, "soft": 3}
ACTIONS = {"start": 1, "stop": 2, "results": 3}
MAX_PROBLEMS_SHOWN = 5  # in an error message; every problem stays in `problems`
IO_CONTROLS = {"return_control": 0, "reset_default": 1, "freeze": 2, "adjust": 3}


class InvalidCommandError(AgentError, ValueError):
    """The command cannot be executed as written; `command_id` is set when the id itself was readable."""

    def __init__(self, problems: list[tuple[str, str]], command_id: str | None) -> None:
        self.problems = problems
        self.command_id = command_id
        shown_problems = "; ".join(f"{p}: {m}" if p else m for p, m in problems[:MAX_PROBLEMS_SHOWN])
        more = f" (and {len(problems) - MAX_PROBLEMS_SHOWN} more)" if len(problems) > MAX_PROBLEMS_SHOWN else ""
        super().__init__(shown_problems + more)


class UnknownComponentError(AgentError, LookupError):
    def __init__(self, component: str, command_id: str, known: tuple[str, ...] = ()) -> None:
        self.component = component
        self.command_id = command_id
        super().__init__(f"no component named {shown(component)} in this vehicle's config"
                         f" (known: {', '.join(known) or 'none'})")


@dataclass(frozen=True)
class Envelope:
    """A command whose top-level fields are valid and whose component exists; its params not yet read.

    Policy looks at this (component, command) before any param is parsed: a command the component
    does not allow is refused as such, whatever its params hold.
    """

    id: str
    component: str
    command: str
    ecu: EcuConfig
    params: Any  # as received: parse_body reads it
    timeout_ms: int | None
    expires_at: float | None
    reply_to: str | None
    progress: bool = False
    addressing: str = c.PHYSICAL


def parse_command(obj: Any, config: AgentConfig, received_at: float) -> c.Command:
    """A Command from a decoded JSON object; raises InvalidCommandError or UnknownComponentError."""
    return parse_body(parse_envelope(obj, config), received_at)


def parse_envelope(obj: Any, config: AgentConfig) -> Envelope:
    """The top-level fields of a command; raises InvalidCommandError or UnknownComponentError."""
    problems = Problems()
    node = Node(obj, "", problems)
    command_id = node.get("id", ID)
    if not node.ok:
        raise InvalidCommandError(problems.items, None)
    component = node.get("component", text(max_len=128))
    name = node.get("command", _command_name)
    timeout_ms = node.get("timeout_ms", integer(1, None, "a positive integer"), None)
    expires_at = node.get("expires_at", _timestamp, None)
    reply_to = node.get("reply_to", TOPIC, None)
    progress = node.get("progress", boolean, False)
    addressing = node.get("addressing", _addressing, c.PHYSICAL)
    params = node.raw("params", {})
    node.finish()
    if problems:
        raise InvalidCommandError(problems.items, command_id)
    ecu = config.ecu(component)
    if ecu is None:
        raise UnknownComponentError(component, command_id, tuple(e.name for e in config.ecus))
    if timeout_ms is not None:
        timeout_ms = min(timeout_ms, config.max_command_timeout_ms)
    return Envelope(command_id, component, name, ecu, params, timeout_ms, expires_at, reply_to, progress,
                    addressing)


def parse_body(envelope: Envelope, received_at: float) -> c.Command:
    """The Command with its typed params; raises InvalidCommandError naming each bad param."""
    problems = Problems()
    params = parse_params(envelope.command, Node(envelope.params, "params", problems), envelope.ecu)
    if envelope.addressing == c.FUNCTIONAL and not problems:
        _check_functional(envelope.command, params, envelope.ecu, problems)
    if problems:
        raise InvalidCommandError(problems.items, envelope.id)
    return c.Command(
        id=envelope.id, component=envelope.component, command=envelope.command, params=params,
        received_at=received_at, timeout_ms=envelope.timeout_ms, expires_at=envelope.expires_at,
        reply_to=envelope.reply_to, progress=envelope.progress, addressing=envelope.addressing,
    )


def _command_name(value: Any) -> str:
    if value not in ALL_COMMANDS:
        raise InvalidValueError(f"expected one of {', '.join(ALL_COMMANDS)}, got {describe(value)}")
    return value


def _addressing(value: Any) -> str:
    if value not in (c.PHYSICAL, c.FUNCTIONAL):
        raise InvalidValueError(f"expected physical or functional, got {describe(value)}")
    return value


# Services a functional `raw` may carry: reads (UDS and OBD-II), never anything that changes an ECU.
FUNCTIONAL_RAW_SERVICES = frozenset({0x01, 0x02, 0x03, 0x06, 0x07, 0x09, 0x0A, 0x19, 0x22, 0x23, 0x24, 0x3E})


def _check_functional(name: str, params: c.Params, ecu: EcuConfig, problems: Problems) -> None:
    """A functional request: reads only, a component with a functional id, one frame per request."""
    if name not in ("read_data", "tester_present", "raw", "obd"):
        problems.add("addressing", f"functional addressing is for read_data, tester_present, obd and raw reads, "
                                   f"not {name}")
        return
    if ecu.addressing.functional_id is None:
        problems.add("addressing", f"{ecu.name} has no addressing.functional_id in the agent's config")
        return
    one_frame = 7 if not ecu.isotp.fd or ecu.isotp.data_length == 8 else ecu.isotp.data_length - 2
    if isinstance(params, c.Raw) and params.request:
        if params.request[0] not in FUNCTIONAL_RAW_SERVICES:
            problems.add("params.request", f"service 0x{params.request[0]:02X} is not a read: functional raw "
                                           f"requests may only read")
        elif len(params.request) > one_frame:
            problems.add("params.request", f"a functional request is one frame: at most {one_frame} bytes")
    if isinstance(params, c.Obd) and params.supported:
        problems.add("params.supported", "the supported-PID walk is physical only: leave out supported "
                                         "or send the command physically")
    if isinstance(params, c.ReadData):
        fixed = sum(1 for d in params.dids if d.length is not None)
        if 1 + 2 * fixed > one_frame:
            problems.add("params.data", f"a functional request is one frame: at most {(one_frame - 1) // 2} "
                                        f"DIDs of known length at once")


def _timestamp(value: Any) -> float:
    try:
        return parse_rfc3339(text(max_len=64)(value))
    except ValueError as err:
        raise InvalidValueError(str(err)) from None


def parse_params(name: str, p: Node, ecu: EcuConfig) -> c.Params:
    """The typed params of command `name`; problems go to p.problems with paths under `params`."""
    parser = _PARSERS[name]
    params = parser(p, ecu)
    takes = [param.name for param in CATALOG[name].params]
    for key in [k for k in p.data if k not in takes]:
        p.raw(key)
        p.problems.add(f"params.{key}", f"unknown key ({name} takes {', '.join(takes) or 'no params'})")
    p.finish()
    return params


def did_spec(ecu: EcuConfig) -> Callable[[Any], DidSpec]:
    """A converter from a DID name or "0xNNNN" to the component's DidSpec (an anonymous one for an id the
    config does not declare), for commands and collection plans alike."""
    def convert(value: Any) -> DidSpec:
        known = ", ".join(d.name for d in ecu.dids) or "none"
        if isinstance(value, str) and value.lower().startswith("0x"):
            try:
                did = int(value, 16)
            except ValueError:
                did = -1
            if not 0 <= did <= 0xFFFF:
                raise InvalidValueError(f"{value!r} is neither a DID id (0x0000..0xFFFF) nor a DID name "
                                        f"(known: {known})")
            return ecu.did_by_id(did) or codecs.anonymous(did)
        if isinstance(value, str):
            spec = ecu.did_by_name(value)
            if spec is None:
                hint = f"; a DID id is written 0x{value}" if re.fullmatch(r"[0-9A-Fa-f]{4}", value) else ""
                raise InvalidValueError(f"{ecu.name} has no DID named {shown(value)} (known: {known}){hint}")
            return spec
        raise InvalidValueError(f"expected a DID name or \"0xNNNN\", got {describe(value)}")

    return convert


def _read_data(p: Node, ecu: EcuConfig) -> c.ReadData:
    raw = p.raw("data")
    if raw is None:
        p.problems.add("params.data", "required field is missing")
        return c.ReadData(())
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        p.problems.add("params.data", "name at least one DID")
    where = (lambda i: f"data[{i}]") if isinstance(raw, list) else (lambda i: "data")
    dids = [p.convert(where(i), item, did_spec(ecu)) for i, item in enumerate(items)]
    return c.ReadData(tuple(d for d in dids if d is not None))


def _write_data(p: Node, ecu: EcuConfig) -> c.WriteData:
    did = p.get("data", did_spec(ecu))
    if not p.has("value"):
        p.problems.add("params.value", "required field is missing")
    value = p.raw("value")
    payload = b""
    if did is not None and p.has("value"):
        try:
            payload = codecs.encode(did, value)
        except ValueError as err:
            p.problems.add("params.value", f"not a valid value for {did.name}: {err}")
    return c.WriteData(did=did, payload=payload)


def _read_faults(p: Node, ecu: EcuConfig) -> c.ReadFaults:
    return c.ReadFaults(
        status_mask=p.get("status_mask", integer(0, 0xFF, "a status mask byte"), 0xFF),
        snapshots=p.get("snapshots", boolean, False),
        extended=p.get("extended", boolean, False),
    )


def _dtc_group(value: Any) -> int:
    if isinstance(value, str) and value[:1].upper() in "PCBU" and not value.lower().startswith("0x"):
        try:
            return parse_code(value)
        except ValueError:
            raise InvalidValueError(f"{shown(value)} is not a J2012 code like P0301 or P0301-1A") from None
    try:
        return integer(0, 0xFFFFFF, "a 24-bit DTC group")(value)
    except InvalidValueError:
        raise InvalidValueError(
            f"expected a DTC code like P0301 or a 24-bit group like \"0xFFFFFF\", got {describe(value)}") from None


def _clear_faults(p: Node, ecu: EcuConfig) -> c.ClearFaults:
    return c.ClearFaults(group=p.get("group", _dtc_group, 0xFFFFFF))


def _named_byte(names: dict[str, int], what: str) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, str) and value in names:
            return names[value]
        if isinstance(value, str) and value.lower().startswith("0x"):
            return integer(1, 0x7F, what)(value)
        raise InvalidValueError(f"expected one of {', '.join(names)} or \"0xNN\", got {describe(value)}")

    return convert


def _set_session(p: Node, ecu: EcuConfig) -> c.SetSession:
    session = p.get("session", _named_byte(SESSIONS, "a session (0x01..0x7F)"))
    names = {v: k for k, v in SESSIONS.items()}
    return c.SetSession(session=session, name=names.get(session, f"0x{(session or 0):02X}"))


def _reset(p: Node, ecu: EcuConfig) -> c.Reset:
    return c.Reset(reset_type=p.get("type", _named_byte(RESETS, "a reset type (0x01..0x7F)")))


def _security_access(p: Node, ecu: EcuConfig) -> c.SecurityAccess:
    levels = {s.level for s in ecu.security}

    def convert(value: Any) -> int:
        level = integer(1, 0x7D, "a security level")(value)
        if level not in levels:
            known = ", ".join(str(x) for x in sorted(levels)) or "none"
            raise InvalidValueError(f"{ecu.name} has no key algorithm for level {level} (configured: {known})")
        return level

    return c.SecurityAccess(level=p.get("level", convert))


def _operation(p: Node, ecu: EcuConfig) -> c.Operation:
    def routine(value: Any) -> int:
        if isinstance(value, str) and not value.lower().startswith("0x"):
            match = next((r for r in ecu.routines if r.name == value), None)
            if match is None:
                known = ", ".join(r.name for r in ecu.routines) or "none"
                raise InvalidValueError(f"{ecu.name} has no routine named {shown(value)} (known: {known})")
            return match.id
        return integer(0, 0xFFFF, "a 16-bit routine id")(value)

    action = p.get("action", _choice_of(ACTIONS))
    return c.Operation(routine_id=p.get("routine", routine), action=action,
                       data=p.get("data", hex_bytes, b""))


def _choice_of(names: dict[str, int]) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if not isinstance(value, str) or value not in names:  # a list or an object is not hashable
            raise InvalidValueError(f"expected one of {', '.join(names)}, got {describe(value)}")
        return names[value]

    return convert


def _io_control(p: Node, ecu: EcuConfig) -> c.IoControl:
    did = p.get("data", did_spec(ecu))
    control = p.get("control", _choice_of(IO_CONTROLS))
    payload = b""
    if control == IO_CONTROLS["adjust"]:
        if not p.has("value"):
            p.problems.add("params.value", "required when control is adjust")
        elif did is not None:
            try:
                payload = codecs.encode(did, p.raw("value"))
            except ValueError as err:
                p.problems.add("params.value", f"not a valid value for {did.name}: {err}")
    elif p.has("value"):
        p.raw("value")
        p.problems.add("params.value", "only used with control: adjust")
    return c.IoControl(did=did, control=control, payload=payload)


def _tester_present(p: Node, ecu: EcuConfig) -> c.TesterPresent:
    return c.TesterPresent()


def _raw(p: Node, ecu: EcuConfig) -> c.Raw:
    request = p.get("request", hex_bytes)
    if request is not None and not request:
        p.problems.add("params.request", "must hold at least the service id byte")
    return c.Raw(request=request)


def _obd(p: Node, ecu: EcuConfig) -> c.Obd:
    def one_of(names: tuple[str, ...] | dict[str, object], what: str) -> Callable[[Any], str]:
        def convert(value: Any) -> str:
            if value not in names:
                raise InvalidValueError(f"expected {what}: one of {', '.join(names)}, got {describe(value)}")
            return value

        return convert

    def listed(key: str, convert: Callable[[Any], Any]) -> tuple[Any, ...]:
        raw = p.raw(key)
        items = raw if isinstance(raw, list) else [] if raw is None else [raw]
        where = (lambda i: f"{key}[{i}]") if isinstance(raw, list) else (lambda i: key)
        values = [v for i, item in enumerate(items) if (v := p.convert(where(i), item, convert)) is not None]
        if len(set(values)) != len(values):
            p.problems.add(f"params.{key}", "names an item twice")
        return tuple(values)

    params = c.Obd(pids=listed("pids", obd.parse_pid), supported=p.get("supported", boolean, False),
                   info=listed("info", one_of(obd.INFO_TYPES, "an info type")),
                   dtcs=listed("dtcs", one_of(tuple(obd.DTC_SERVICES), "a DTC list")))
    if len(params.pids) > obd.MAX_PIDS_PER_REQUEST:
        p.problems.add("params.pids", f"at most {obd.MAX_PIDS_PER_REQUEST} PIDs per request (older ECUs refuse more)")
    elif len(params.pids) > 1 and any(x not in obd.PIDS for x in params.pids):
        p.problems.add("params.pids", "a PID this agent cannot decode (no known length) must be asked alone")
    if not (params.pids or params.supported or params.info or params.dtcs):
        p.problems.add("params", "ask for at least one of pids, supported, info, dtcs")
    return params


_PARSERS: dict[str, Callable[[Node, EcuConfig], c.Params]] = {
    "read_data": _read_data, "write_data": _write_data, "read_faults": _read_faults,
    "clear_faults": _clear_faults, "set_session": _set_session, "reset": _reset,
    "security_access": _security_access, "operation": _operation, "io_control": _io_control,
    "tester_present": _tester_present, "raw": _raw, "obd": _obd,
}
