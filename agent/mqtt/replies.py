"""Builds the Response messages the link sends besides results: accepted, refusals, duplicates. Pure."""

from __future__ import annotations

import time
from typing import Any

from agent.command import ErrorCode, Outcome, Result, Status
from agent.response import response_message, rfc3339


def accepted_message(command_id: str, component: str, command: str, received_at: float) -> dict[str, Any]:
    return {"id": command_id, "component": component, "command": command, "status": "accepted",
            "final": False, "seq": 1, "received_at": rfc3339(received_at)}


def refusal_message(command_id: str, body: dict[str, Any], status: Status, code: ErrorCode, message: str,
                    received_at: float, seq: int = 1, **details: Any) -> dict[str, Any]:
    """A final response for a command that never ran (invalid, unknown component, busy, ...)."""
    component = body.get("component") if isinstance(body.get("component"), str) else ""
    command = body.get("command") if isinstance(body.get("command"), str) else ""
    result = Result(command_id, component, command, Outcome.failure(status, code, message, **details),
                    received_at, None, time.time())
    reply = response_message(result, seq)
    return {k: v for k, v in reply.items() if v != "" or k not in ("component", "command")}


def in_flight_duplicate(command_id: str, body: dict[str, Any], received_at: float) -> dict[str, Any]:
    return refusal_message(command_id, body, Status.REJECTED, ErrorCode.DUPLICATE_IN_FLIGHT,
                           "a command with this id is still in progress; it runs once", received_at)
