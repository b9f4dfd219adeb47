"""Encodes results as protocol v1 Response objects (used by the MQTT outbox and the CLI). Pure."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from agent.command import Result


def rfc3339(epoch: float) -> str:
    """UTC with milliseconds: 2026-11-28T10:00:01.120Z."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def response_message(result: Result, seq: int, duplicate: bool = False) -> dict[str, Any]:
    """The final Response for a result; `seq` is this message's number within the command."""
    outcome = result.outcome
    message: dict[str, Any] = {
        "id": result.command_id,
        "component": result.component,
        "command": result.command,
        "status": str(outcome.status),
        "final": outcome.status.final,
        "seq": seq,
    }
    if outcome.result is not None:
        message["result"] = outcome.result
    if outcome.error is not None:
        message["error"] = outcome.error.as_dict()
    message["received_at"] = rfc3339(result.received_at)
    if result.started_at is not None:
        message["started_at"] = rfc3339(result.started_at)
    message["finished_at"] = rfc3339(result.finished_at)
    if result.duration_ms is not None:
        message["duration_ms"] = result.duration_ms
    if duplicate:
        message["duplicate"] = True
    return message
