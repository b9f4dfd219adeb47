"""Every protocol v1 message the agent sends, built here and nowhere else: Responses (final, accepted,
refusals, chunks), Status and Events, and their encoding. Pure."""

from __future__ import annotations

import json
import time
from typing import Any

from agent import __version__
from agent.wire.command import ErrorCode, Outcome, Result, Status
from agent.wire.dtc import format_code, status_dict
from agent.wire.timefmt import format_rfc3339


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
    message["received_at"] = format_rfc3339(result.received_at)
    if result.started_at is not None:
        message["started_at"] = format_rfc3339(result.started_at)
    message["finished_at"] = format_rfc3339(result.finished_at)
    if result.duration_ms is not None:
        message["duration_ms"] = result.duration_ms
    if duplicate:
        message["duplicate"] = True
    return message


def accepted_message(command_id: str, component: str, command: str, received_at: float) -> dict[str, Any]:
    """The non-final `accepted` Response: the command is recorded and queued for its component."""
    return {"id": command_id, "component": component, "command": command, "status": "accepted",
            "final": False, "seq": 1, "received_at": format_rfc3339(received_at)}


MAX_ERROR_TEXT = 512  # characters of an error message or detail: never a huge bad value repeated


def refusal_message(command_id: str, body: dict[str, Any], status: Status, code: ErrorCode, message: str,
                    received_at: float, seq: int = 1, **details: Any) -> dict[str, Any]:
    """A final response for a command that never ran (invalid, unknown component, busy, interrupted...)."""
    component = _short_text(body.get("component"))
    command = _short_text(body.get("command"))
    details = {k: clip(v) if isinstance(v, str) else v for k, v in details.items()}
    result = Result(command_id, component, command, Outcome.failure(status, code, clip(message), **details),
                    received_at, None, time.time())
    reply = response_message(result, seq)
    return {k: v for k, v in reply.items() if v != "" or k not in ("component", "command")}


def in_flight_duplicate(command_id: str, body: dict[str, Any], received_at: float) -> dict[str, Any]:
    """The reply to a repeated id still in progress (protocol 1.1): its latest non-final message again,
    `accepted` (nothing else non-final is sent before a command ends), with `"duplicate": true`. Not final:
    the one final follows when the command ends (a final refusal here misled a backend that takes the
    first final as the answer)."""
    component, command = _short_text(body.get("component")), _short_text(body.get("command"))
    reply = {**accepted_message(command_id, component, command, received_at), "duplicate": True}
    return {k: v for k, v in reply.items() if v != "" or k not in ("component", "command")}


def clip(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """`text` cut to `limit` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... (cut: {len(text)} characters)"


def _short_text(value: Any) -> str:
    """A component or command name as received, when it is a string of sensible length (else "")."""
    return value if isinstance(value, str) and len(value) <= 128 else ""


def status_message(state: str, vehicle: str, components: list[str], since: float) -> dict[str, Any]:
    """The retained Status document; the three below say which `since` each kind carries."""
    return {"state": state, "vehicle": vehicle, "agent_version": __version__, "protocol": 1,
            "components": components, "since": format_rfc3339(since)}


def online_status(vehicle: str, components: list[str], started_at: float) -> dict[str, Any]:
    """`online`, since the agent started."""
    return status_message("online", vehicle, components, started_at)


def offline_status(vehicle: str, components: list[str], stopped_at: float) -> dict[str, Any]:
    """`offline`, published by a clean stop: since the moment the agent began to stop."""
    return status_message("offline", vehicle, components, stopped_at)


def last_will(vehicle: str, components: list[str], started_at: float) -> dict[str, Any]:
    """`offline` as the Last Will: the broker publishes it when the agent vanishes, at a time the agent
    cannot know when it registers the Will, so `since` is the agent's start, as in its online status."""
    return status_message("offline", vehicle, components, started_at)


def event_message(kind: str, at: float, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "at": format_rfc3339(at), **fields}


def clock_mark(synchronized: bool) -> dict[str, Any]:
    """What a message says about its timestamps: nothing while the device clock is synchronized,
    `"clock": "unsynchronized"` while it is not (they may be far off, e.g. in 1970)."""
    return {} if synchronized else {"clock": "unsynchronized"}


FAULT_EVIDENCE = ("snapshots", "extended_data", "snapshots_error", "extended_data_error")


def fault_changed(component: str, dtc: int, change: str, status: int, previous: int, at: float,
                  text: str | None = None, evidence: dict[str, Any] | None = None,
                  status_mask: int = 0xFF) -> dict[str, Any]:
    """The `fault_changed` Event: `change` is `new`, `status` or `cleared`; `status` and `previous` are
    the status bytes after and before (0x00: not stored). `evidence` is the reading's fault entry, whose
    snapshot and extended data (or their errors) are carried over; `status_mask` is given when the
    reading was masked (then the bits outside it are the last known ones)."""
    event = event_message("fault_changed", at, component=component, code=format_code(dtc),
                          failure_type=f"0x{dtc & 0xFF:02X}", dtc=f"0x{dtc:06X}", change=change,
                          status=status_dict(status), previous=status_dict(previous))
    if text is not None:
        event["text"] = text
    for key in FAULT_EVIDENCE:
        if evidence is not None and key in evidence:
            event[key] = evidence[key]
    if status_mask != 0xFF:
        event["status_mask"] = f"0x{status_mask:02X}"
    return event


def encode(message: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, as every message goes on the wire."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


MARK_BYTES = len(encode(clock_mark(False)))  # at least what the clock mark adds to a message


def encode_final(final: dict[str, Any], max_bytes: int) -> list[tuple[dict[str, Any], bytes]]:
    """`split_result`'s messages with their encodings, each message encoded once."""
    whole = encode(final)
    if len(whole) <= max_bytes or "result" not in final:
        return [(final, whole)]
    return [(message, encode(message)) for message in split_result(final, max_bytes)]


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


# ---- collection (revision 1.1) -----------------------------------------------------------------

def sample(component: str, data: str, value: Any, at: float | str) -> dict[str, Any]:
    """One sample of a telemetry batch (`at` in epoch seconds, or already formatted)."""
    stamp = at if isinstance(at, str) else format_rfc3339(at)
    return {"component": component, "data": data, "value": value, "at": stamp}


def telemetry_message(plan: str, version: int, seq: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A telemetry batch: the samples one plan collected since its previous batch."""
    return {"plan": plan, "version": version, "seq": seq, "samples": samples}


def trim_state(payload: bytes, max_bytes: int) -> bytes | None:
    """An encoded state message made to fit `max_bytes`: its largest values left out first and named in
    `truncated`; None when even without any value it does not fit (or `payload` is not a state)."""
    if len(payload) <= max_bytes:
        return payload
    try:
        message = json.loads(payload)
        values = message["values"]
        sizes = {name: len(encode({name: value})) for name, value in values.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    left_out: list[str] = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        del values[name]
        left_out.append(name)
        message["truncated"] = left_out
        if len(encoded := encode(message)) <= max_bytes:
            return encoded
    return None


def state_message(component: str, at: float, values: dict[str, tuple[Any, float]],
                  faults: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The retained last-known state of one component: each value with the time it was read."""
    shown = {name: {"value": v, "at": format_rfc3339(t)} for name, (v, t) in values.items()}
    message: dict[str, Any] = {"component": component, "at": format_rfc3339(at), "values": shown}
    if faults is not None:
        message["faults"] = [{"code": f.get("code"), "status": f.get("status")} for f in faults]
    return message
