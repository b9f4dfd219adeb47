"""What intake decides for one message (Decision), its counters (IntakeStats), and the signature hook's type."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from agent.fleet.packets import Incoming
from agent.store.sqlite import Batch, Entry, Outgoing
from agent.wire import decode
from agent.wire.command import Command

# (incoming, decoded body, publish) -> (body to process, signing key id or None), or None when refused
Authenticate = Callable[[Incoming, dict[str, Any] | decode.Undecodable, Callable[[Outgoing], None]],
                        tuple[dict[str, Any] | decode.Undecodable, str | None] | None]


@dataclasses.dataclass
class IntakeStats:
    invalid: dict[str, int] = dataclasses.field(default_factory=dict)
    duplicates: int = 0
    events_suppressed: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)  # unexpected exceptions, by stage


@dataclasses.dataclass
class Decision:
    """What one message comes to: what to record (its batch), what to run, which finals to count."""

    item: Incoming
    batch: Batch
    command_id: str | None = None
    body: dict[str, Any] = dataclasses.field(default_factory=dict)
    reply_topic: str = ""
    remembered: bool = False  # it writes a ledger row
    messages: list[Outgoing] = dataclasses.field(default_factory=list)  # what it publishes
    finals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    run: tuple[Command, Entry] | None = None
    parked: bool = False  # waits for room in its component's queue, its PUBACK held (fleet/flow.py)
    # A signed command's key id and signed expiry: a final decided at intake keeps its id until then, so
    # that the captured envelope cannot run after a policy change once the id would otherwise be forgotten.
    signer: str | None = None
    signed_until: float | None = None

    def remember(self, entry: Entry) -> None:
        self.batch.add_command(entry)
        self.remembered = True

    def publish(self, message: Outgoing, durable: bool = True) -> None:
        self.batch.publish(message, durable)
        self.messages.append(message)
