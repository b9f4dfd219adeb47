"""Whether a command may run on its component, and the refusal a command gets when it may not. Pure.

Three layers of rules, all from the component's config:
- the command must be in `allow`;
- per identifier: `write_data` only to DIDs marked `writable`; `operation` and `io_control` only on
  declared routines and DIDs, unless `allow_undeclared_ids: true`;
- `raw` carries the policy of the service inside it: a service that has a command of its own
  (0x10 set_session, 0x11 reset, 0x14 clear_faults, 0x27 security_access, 0x2E write_data,
  0x2F io_control, 0x31 operation) needs that command allowed too, and the per-identifier rules of
  that command; every other service must be listed in `raw_services`.
A refusal names the rule; nothing of a refused command reaches the bus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from agent.config.model import COMMAND_OF_SERVICE, EcuConfig
from agent.wire import command as c
from agent.wire.command import Command, ErrorCode, Outcome, Status


def refusal_reason(ecu: EcuConfig, command: Command) -> str | None:
    """None when the component's policy admits the command; else the rule that refuses it."""
    if command.command not in ecu.allow:
        return f"{command.command} is not enabled for {ecu.name} (config: allow)"
    p = command.params
    if isinstance(p, c.WriteData):
        return _writable(ecu, p.did.id)
    if isinstance(p, c.IoControl):
        return _declared_did(ecu, p.did.id)
    if isinstance(p, c.Operation):
        return _declared_routine(ecu, p.routine_id)
    if isinstance(p, c.Raw):
        return _raw(ecu, p.request)
    return None


def allows(ecu: EcuConfig, command: str) -> bool:
    """The component's `allow` list admits the command named `command` (checked before its params are read)."""
    return command in ecu.allow


def _writable(ecu: EcuConfig, did: int) -> str | None:
    spec = ecu.did_by_id(did)
    if spec is None:
        return f"DID 0x{did:04X} is not declared for {ecu.name}, so it is not writable (config: dids[].writable)"
    if not spec.writable:
        return f"DID {spec.name} (0x{did:04X}) is not writable on {ecu.name} (config: dids[].writable)"
    return None


def _declared_did(ecu: EcuConfig, did: int) -> str | None:
    if ecu.did_by_id(did) is None and not ecu.allow_undeclared_ids:
        return f"DID 0x{did:04X} is not declared for {ecu.name} (config: dids, or allow_undeclared_ids)"
    return None


def _declared_routine(ecu: EcuConfig, routine: int) -> str | None:
    if all(r.id != routine for r in ecu.routines) and not ecu.allow_undeclared_ids:
        return f"routine 0x{routine:04X} is not declared for {ecu.name} (config: routines, or allow_undeclared_ids)"
    return None


def _raw(ecu: EcuConfig, request: bytes) -> str | None:
    sid = request[0]
    command = COMMAND_OF_SERVICE.get(sid)
    if command is None:
        if sid not in ecu.raw_services:
            return f"raw service 0x{sid:02X} is not enabled for {ecu.name} (config: raw_services)"
        return None
    if command not in ecu.allow:
        return f"raw service 0x{sid:02X} needs {command} enabled for {ecu.name} too (config: allow)"
    if sid in (0x2E, 0x2F):
        if len(request) < 3:
            return f"raw service 0x{sid:02X} without a DID cannot be checked against {ecu.name}'s DIDs"
        did = int.from_bytes(request[1:3], "big")
        return _writable(ecu, did) if sid == 0x2E else _declared_did(ecu, did)
    if sid == 0x31:
        if len(request) < 4:
            return f"raw service 0x31 without a routine id cannot be checked against {ecu.name}'s routines"
        return _declared_routine(ecu, int.from_bytes(request[2:4], "big"))
    return None


@dataclass(frozen=True, eq=False)
class Admission:
    """What became of a command at the door. The kinds are singletons (compare with `is`), except
    the not-permitted ones that carry the rule: test those with `.kind`."""

    kind: str
    reason: str = ""

    QUEUED: ClassVar[Admission]
    BUSY: ClassVar[Admission]
    NOT_PERMITTED: ClassVar[Admission]
    UNKNOWN_COMPONENT: ClassVar[Admission]
    STOPPING: ClassVar[Admission]

    @staticmethod
    def denied(reason: str) -> Admission:
        """Refused by policy, for the rule given."""
        return Admission("not_permitted", reason)

    def refusal(self, component: str, command: str) -> Outcome:
        """The final outcome a command gets when it was not queued."""
        if self.kind == "unknown_component":
            return Outcome.failure(Status.REJECTED, ErrorCode.UNKNOWN_COMPONENT,
                                   f"no component named {component!r}")
        if self.kind == "not_permitted":
            return Outcome.failure(Status.REJECTED, ErrorCode.NOT_PERMITTED,
                                   self.reason or f"{command} is not enabled for {component} (config: allow)")
        why = "the agent is shutting down" if self.kind == "stopping" else f"{component}'s queue is full"
        return Outcome.failure(Status.REJECTED, ErrorCode.BUSY, why)

    def __repr__(self) -> str:
        return f"Admission.{self.kind.upper()}" + (f"({self.reason!r})" if self.reason else "")


Admission.QUEUED = Admission("queued")
Admission.BUSY = Admission("busy")
Admission.NOT_PERMITTED = Admission("not_permitted")
Admission.UNKNOWN_COMPONENT = Admission("unknown_component")
Admission.STOPPING = Admission("stopping")
