"""Flow control of commands: a command whose component queue is full waits, recorded but not yet
acknowledged, instead of being refused `busy`.

The agent announces a Receive Maximum (MQTT 5) and holds the PUBACK of a waiting command until its
component has room. The broker sends no more than Receive Maximum unacknowledged commands, so a
backlog queued at the broker while the vehicle was away is delivered as fast as the agent drains it.
Waiting commands are already in the ledger as `queued`: after a crash they run from there, and the
broker's redelivery of one is recognised as such.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agent.fleet.packets import Incoming
from agent.policy.admission import Admission
from agent.store.sqlite import Entry
from agent.wire.command import Command, command_fields

log = logging.getLogger(__name__)


@dataclass
class Waiting:
    item: Incoming | None  # the message whose PUBACK is held (None: recovered from the ledger at start)
    command: Command
    entry: Entry


class Parking:
    """Commands waiting for room in their component's queue, in arrival order; at most `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiting: deque[Waiting] = deque()
        self.parked_total = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def has_room(self) -> bool:
        return len(self._waiting) < self.limit

    def holds(self, component: str) -> bool:
        """Commands of `component` are waiting: a newer one must wait behind them (arrival order)."""
        return any(w.command.component == component for w in self._waiting)

    def park(self, item: Incoming | None, command: Command, entry: Entry) -> None:
        # Only what the PUBACK and the hand-over need stays in memory; the command is in the ledger.
        self._waiting.append(Waiting(dataclasses.replace(item, payload=b"") if item is not None else None, command,
                                     dataclasses.replace(entry, body={})))
        self.parked_total += 1
        fields = {**command_fields(command.id, command.component, command.command), "waiting": len(self._waiting)}
        if item is None:
            log.debug("command recovered from the ledger waits for its turn", extra=fields)
        elif len(self._waiting) == 1:  # one line when waiting starts, not one per command
            log.info("component queue full: commands wait, their PUBACKs held", extra=fields)
        else:
            log.debug("command waits, its PUBACK held", extra=fields)

    def forget(self, command_id: str) -> None:
        """No longer waiting (its ledger row could not be written, so it is answered at once instead)."""
        self._waiting = deque(w for w in self._waiting if w.command.id != command_id)

    def rebind(self, command_id: str, item: Incoming) -> bool:
        """The broker redelivered a waiting command (after a reconnect): its PUBACK is now owed on the new
        message. True when `command_id` is waiting."""
        for waiting in self._waiting:
            if waiting.command.id == command_id:
                waiting.item = dataclasses.replace(item, payload=b"")
                return True
        return False

    def release(self, check: Callable[[Command, int], Admission], submit: Callable[[Command, Entry], None],
                ack: Callable[[Incoming], None]) -> int:
        """Submits every waiting command whose component has room (oldest first), acknowledging each;
        returns how many were released."""
        released = 0
        blocked: set[str] = set()
        for waiting in list(self._waiting):
            component = waiting.command.component
            if component in blocked or check(waiting.command, 0) is not Admission.QUEUED:
                blocked.add(component)  # keeps the order: nothing newer of this component overtakes
                continue
            # off the list before it is handed over: should `submit` or `ack` raise, what was handed over
            # already is never handed over a second time by the next release (it would run twice)
            self._waiting = deque(w for w in self._waiting if w is not waiting)
            # it is in the ledger: its PUBACK is owed even when handing it over raised (one never sent holds
            # one of the broker's Receive Maximum slots until the connection drops)
            try:
                submit(waiting.command, waiting.entry)
            finally:
                if waiting.item is not None:
                    ack(waiting.item)
            released += 1
        return released
