"""The command vocabulary of protocol v1 as frozen types: what flows from intake to workers to outbox."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

from agent.config.model import DidSpec

# The one definition of a valid command id (protocol v1: 1-128 of A-Z a-z 0-9 . _ : -).
COMMAND_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
PHYSICAL, FUNCTIONAL = "physical", "functional"  # a command's `addressing`

# What a topic name to publish to may not hold: wildcards, and what brokers refuse as malformed UTF-8
# (Mosquitto drops the connection of a client that publishes it): NUL and other control characters,
# surrogates and noncharacters.
_NOT_IN_TOPIC = re.compile("[+#\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff]")


def topic_name_problem(topic: str) -> str | None:
    """Why `topic` cannot be published to (a reply topic from a command), or None when it can."""
    if not topic:
        return "an empty topic"
    if topic.startswith("$"):  # MQTT 5 section 4.7.2: the broker's own ($SYS/..., $share/...); brokers refuse it
        return "a leading '$' (such topics are the broker's own)"
    found = _NOT_IN_TOPIC.search(topic)
    if found is not None:
        char = found.group()
        return f"a wildcard {char!r}" if char in "+#" else f"a character brokers refuse (U+{ord(char):04X})"
    if any(ord(c) > 0xFFFF and ord(c) & 0xFFFE == 0xFFFE for c in topic):
        return "a noncharacter brokers refuse"
    if len(topic.encode("utf-8")) > 65535:
        return "more than 65535 bytes"
    return None


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
    STORAGE_UNAVAILABLE = "storage_unavailable"
    TIMEOUT = "timeout"
    EXPIRED = "expired"
    INTERRUPTED = "interrupted"
    UNAUTHENTICATED = "unauthenticated"
    CLOCK_UNSYNCHRONIZED = "clock_unsynchronized"

    @property
    def transient(self) -> bool:
        """A refusal that says "not now" (protocol 1.1): the ledger does not remember it, so the same id
        sent again later is a fresh attempt."""
        return self in TRANSIENT_CODES


class AuthFailure(enum.StrEnum):
    """Why a message failed authentication: `error.reason` of an `unauthenticated` refusal, a metric label."""

    MISSING = "missing"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_ALLOWED = "not_allowed"


TRANSIENT_CODES = frozenset({ErrorCode.BUSY, ErrorCode.STORAGE_UNAVAILABLE, ErrorCode.CLOCK_UNSYNCHRONIZED})


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
class ReadFaultSnapshot:
    """The snapshot records of one DTC, one request (0x19 0x04). Not a command: collection reads the
    snapshots of a fault watch one DTC per job, so that a command runs between them."""

    dtc: int


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


@dataclass(frozen=True)
class Obd:
    """OBD-II reads: service 0x01 PIDs (at most 6), the supported-PID walk, 0x09 info types, DTC lists."""

    pids: tuple[int, ...] = ()
    supported: bool = False
    info: tuple[str, ...] = ()  # names of agent.wire.obd.INFO_TYPES
    dtcs: tuple[str, ...] = ()  # stored, pending, permanent


Params = (ReadData | WriteData | ReadFaults | ReadFaultSnapshot | ClearFaults | SetSession | Reset | SecurityAccess
          | Operation | IoControl | TesterPresent | Raw | Obd)


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
    progress: bool = False  # non-final messages also to a Response Topic / `reply_to` (protocol 1.1)
    addressing: str = PHYSICAL  # FUNCTIONAL: to every ECU on the component's functional id
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
