"""Whether a command may run on its component, and the refusal a command gets when it may not. Pure."""

from __future__ import annotations

import enum

from agent.config.model import EcuConfig
from agent.wire.command import Command, ErrorCode, Outcome, Status


def permitted(ecu: EcuConfig, command: Command) -> bool:
    """The component's `allow` list admits this command."""
    return allows(ecu, command.command)


def allows(ecu: EcuConfig, command: str) -> bool:
    """The component's `allow` list admits the command named `command` (checked before its params are read)."""
    return command in ecu.allow


class Admission(enum.Enum):
    QUEUED = "queued"
    BUSY = "busy"
    NOT_PERMITTED = "not_permitted"
    UNKNOWN_COMPONENT = "unknown_component"
    STOPPING = "stopping"

    def refusal(self, component: str, command: str) -> Outcome:
        """The final outcome a command gets when it was not queued."""
        if self is Admission.UNKNOWN_COMPONENT:
            return Outcome.failure(Status.REJECTED, ErrorCode.UNKNOWN_COMPONENT,
                                   f"no component named {component!r}")
        if self is Admission.NOT_PERMITTED:
            return Outcome.failure(Status.REJECTED, ErrorCode.NOT_PERMITTED,
                                   f"{command} is not enabled for {component} (config: allow)")
        why = "the agent is shutting down" if self is Admission.STOPPING else f"{component}'s queue is full"
        return Outcome.failure(Status.REJECTED, ErrorCode.BUSY, why)
