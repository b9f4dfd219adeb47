"""Every MQTT topic the protocol uses is built here and nowhere else. Pure."""

from __future__ import annotations

from dataclasses import dataclass


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
    """A topic one may publish to: non-empty, no wildcards, no NUL, at most 65535 bytes."""
    return bool(topic) and not any(c in topic for c in "+#\x00") and len(topic.encode()) <= 65535
