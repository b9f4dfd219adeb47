"""Every MQTT topic the protocol uses is built here and nowhere else. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from agent.wire.command import topic_name_problem


@dataclass(frozen=True)
class Topics:
    prefix: str
    vehicle: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.vehicle}"

    @property
    def commands(self) -> str:
        return f"{self.base}/commands"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    def responses(self, command_id: str) -> str:
        return f"{self.base}/responses/{command_id}"


def is_publishable(topic: str) -> bool:
    """A topic one may publish to: non-empty, no wildcards, nothing a broker refuses as malformed (a
    control character drops the connection, and the outbox would resend it forever), at most 65535 bytes."""
    return topic_name_problem(topic) is None
