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

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    def state(self, component: str) -> str:
        return f"{self.base}/state/{component}"

    def plans(self, name: str) -> str:
        return f"{self.base}/plans/{name}"

    @property
    def plans_filter(self) -> str:
        """The subscription that takes every plan of this vehicle."""
        return f"{self.base}/plans/+"

    def plan_name(self, topic: str) -> str | None:
        """The plan name of a `plans/{name}` topic, else None."""
        head = f"{self.base}/plans/"
        if topic.startswith(head) and "/" not in topic[len(head):] and len(topic) > len(head):
            return topic[len(head):]
        return None

    def reply_problem(self, topic: str) -> str | None:
        """Why `topic` may not be a reply topic (one of this vehicle's own topics), or None."""
        own = (self.commands, self.status, self.events, self.telemetry)
        if topic in own:
            return f"it is this vehicle's own {topic.rsplit('/', 1)[1]} topic"
        for folder in ("plans", "state"):
            if topic == f"{self.base}/{folder}" or topic.startswith(f"{self.base}/{folder}/"):
                return f"it is under this vehicle's own {folder} topics"
        return None


def is_publishable(topic: str) -> bool:
    """A topic one may publish to: non-empty, no wildcards, nothing a broker refuses as malformed (a
    control character drops the connection, and the outbox would resend it forever), at most 65535 bytes."""
    return topic_name_problem(topic) is None
