"""The command vocabulary of protocol v1 as frozen types: what flows from intake to workers to outbox."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

from agent.config.model import DidSpec

# The one definition of a valid command id (protocol v1: 1-128 of A-Z a-z 0-9 . _ : -).
COMMAND_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class Status(enum.StrEnum):
    ACCEPTED = "accepted"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"
    TIMEOUT = "timeout"
    EXPIRED = "expired"
    INTERRUPTED = "interrupted"

    @property
    def final(self) -> bool:
        return self not in (Status.ACCEPTED, Status.RUNNING)


class ErrorCode(enum.StrEnum):
    NEGATIVE_RESPONSE = "negative_response"
    BUS_ERROR = "bus_error"
    UNKNOWN_COMPONENT = "unknown_component"
    INTERNAL = "internal"
    INVALID_COMMAND = "invalid_command"
    NOT_PERMITTED = "not_permitted"
    BUSY = "busy"
    DUPLICATE_IN_FLIGHT = "duplicate_in_flight"
    TIMEOUT = "timeout"
    EXPIRED = "expired"
    INTERRUPTED = "interrupted"
    CLOCK_UNSYNCHRONIZED = "clock_unsynchronized"


# ---- per-command parameters (validated, resolved against the component's config) -----------------

@dataclass(frozen=True)
class ReadData:
    dids: tuple[DidSpec, ...]


@dataclass(frozen=True)
class WriteData:
    did: DidSpec
    payload: bytes


@dataclass(frozen=True)
class ReadFaults:
    status_mask: int = 0xFF
    snapshots: bool = False
    extended: bool = False


@dataclass(frozen=True)
class ClearFaults:
    group: int = 0xFFFFFF


@dataclass(frozen=True)
class SetSession:
    session: int
    name: str


@dataclass(frozen=True)
class Reset:
    reset_type: int


@dataclass(frozen=True)
class SecurityAccess:
    level: int


@dataclass(frozen=True)
class Operation:
    routine_id: int
    action: int  # 1 start, 2 stop, 3 results
    data: bytes = b""


@dataclass(frozen=True)
class IoControl:
    did: DidSpec
    control: int  # 0 return_control, 1 reset_default, 2 freeze, 3 adjust
    payload: bytes = b""


@dataclass(frozen=True)
class TesterPresent:
    pass


@dataclass(frozen=True)
class Raw:
    request: bytes


Params = (ReadData | WriteData | ReadFaults | ClearFaults | SetSession | Reset | SecurityAccess
          | Operation | IoControl | TesterPresent | Raw)


@dataclass(frozen=True)
class Command:
    """A validated command for one component. `received_at`/`expires_at` are epoch seconds."""

    id: str
    component: str
    command: str
    params: Params
    received_at: float
    timeout_ms: int | None = None
    expires_at: float | None = None
    reply_to: str | None = None
    correlation_data: bytes | None = None
    deadline: float | None = None  # time.monotonic() instant from an MQTT 5 Message Expiry (in-process only)


@dataclass(frozen=True)
class Error:
    code: ErrorCode
    message: str
    details: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"code": str(self.code), "message": self.message, **dict(self.details)}


@dataclass(frozen=True)
class Outcome:
    """What executing a command produced, before timestamps are attached."""

    status: Status
    result: dict[str, Any] | None = None
    error: Error | None = None

    @staticmethod
    def completed(result: dict[str, Any] | None = None) -> Outcome:
        return Outcome(Status.COMPLETED, result=result or {})

    @staticmethod
    def failure(status: Status, code: ErrorCode, message: str, **details: Any) -> Outcome:
        return Outcome(status, error=Error(code, message, tuple(details.items())))


@dataclass(frozen=True)
class Result:
    """A final outcome of a command, with the timing the response reports."""

    command_id: str
    component: str
    command: str
    outcome: Outcome
    received_at: float
    started_at: float | None
    finished_at: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> Status:
        return self.outcome.status

    @property
    def duration_ms(self) -> int | None:
        if self.started_at is None:
            return None
        return round((self.finished_at - self.started_at) * 1000)


def command_fields(command_id: str, component: object, command: object) -> dict[str, str]:
    """The `extra=` of every log line about a command: its id, component and command (they may be unvalidated)."""
    return {"command_id": command_id, "component": component if isinstance(component, str) else "",
            "command": command if isinstance(command, str) else ""}
