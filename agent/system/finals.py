"""Finals: a command's result into its final response, stored with its fault events, audit record and
ledger state in one batch, and handed to the outbox (result -> store/outbox in the daemon's flow).

Part of `Service` (it inherits this, and owns in its constructor the store, outbox, link, runtime, fault
tracker, audit trail, metrics, clock and the per-command bookkeeping these methods read); kept apart so
that service.py is the assembly alone, and the path every command ends on has one place of its own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.config.reader import InvalidValueError, integer
from agent.store.sqlite import Batch, Entry, Outgoing, StoreError
from agent.wire import messages as m
from agent.wire.command import ErrorCode, Outcome, Result, Status, command_fields
from agent.wire.messages import response_message

if TYPE_CHECKING:
    from agent.clock import Clock
    from agent.collect.faults import FaultTracker
    from agent.config.model import AgentConfig
    from agent.core.runtime import Runtime
    from agent.fleet.intake import Intake
    from agent.fleet.link import MqttLink
    from agent.fleet.outbox import Outbox
    from agent.fleet.topics import Topics
    from agent.metrics.registry import AgentMetrics
    from agent.store.sqlite import Store
    from agent.system.audit import AuditTrail

log = logging.getLogger(__name__)


class Finals:
    """The runtime's result sink (`_on_result`) and the final response it comes to (`_finish`)."""

    # what Service owns and these methods use (set in its constructor)
    config: AgentConfig
    clock: Clock
    topics: Topics
    store: Store
    outbox: Outbox
    link: MqttLink
    runtime: Runtime
    metrics: AgentMetrics
    audit: AuditTrail
    faults: FaultTracker
    intake: Intake
    _entries: dict[str, Entry]
    _started_at_intake: set[str]
    _marked_ahead: set[str]
    _count_final: Callable[..., None]

    def _on_result(self, result: Result) -> None:
        """The runtime's sink: a command's result, with the ledger entry it was admitted with, to `_finish`."""
        # its place in the queue is free, also when it never started (expired in the queue, a start the disk
        # refused), which no start mark said: a command waiting for room must not wait for another message
        self.intake.room()
        kept = self._entries.get(result.command_id)
        if kept is None or not kept.body:
            # Not kept, or kept without its body: a command that waited for room (flow.Parking keeps none) or
            # was queued again at a restart; the body holds what the final depends on (read_faults' status_mask).
            try:
                stored = self.store.get(result.command_id)
            except StoreError as err:
                if kept is None:
                    log.error("the final response cannot be sent: its ledger entry cannot be read (%s)", err,
                              extra=command_fields(result.command_id, result.component, result.command))
                    return
                stored = None  # the final still goes from what was kept: a fault reading of unknown mask clears nothing
            if stored is not None:
                self._finish(stored, result)
                return
            if kept is None:
                log.error("result for a command missing from the ledger",
                          extra=command_fields(result.command_id, result.component, result.command))
                return
        # admitted as queued or started: one that ran had its start mark stored
        self._finish(dataclasses.replace(kept, state="started") if result.started_at is not None else kept, result)

    def _finish(self, entry: Entry, result: Result) -> None:
        """Stores the final response and its ledger state together; a transient refusal is forgotten instead.

        When the worker has another command queued, it does not wait for the commit: the final rides the
        commit of that command's start mark (one fsync for both), and the thread that commits it publishes
        it. When nothing waits, the worker commits (fsync) and publishes it itself: no hand-over to another
        thread on the one-at-a-time path. When the store fails, the response goes straight to the link, and
        the write waits in memory until the store takes writes again (then the outbox sends it once more:
        at least once).
        """
        self._started_at_intake.discard(entry.id)  # ended without running (expired, refused) or ran
        self._entries.pop(entry.id, None)
        self._marked_ahead.discard(entry.id)
        try:
            batch, final, messages, events = self._final_batch(entry, result)
        except Exception as err:  # a bug building this result (a value the encoder chokes on): still one final
            log.exception("building the final response failed; answered failed/internal instead",
                          extra=command_fields(entry.id, result.component, result.command))
            self.metrics.finish_errors.inc()
            result = dataclasses.replace(result, outcome=Outcome.failure(
                Status.FAILED, ErrorCode.INTERNAL, f"the agent could not build this result: {type(err).__name__}"))
            batch, final, messages, events = self._final_batch(entry, result)

        def stored(error: BaseException | None) -> None:
            # published by the thread that committed it; when it went around the store, what this command
            # stored before it (its `accepted`) is handed over first (after a pass the outbox thread has under way)
            self.outbox.send_now(wait=error is not None)
            if error is not None:
                log.error("final response not stored (%s): sent without the outbox; stored when the store works "
                          "again", error, extra=command_fields(entry.id, result.component, result.command))
                for message in [*events, *messages]:
                    self.link.publish(message)

        worker = self.runtime.workers.get(result.component)
        if worker is not None and worker.depth > 0:  # its next start mark is about to be committed: shares it
            try:
                batch.commit_later(stored, defer=True, company=True)
            except StoreError as err:  # the store is closing
                stored(err)
        else:  # nothing waits for this worker: it commits (and publishes) itself, no hand-over to a thread
            try:
                batch.commit(defer=True)
            except StoreError as err:
                stored(err)
            else:
                stored(None)
        duration = result.finished_at - result.started_at if result.started_at is not None else None
        self._count_final(final, duration)
        if len(messages) > 1:
            self.metrics.chunks.inc(len(messages) - 1)

    def _final_batch(self, entry: Entry,
                     result: Result) -> tuple[Batch, dict[str, Any], list[Outgoing], list[Outgoing]]:
        """The final response's statements (response, fault events, audit record, ledger state), not committed:
        (batch, final message, its messages, the events)."""
        final = {**response_message(result, seq=entry.seq + 1), **m.clock_mark(self.clock.synchronized())}
        largest = self.config.mqtt.max_payload_bytes
        broker = self.link.payload_limit(entry.reply_topic, entry.correlation)  # when the broker announced one
        encoded = m.encode_final(final, min(largest, broker) if broker is not None else largest)
        pieces = [message for message, _ in encoded]
        messages = [Outgoing(entry.reply_topic, payload, entry.correlation, entry.id) for _, payload in encoded]
        batch = self.store.batch()
        events = self._observe_faults(entry, result, batch)  # ahead of the response: a backend that has the
        for message in messages:                             # answer has heard of the changes it shows
            batch.publish(message)
        error = result.outcome.error
        if error is not None and error.code.transient:
            batch.forget(entry.id)  # "not now": the same id sent again is a fresh attempt
        else:
            batch.set_state(entry.id, "final", seq=pieces[-1]["seq"], final_message=final)
        # last: it appends to the audit file at once, so a step above that raises (and is built again as
        # failed/internal by `_finish`) never leaves a second `finished` record there
        self.audit.finished(entry, result, batch)
        return batch, final, messages, events

    def _observe_faults(self, entry: Entry, result: Result, batch: Batch) -> list[Outgoing]:
        """A completed `read_faults`: its fault_changed Events and the component's new fault set into `batch`
        (a store that fails defers both together). A failure here is logged and leaves the response alone."""
        faults = result.outcome.result.get("faults") if result.outcome.result else None
        if result.command != "read_faults" or result.status is not Status.COMPLETED or not isinstance(faults, list):
            return []
        params = entry.body.get("params")
        raw_mask = params.get("status_mask", 0xFF) if isinstance(params, dict) else 0xFF if entry.body else 0x00
        try:
            mask = integer(0, 0xFF)(raw_mask)
        except InvalidValueError:
            mask = 0x00  # cannot happen for a parsed command; and a reading of unknown mask clears nothing
        mark = m.clock_mark(self.clock.synchronized())
        try:
            events = [Outgoing(self.topics.events, m.encode({**event, **mark}))
                      for event in self.faults.observe(result.component, faults, status_mask=mask, batch=batch)]
        except Exception:
            log.exception("fault changes of %s not compared", result.component,
                          extra=command_fields(result.command_id, result.component, result.command))
            return []
        for event in events:
            batch.publish(event)
        return events
