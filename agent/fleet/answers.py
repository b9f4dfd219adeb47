"""How intake answers a message it does not run: refusals and other finals decided at intake, invalid-message
events (rate-limited), and the counting and log fields that go with them. A part of Intake."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from agent.clock import Clock
from agent.config.model import AgentConfig
from agent.fleet.decision import Decision, IntakeStats
from agent.fleet.topics import Topics
from agent.policy.admission import Admission
from agent.store.sqlite import Entry, Outgoing, Store
from agent.wire import messages as m
from agent.wire.command import ErrorCode, Status, command_fields
from agent.wire.messages import clip, refusal_message

log = logging.getLogger(__name__)


class Answers:
    """Finals and events decided at intake (Intake sets the attributes below)."""

    _config: AgentConfig
    _store: Store
    _topics: Topics
    _clock: Clock
    _on_rejected: Callable[[str], None]
    _on_error: Callable[[str], None]
    _event_times: list[float]
    _unlogged_invalid: int  # invalid messages past the rate limit since the last one logged
    _seen: dict[str, Decision]
    stats: IntakeStats

    def _forget_seen(self, d: Decision) -> None:
        if d.command_id is not None and self._seen.get(d.command_id) is d:
            del self._seen[d.command_id]

    # ---- finals --------------------------------------------------------------------------------
    def _reject_invalid(self, d: Decision, reason: str, field: str, remember: bool = True) -> None:
        assert d.command_id is not None
        self._count_invalid("invalid_command")
        message = refusal_message(d.command_id, d.body, Status.REJECTED, ErrorCode.INVALID_COMMAND, reason,
                                  d.item.received_at, **({"field": field} if field else {}))
        if not remember:  # the same id, even later in this group, is decided afresh
            self._forget_seen(d)
        self._final(d, message, remember=remember)
        log.info("invalid command rejected: %s", message["error"]["message"], extra=self._fields(d))

    def _refusal(self, d: Decision, admission: Admission, component: str, command: str) -> None:
        outcome = admission.refusal(component, command)
        assert outcome.error is not None
        self._refuse(d, outcome.status, outcome.error.code, outcome.error.message)

    def _refuse(self, d: Decision, status: Status, code: ErrorCode, text: str) -> None:
        assert d.command_id is not None
        message = refusal_message(d.command_id, d.body, status, code, text, d.item.received_at)
        if code.transient:  # "not now": the same id sent again, even in this group, is a fresh attempt
            self._forget_seen(d)
        self._final(d, message, remember=not code.transient, durable=not code.transient)
        log.info("command refused: %s", message["error"]["message"], extra=self._fields(d))

    def _final(self, d: Decision, message: dict[str, Any], remember: bool = True, durable: bool = True) -> None:
        """A final answer decided at intake: published, and remembered (its id and outcome, never its body).
        A transient refusal is neither remembered nor synced (`durable=False`: store docstring)."""
        item, command_id = d.item, d.command_id
        assert command_id is not None
        d.publish(self._out(d.reply_topic, message, item.correlation, command_id), durable)  # marks the clock first
        if remember:
            d.remember(Entry(command_id, "final", {}, d.reply_topic, item.correlation, item.received_at, None,
                             message["seq"], message, d.signer, d.signed_until))
        d.finals.append(message)

    # ---- invalid messages, counting ------------------------------------------------------------
    def _out(self, topic: str, message: dict[str, Any], correlation: bytes | None, command_id: str) -> Outgoing:
        if not message.get("duplicate"):  # a repeat keeps the mark of the time it was made
            message.update(m.clock_mark(self._clock.synchronized()))
        return Outgoing(topic, m.encode(message), correlation, command_id)

    def _count_invalid(self, reason: str) -> None:
        self.stats.invalid[reason] = self.stats.invalid.get(reason, 0) + 1
        if reason != "invalid_command":  # that one is counted with its final `rejected` response
            self._on_rejected(reason)

    def _error(self, stage: str) -> None:
        self.stats.errors[stage] = self.stats.errors.get(stage, 0) + 1
        try:
            self._on_error(stage)
        except Exception:
            log.exception("intake error callback failed")

    def _invalid_event(self, d: Decision, reason: str, detail: str) -> None:
        """Counts every invalid message; publishes an event, and logs a WARNING, for at most N a minute
        (a flood of garbage on the command topic must not flood the journal on the SD card either)."""
        self._count_invalid(reason)
        now = time.monotonic()
        self._event_times = [t for t in self._event_times if now - t < 60]
        if len(self._event_times) >= self._config.mqtt.invalid_events_per_minute:
            self.stats.events_suppressed += 1
            self._unlogged_invalid += 1
            log.debug("invalid message on the command topic: %s", clip(detail), extra={"bytes": len(d.item.payload)})
            return
        self._event_times.append(now)
        more, self._unlogged_invalid = self._unlogged_invalid, 0
        log.warning("invalid message on the command topic: %s%s", clip(detail),
                    f" ({more} more since the last one logged: counted, not logged)" if more else "",
                    extra={"bytes": len(d.item.payload), "not_logged": more})
        event = m.event_message("invalid_message", self._clock.wall(), reason=reason, detail=clip(detail),
                                bytes=len(d.item.payload), **m.clock_mark(self._clock.synchronized()))
        d.publish(Outgoing(self._topics.events, m.encode(event)))

    @staticmethod
    def _fields(d: Decision) -> dict[str, Any]:
        if d.command_id is None:
            return {"bytes": len(d.item.payload)}
        return command_fields(d.command_id, d.body.get("component"), d.body.get("command"))
