"""A message the broker will not take: its PUBACK reason code named and judged, or a too-large response re-cut.

Apart from outbox.py: decisions about one message, without the pump's threads or the store."""

from __future__ import annotations

import json
from dataclasses import dataclass

from agent.store.sqlite import Outgoing
from agent.wire import messages as m

# PUBACK reason codes (MQTT 5, 3.3.4) and the bounded label values the agent reports them as.
REASONS = {0x80: "unspecified_error", 0x83: "implementation_specific_error", 0x87: "not_authorized",
           0x90: "topic_name_invalid", 0x91: "packet_identifier_in_use", 0x97: "quota_exceeded",
           0x99: "payload_format_invalid", 0x95: "packet_too_large"}
NEVER_PASSES = frozenset({0x87, 0x90, 0x95, 0x99})
QUOTA_EXCEEDED = 0x97
CONNECTION_DROPPED = "connection_dropped"  # not a PUBACK code: the broker cut the link on this message


def reason_name(code: int) -> str:
    return REASONS.get(code, "other")


@dataclass(frozen=True)
class Refusal:
    """A message the broker would not take, reported once it is set aside (a response or event from the
    outbox, or a component's state from the telemetry lane)."""

    message: Outgoing
    reason: str
    code: int | None


def rechunk(message: Outgoing, max_payload: int) -> list[dict] | None:
    """The chunk messages for a final response with a `result`, each within `max_payload`; None if the
    message is not such a response or cannot be made small enough."""
    try:
        body = json.loads(message.payload)
    except ValueError:
        return None
    if not isinstance(body, dict) or "result" not in body or body.get("final") is not True or max_payload < 1024:
        return None
    pieces = m.split_result(body, max_payload)
    if len(pieces) < 2 or any(len(m.encode(p)) > max_payload for p in pieces):
        return None
    return pieces
