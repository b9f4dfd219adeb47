"""What crosses the link for intake and the outbox: a received command, a PUBLISH's size, the cuts it causes.

Apart from link.py so that its users (intake, outbox, lane) need not import paho."""

from __future__ import annotations

from dataclasses import dataclass

from agent.errors import AgentError

# DISCONNECT reasons a broker gives when it cannot take what we sent (malformed, protocol error, too large):
# Mosquitto answers a message over its `message_size_limit` this way; a resend would do it again (cuts.py).
CUT_FOR_A_MESSAGE = frozenset({0x81, 0x82, 0x95})


class PacketTooLargeError(AgentError, ValueError):
    """A message larger than the broker's Maximum Packet Size (from CONNACK): sending it would only
    make the broker drop the connection."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(f"a {size}-byte packet is larger than the broker's maximum packet size {limit}")


def packet_size(topic: str, payload: bytes, correlation: bytes | None) -> int:
    """Bytes of a QoS 1 PUBLISH packet carrying this message (an upper bound for MQTT 5)."""
    properties = 3 + len(correlation) if correlation is not None else 0
    return 1 + 4 + 2 + len(topic.encode()) + 2 + 4 + properties + len(payload)


@dataclass(frozen=True)
class Incoming:
    """A command message as received, before any validation."""

    payload: bytes
    mid: int
    qos: int
    dup: bool
    received_at: float
    response_topic: str | None = None
    correlation: bytes | None = None
    expiry_interval: int | None = None
    retain: bool = False
    generation: int = 0  # which connection brought it: a PUBACK is only owed on that connection
    received_mono: float = 0.0  # time.monotonic() at receipt: relative expiry does not follow wall-clock steps

