"""Protocol v1 message bodies: decoding commands off the wire; Status, Event and chunked Responses. Pure."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.response import rfc3339

MAX_COMMAND_BYTES = 64 * 1024
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


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
    command_id = body.get("id") if isinstance(body, dict) else None
    return command_id if isinstance(command_id, str) and _ID.fullmatch(command_id) else None


def readable_id(body: dict[str, Any]) -> str | None:
    command_id = body.get("id")
    return command_id if isinstance(command_id, str) and _ID.fullmatch(command_id) else None


def status_message(state: str, vehicle: str, components: list[str], since: float) -> dict[str, Any]:
    return {"state": state, "vehicle": vehicle, "agent_version": __version__, "protocol": 1,
            "components": components, "since": rfc3339(since)}


def event_message(kind: str, at: float, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "at": rfc3339(at), **fields}


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def split_result(final: dict[str, Any], max_bytes: int) -> list[dict[str, Any]]:
    """The messages that carry a final response: itself, or `running` chunks and a closing message.

    When the encoded final message is larger than `max_bytes`, its `result` is serialised to JSON
    text and sent in ordered chunks {"index", "total", "data"} (index from 0); concatenating the
    `data` strings gives the result's JSON. The closing message has the final status without
    `result`, and `"chunks": total`. `seq` runs on from the final message's seq.
    """
    if len(encode(final)) <= max_bytes or "result" not in final:
        return [final]
    text = json.dumps(final["result"], separators=(",", ":"), ensure_ascii=False)
    head = {k: final[k] for k in ("id", "component", "command")}
    overhead = len(encode({**head, "status": "running", "final": False, "seq": 10**9,
                           "chunk": {"index": 10**9, "total": 10**9, "data": ""}}))
    room = max(256, max_bytes - overhead - 64)
    pieces = _split_text(text, room)
    seq = final["seq"]
    messages = [{**head, "status": "running", "final": False, "seq": seq + i,
                 "chunk": {"index": i, "total": len(pieces), "data": piece}} for i, piece in enumerate(pieces)]
    closing = {k: v for k, v in final.items() if k != "result"}
    closing.update(seq=seq + len(pieces), chunks=len(pieces))
    return [*messages, closing]


def _split_text(text: str, room: int) -> list[str]:
    """Pieces whose JSON-escaped UTF-8 size stays within `room` bytes."""
    pieces: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + room)
        while end > start + 1 and len(json.dumps(text[start:end], ensure_ascii=False).encode()) > room:
            end = start + max(1, (end - start) * 3 // 4)
        pieces.append(text[start:end])
        start = end
    return pieces
