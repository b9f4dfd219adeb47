"""Repeated command ids at intake: a broker redelivery is ignored, a duplicate gets its final again, or, while
the first copy is in flight, its `accepted` again where non-final messages may go. A part of Intake."""

from __future__ import annotations

import logging

from agent.fleet.answers import Answers
from agent.fleet.decision import Decision
from agent.fleet.flow import Parking
from agent.fleet.replies import takes_progress
from agent.store.sqlite import Entry
from agent.wire import messages as m
from agent.wire.messages import in_flight_duplicate

log = logging.getLogger(__name__)


class Repeats(Answers):
    """A message whose id is already known (Intake sets `parking` and `_hold`)."""

    parking: Parking
    _hold: set[int]

    def _repeated(self, d: Decision) -> bool:
        """A message whose id is known (in the ledger, or earlier in this group) is answered as a duplicate."""
        assert d.command_id is not None
        twin = self._seen.get(d.command_id)
        existing = None if twin is not None else self._store.get(d.command_id)
        if twin is None and existing is None:
            self._seen[d.command_id] = d
            return False
        self._duplicate(d, twin, existing)
        return True

    def _duplicate(self, d: Decision, twin: Decision | None, existing: Entry | None) -> None:
        """A repeated id: its final again when there is one, else its latest non-final message again."""
        item, command_id = d.item, d.command_id
        assert command_id is not None
        fields = self._fields(d)
        if item.dup and existing is not None:
            if existing.state == "queued" and self.parking.rebind(command_id, item):
                self._hold.add(id(item))  # still waiting for room: its PUBACK is owed on this delivery
            log.debug("redelivered command %s ignored (the broker resending what we recorded)", command_id,
                      extra=fields)
            return
        self.stats.duplicates += 1
        final = existing.final_message if existing is not None and existing.state == "final" else None
        if twin is not None and twin.finals:
            final = twin.finals[-1]
        if final is not None:
            self._on_rejected("duplicate")
            for message in m.split_result({**final, "duplicate": True}, self._config.mqtt.max_payload_bytes):
                d.publish(self._out(d.reply_topic, message, item.correlation, command_id))
            log.info("duplicate of a finished command: final response sent again", extra=fields)
            return
        self._on_rejected("duplicate_in_flight")
        if not (self._config.mqtt.send_accepted and takes_progress(item, d.body, d.reply_topic)):
            log.info("duplicate of a command in flight: no non-final message goes to %s; the final follows "
                     "where the first copy asked for it", d.reply_topic, extra=fields)
            return
        body, received_at = (existing.body, existing.received_at) if existing is not None else \
            (twin.body if twin is not None else {}, twin.item.received_at if twin is not None else item.received_at)
        d.publish(self._out(d.reply_topic, in_flight_duplicate(command_id, body, received_at), item.correlation,
                            command_id))
        log.info("duplicate of a command in progress: its accepted message sent again", extra=fields)
