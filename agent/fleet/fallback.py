"""Intake's failure paths: a message that could not be decided (`_failed`), one whose own row could not be
recorded (`_unrecorded`), and one the failing store cannot take (`_unrecordable`, sent around the outbox).
Each is answered alone. A part of Intake."""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.fleet.answers import Answers
from agent.fleet.decision import Decision
from agent.fleet.packets import Incoming
from agent.fleet.replies import choose_reply_topic
from agent.store.sqlite import Outgoing
from agent.wire import decode
from agent.wire.command import ErrorCode, Status
from agent.wire.messages import refusal_message

log = logging.getLogger(__name__)


class Fallbacks(Answers):
    """When a message cannot be decided or recorded (Intake sets `_publish_now`)."""

    _publish_now: Callable[[Outgoing], int | None]

    def _failed(self, item: Incoming) -> Decision:
        """An unexpected exception on this message: `rejected`/`invalid_command`, or an event without an id."""
        decision = Decision(item, self._store.batch())
        command_id = _salvage_id(item.payload)
        if command_id is None:
            self._invalid_event(decision, "internal", "the agent could not process this message")
            return decision
        decision.command_id = command_id
        decision.reply_topic = choose_reply_topic(self._topics, item, {}, command_id)
        message = refusal_message(command_id, {}, Status.REJECTED, ErrorCode.INVALID_COMMAND,
                                  "the agent could not process this command", item.received_at)
        self._count_invalid("invalid_command")
        self._final(decision, message, remember=False)  # not remembered: nothing about it is trusted
        return decision

    def _unrecorded(self, decision: Decision) -> Decision:
        """Recording this message failed for a reason of its own (not the storage): refuse it alone."""
        self._error("record")
        log.exception("recording one message failed; it is refused alone", extra=self._fields(decision))
        fallback = self._failed(decision.item)
        try:
            self._store.commit_group([fallback.batch])
        except Exception as err:
            return self._unrecordable(fallback, err)
        return fallback

    def _unrecordable(self, decision: Decision, err: Exception) -> Decision:
        """The store cannot take this message now: refuse a new command `storage_unavailable` (not
        remembered: the same id may be sent again), send anything else straight through the link."""
        item = decision.item
        direct = Decision(item, self._store.batch(), decision.command_id, decision.body, decision.reply_topic)
        if decision.command_id is not None and (decision.remembered or not decision.messages):
            message = refusal_message(decision.command_id, decision.body, Status.REJECTED,
                                      ErrorCode.STORAGE_UNAVAILABLE,
                                      "the agent cannot record commands now (its storage fails); send it again "
                                      "later", item.received_at)
            reply_topic = decision.reply_topic or self._topics.responses(decision.command_id)
            direct.messages = [self._out(reply_topic, message, item.correlation, decision.command_id)]
            direct.finals = [message]
            log.warning("command refused: storage unavailable (%s)", err, extra=self._fields(decision))
        else:
            direct.messages = decision.messages
            log.warning("store unavailable: %d messages sent without the outbox (%s)", len(direct.messages), err,
                        extra=self._fields(decision))
        for message in direct.messages:
            if self._publish_now(message) is None:
                log.error("could not send a message without the outbox either", extra=self._fields(decision))
        return direct


def _salvage_id(payload: bytes) -> str | None:
    """The id of a message, if one can be read at all (used after something unexpected went wrong)."""
    try:
        body = decode.decode_command(payload)
        return body.command_id if isinstance(body, decode.Undecodable) else decode.readable_id(body)
    except Exception:
        return None
