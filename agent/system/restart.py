"""Restart recovery: what the ledger held at the last stop. A command started but not finished is reported
`interrupted` (never run again); a queued one is parsed again against the current config and runs, or is
refused with the reason. Part of `Service` (it inherits this and owns the store and the results' path);
kept apart because recovery runs once at start and has its own rules.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.store.sqlite import Entry, StoreError
from agent.wire.command import Command, ErrorCode, Outcome, Result, Status
from agent.wire.parse import InvalidCommandError, UnknownComponentError, parse_command

if TYPE_CHECKING:
    from agent.clock import Clock
    from agent.config.model import AgentConfig
    from agent.store.recovery import Recovery
    from agent.store.sqlite import Store

log = logging.getLogger(__name__)


class RestartRecovery:
    """The ledger's unfinished commands at start: `_recover` returns the ones the intake queues again."""

    # what Service owns and these methods use (set in its constructor)
    config: AgentConfig
    clock: Clock
    store: Store
    store_recovery: Recovery | None
    _finish: Callable[[Entry, Result], None]
    _publish_event: Callable[..., Any]

    def _recover(self) -> list[tuple[Command, Entry]]:
        """Started-but-unfinished commands get `interrupted` (never re-run); queued ones run again."""
        if self.store_recovery is not None:
            recovery = self.store_recovery
            self._publish_event("store_recovered", reason=recovery.reason, detail=recovery.detail,
                                moved_to=list(recovery.moved))
        try:
            interrupted = self.store.entries("started")
        except StoreError as err:
            log.error("cannot read the ledger at start (%s): unfinished commands wait for the next start", err)
            interrupted = []
        for entry in interrupted:
            self._finish(entry, self._never_ran(entry, Outcome.failure(
                Status.INTERRUPTED, ErrorCode.INTERRUPTED,
                "the agent stopped while this command ran; it was not run again")))
        ids = [e.id for e in interrupted]
        self._publish_event("agent_started", interrupted=ids, agent_version=__version__)
        if ids:
            log.warning("%d commands were interrupted by the last stop", len(ids), extra={"ids": ids})
        try:
            queued = self.store.entries("queued")
        except StoreError:
            return []
        return [pair for pair in (self._reparse(e) for e in queued) if pair is not None]

    def _never_ran(self, entry: Entry, outcome: Outcome) -> Result:
        """The result of a recorded command that ends without running, as its final response reports it."""
        return Result(entry.id, str(entry.body.get("component", "")), str(entry.body.get("command", "")),
                      outcome, entry.received_at, None, self.clock.wall())

    def _reparse(self, entry: Entry) -> tuple[Command, Entry] | None:
        try:
            command = parse_command(entry.body, self.config, entry.received_at)
        except (InvalidCommandError, UnknownComponentError) as err:
            self._finish(entry, self._never_ran(entry, refusal_outcome(err)))
            return None
        if entry.expires_at is not None and not self.clock.synchronized():
            self._finish(entry, self._never_ran(entry, Outcome.failure(
                Status.REJECTED, ErrorCode.CLOCK_UNSYNCHRONIZED,
                "not run after the restart: it has an expiry and the device clock is not synchronized, so "
                "whether it expired cannot be judged")))
            return None
        return dataclasses.replace(command, expires_at=entry.expires_at, correlation_data=entry.correlation), entry


def refusal_outcome(err: Exception) -> Outcome:
    if isinstance(err, UnknownComponentError):
        return Outcome.failure(Status.REJECTED, ErrorCode.UNKNOWN_COMPONENT, str(err))
    return Outcome.failure(Status.REJECTED, ErrorCode.INVALID_COMMAND, f"invalid after a config change: {err}")
