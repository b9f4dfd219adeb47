"""The audit trail: who ran which mutating command on the vehicle, with what, when, and how it ended.

Each such command gets a `started` record, fsynced before it runs (no record, no run), and a
`finished` record with its outcome (also after a restart, for a command the stop interrupted).
Both go to the audit log file in the state dir and, as `audit` Events, through the outbox to the
backend. "Who" is the key id that signed the command, or `unsigned`: MQTT does not tell a
subscriber which broker account published a message, so the agent cannot name one.
"""

from __future__ import annotations

import logging
import os
import pwd
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent.config.model import AgentConfig
from agent.errors import AgentError
from agent.fleet.topics import Topics
from agent.policy.mutating import is_mutating
from agent.store.audit import AuditLog, Damage
from agent.store.sqlite import Batch, Entry, Outgoing
from agent.wire import messages as m
from agent.wire.command import Command, Result, command_fields
from agent.wire.timefmt import format_rfc3339

log = logging.getLogger(__name__)

UNSIGNED = "unsigned"
LOCAL = "local"  # run on the device with `sovd-edge uds`, not through MQTT


class AuditUnavailableError(AgentError, OSError):
    """The `started` record could not be written: the command must not run."""


class AuditTrail:
    """Writes the records and queues their events; `lookup` finds a command's ledger entry (params, signer)."""

    def __init__(self, config: AgentConfig, topics: Topics, lookup: Callable[[str], Entry | None],
                 on_damage: Callable[[Damage], None] | None = None,
                 on_error: Callable[[], None] | None = None,
                 on_lost: Callable[[str], None] | None = None) -> None:
        audit = config.security.audit
        self.log = AuditLog(config.state_dir, audit.max_bytes, audit.keep, on_lost=on_lost)
        self._topics = topics
        self._lookup = lookup
        self._on_damage = on_damage or (lambda damage: None)
        self._on_error = on_error or (lambda: None)
        # Why the file cannot be written, since the last attempt that failed; None once a record is written
        # again. Mutating commands are refused `storage_unavailable` meanwhile (the service reports it).
        self.trouble: str | None = None

    def open(self, batch: Batch) -> Damage | None:
        """Opens the file; damage left by a power loss is logged, counted, recorded and evented."""
        try:
            damage = self.log.open()
        except OSError as err:  # mutating commands are refused until it can be written (see `started`)
            self._on_error()
            self.trouble = str(err)
            log.error("the audit log cannot be opened: %s", err, extra={"file": str(self.log.path)})
            return None
        if damage is None:
            return None
        now = time.time()
        log.error("the audit log's last line was damaged (%s, %d bytes), probably by a power loss; kept as it is",
                  damage.kind, damage.bytes, extra={"file": damage.file})
        self._on_damage(damage)
        fields = {"damage": damage.kind, "bytes": damage.bytes, "file": self.log.path.name}
        self._write({"at": format_rfc3339(now), "phase": "damaged", **fields}, must=False)
        batch.publish(Outgoing(self._topics.events, m.encode(m.event_message("audit_log_damaged", now, **fields))))
        return damage

    def close(self) -> None:
        self.log.close()

    def started(self, command: Command, batch: Batch) -> None:
        """Before a mutating command runs: its record is on the disk, its event in `batch` (raises if not written)."""
        if not is_mutating(command.command):
            return
        entry = self._lookup(command.id)
        params = entry.body.get("params", {}) if entry is not None else {}
        self._record(batch, time.time(), {
            "phase": "started", "id": command.id, "who": _who(entry), "component": command.component,
            "command": command.command, "params": params}, must=True)

    def finished(self, entry: Entry, result: Result, batch: Batch) -> None:
        """The outcome of a mutating command that started (a failure to write it is logged, never raised)."""
        if entry.state != "started" or not is_mutating(result.command):
            return
        self._record(batch, result.finished_at, _finished(entry.id, _who(entry), result), must=False)

    def _record(self, batch: Batch, at: float, record: dict[str, Any], must: bool) -> None:
        self._write({"at": format_rfc3339(at), **record}, must)
        batch.publish(Outgoing(self._topics.events, m.encode(m.event_message("audit", at, **record))))

    def _write(self, record: dict[str, Any], must: bool) -> None:
        try:
            self.log.append(record)
        except OSError as err:
            self._on_error()
            self.trouble = str(err)
            log.error("audit record not written: %s", err, extra={
                **command_fields(str(record.get("id", "")), record.get("component"), record.get("command")),
                "phase": record.get("phase"), "file": str(self.log.path)})
            if must:
                raise AuditUnavailableError(f"the audit log cannot be written: {err}") from err
            return
        if self.trouble is not None:
            log.warning("the audit log takes records again", extra={"file": str(self.log.path)})
            self.trouble = None


class LocalAudit:
    """The audit records of `sovd-edge uds` (a command run on the device itself, not through the daemon):
    the same file and record shapes, `who` "local" with the OS user; no Events (no broker, no outbox)."""

    def __init__(self, config: AgentConfig) -> None:
        audit = config.security.audit
        self.log = AuditLog(config.state_dir, audit.max_bytes, audit.keep)
        # The id of a `started` record being written: a signal during its fsync leaves the caller without the
        # return value, yet the record is on disk and its end must follow (at worst an end without a start).
        self.pending: str | None = None

    def started(self, component: str, command: str, params: dict[str, Any]) -> str:
        """Writes the `started` record (OSError when it cannot: the command must not run); returns its id."""
        command_id = f"local-{uuid.uuid4()}"
        self.log.open()
        self.pending = command_id
        try:
            self.log.append({"at": format_rfc3339(time.time()), "phase": "started", "id": command_id, "who": LOCAL,
                             "user": _os_user(), "component": component, "command": command, "params": params})
        except OSError:
            self.pending = None
            raise
        return command_id

    def finished(self, command_id: str, result: Result) -> None:
        """The outcome; a failure to write it is logged (the command has run), never raised."""
        try:
            self.log.append({"at": format_rfc3339(result.finished_at), **_finished(command_id, LOCAL, result),
                             "user": _os_user()})
        except OSError as err:
            log.error("audit record of the outcome not written: %s", err, extra={
                **command_fields(command_id, result.component, result.command), "file": str(self.log.path)})
        finally:
            self.log.close()


def _finished(command_id: str, who: str, result: Result) -> dict[str, Any]:
    record: dict[str, Any] = {"phase": "finished", "id": command_id, "who": who, "component": result.component,
                              "command": result.command, "status": str(result.status)}
    if result.outcome.error is not None:
        record["error"] = {"code": str(result.outcome.error.code), "message": result.outcome.error.message}
    if result.duration_ms is not None:
        record["duration_ms"] = result.duration_ms
    return record


def _os_user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def _who(entry: Entry | None) -> str:
    return entry.signer if entry is not None and entry.signer else UNSIGNED
