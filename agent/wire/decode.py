"""Takes a command payload off the wire: size, UTF-8 and JSON checks before any field is read. Pure."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent.wire.command import COMMAND_ID

MAX_COMMAND_BYTES = 64 * 1024


@dataclass(frozen=True)
class Undecodable:
    """A payload that is not a command object; `command_id` is set when an id could still be read."""

    reason: str
    field: str
    command_id: str | None


def decode_command(payload: bytes) -> dict[str, Any] | Undecodable:
    """The JSON object of a command payload, or why it is not one (with the id, if readable)."""
    if len(payload) > MAX_COMMAND_BYTES:
        return Undecodable(f"payload is {len(payload)} bytes, the limit is {MAX_COMMAND_BYTES}", "",
                           _salvage_id(payload) if len(payload) <= 16 * MAX_COMMAND_BYTES else None)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        return Undecodable(f"payload is not UTF-8 (byte {err.start})", "", None)
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        return Undecodable(f"payload is not JSON: {getattr(err, 'msg', err)}", "", None)
    if not isinstance(body, dict):
        return Undecodable(f"payload is a JSON {type(body).__name__}, not an object", "", None)
    return body


def _salvage_id(payload: bytes) -> str | None:
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return readable_id(body) if isinstance(body, dict) else None


def readable_id(body: dict[str, Any]) -> str | None:
    """The command's id when it is a valid one, else None."""
    command_id = body.get("id")
    return command_id if isinstance(command_id, str) and COMMAND_ID.fullmatch(command_id) else None
