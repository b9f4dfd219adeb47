"""Command intake: decode, dedupe against the ledger, record durably, PUBACK, then queue for execution.

Messages are taken in groups: one SQLite commit (one fsync) covers a group, and only then are the
group's PUBACKs sent. A crash before the commit makes the broker redeliver; never a lost command.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.clock import Clock
from agent.config.model import AgentConfig
from agent.fleet.flow import Parking
from agent.fleet.link import Incoming
from agent.fleet.topics import Topics, is_publishable
from agent.policy.admission import Admission
from agent.store.sqlite import Batch, Entry, Outgoing, Store
from agent.wire import decode
from agent.wire import messages as m
from agent.wire.command import Command, ErrorCode, Status, command_fields
from agent.wire.messages import accepted_message, in_flight_duplicate, refusal_message
from agent.wire.parse import InvalidCommandError, UnknownComponentError, parse_command

log = logging.getLogger(__name__)

GROUP_MAX = 64
_ROOM = object()  # put on the queue when a component's queue has room again


@dataclasses.dataclass
class IntakeStats:
    received: int = 0
    invalid: dict[str, int] = dataclasses.field(default_factory=dict)
    duplicates: int = 0
    redeliveries: int = 0
    events_suppressed: int = 0


class Intake:
    """Owns the intake thread. `submit(command, entry)` hands accepted commands to execution."""

    def __init__(self, config: AgentConfig, store: Store, topics: Topics, ack: Callable[..., None],
                 submit: Callable[[Command, Entry], None], wake_outbox: Callable[[], None],
                 check: Callable[[Command, int], Admission],
                 on_final: Callable[[dict[str, Any]], None] | None = None,
                 on_rejected: Callable[[str], None] | None = None, clock: Clock | None = None) -> None:
        self._config = config
        self._store = store
        self._topics = topics
        self._ack = ack
        self._submit = submit
        self._check = check
        self._on_final = on_final or (lambda message: None)
        self._on_rejected = on_rejected or (lambda reason: None)
        self._wake_outbox = wake_outbox
        self._clock = clock or Clock()
        self.parking = Parking(config.mqtt.max_waiting_commands)
        self._hold: set[int] = set()  # id() of this group's messages whose PUBACK waits for room
        self._queue: queue.Queue[Incoming | object | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._event_times: list[float] = []
        self._promised: dict[str, int] = {}  # per component: accepted in the group being processed
        self.stats = IntakeStats()
        self.heartbeat = time.monotonic()

    def put(self, incoming: Incoming) -> None:
        """Called on the MQTT loop thread: just hands over."""
        self._queue.put(incoming)

    def resume(self, recovered: list[tuple[Command, Entry]]) -> None:
        """Commands left `queued` by the last run, oldest first: they wait like any other and go first.
        Call before `start`; the intake thread hands them to their components as room allows."""
        for command, entry in recovered:
            self.parking.park(None, command, entry)
        if recovered:
            self._queue.put(_ROOM)

    def room(self) -> None:
        """A component's queue has room again (a command started): waiting commands may move on."""
        if len(self.parking):
            self._queue.put(_ROOM)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 3.0) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            try:
                first = self._queue.get(timeout=5.0)
            except queue.Empty:
                continue
            if first is None:
                return
            if first is _ROOM:
                self._release()
                continue
            group = [first]
            while len(group) < GROUP_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                if item is not _ROOM:
                    group.append(item)
            try:
                self._process(group)
            except Exception:  # not acked: the broker redelivers the group after a reconnect
                log.exception("intake failed on a group of %d messages", len(group))

    def _process(self, group: list[Incoming]) -> None:
        batch = self._store.batch()
        accepted: list[tuple[Command, Entry]] = []
        seen: set[str] = set()
        self._promised: dict[str, int] = {}
        self._hold = set()
        for item in group:
            self.stats.received += 1
            decided = self._decide(item, batch, seen)
            if decided is not None:
                accepted.append(decided)
        batch.commit()
        for item in group:
            if id(item) not in self._hold:
                self._ack(item.mid, item.qos)
        self._wake_outbox()
        for command, entry in accepted:
            self._submit(command, entry)
        self._release()

    def _release(self) -> None:
        """Waiting commands whose component has room are queued now, and their PUBACKs sent."""
        if len(self.parking):
            self.parking.release(self._check, self._submit,
                                 lambda item: self._ack(item.mid, item.qos, item.generation))

    # ---- one message ---------------------------------------------------------------------------
    def _decide(self, item: Incoming, batch: Batch, seen: set[str]) -> tuple[Command, Entry] | None:
        if item.retain:  # redelivered on every subscribe: it would run again once its id is forgotten
            self._invalid_event("retained", "a retained message on the command topic is never executed", item)
            return None
        body = decode.decode_command(item.payload)
        if isinstance(body, decode.Undecodable):
            if body.command_id is None:
                self._invalid_event("undecodable", body.reason, item)
                return None
            reply_topic = self._reply_topic(item, {}, body.command_id)
            existing = self._store.get(body.command_id)
            if body.command_id in seen or existing is not None:
                self._duplicate(item, batch, {}, body.command_id, reply_topic, existing)
                return None
            seen.add(body.command_id)
            return self._reject_invalid(item, batch, body.command_id, {"id": body.command_id}, body.reason)
        command_id = decode.readable_id(body)
        if command_id is None:
            self._invalid_event("bad_id", "the command has no valid id", item)
            return None
        reply_topic = self._reply_topic(item, body, command_id)
        existing = self._store.get(command_id)
        if command_id in seen or existing is not None:
            self._duplicate(item, batch, body, command_id, reply_topic, existing)
            return None
        seen.add(command_id)
        try:
            command = parse_command(body, self._config, item.received_at)
            self._check_reply_topics(item, body)
        except InvalidCommandError as err:
            return self._reject_invalid(item, batch, command_id, body, str(err), err.problems)
        except UnknownComponentError as err:
            self._record_final(batch, item, body, command_id, reply_topic,
                               refusal_message(command_id, body, Status.FAILED, ErrorCode.UNKNOWN_COMPONENT,
                                               str(err), item.received_at))
            return None
        if command.expires_at is not None and not self._clock.synchronized():
            seen.discard(command_id)  # transient: not remembered, a resend later is a fresh attempt
            self._refuse_unsynchronized(item, batch, body, command_id, reply_topic)
            return None
        expires_at = command.expires_at  # kept in the ledger for a restart: wall clock
        if item.expiry_interval is not None:  # relative: runs on the monotonic clock in this process
            command = dataclasses.replace(command, deadline=item.received_mono + item.expiry_interval)
            expiry = item.received_at + item.expiry_interval
            expires_at = min(expires_at or expiry, expiry)
        command = dataclasses.replace(command, correlation_data=item.correlation)
        admission = self._check(command, self._promised.get(command.component, 0))
        waits = admission is Admission.BUSY or (admission is Admission.QUEUED and self.parking.holds(command.component))
        if waits and item.qos > 0 and self.parking.has_room():
            admission = Admission.QUEUED  # recorded now, queued when its component has room
        if admission is not Admission.QUEUED:  # refused before it was ever queued: no `accepted`
            outcome = admission.refusal(command.component, command.command)
            assert outcome.error is not None
            self._record_final(batch, item, body, command_id, reply_topic,
                               refusal_message(command_id, body, outcome.status, outcome.error.code,
                                               outcome.error.message, item.received_at))
            log.info("command refused: %s", outcome.error.message,
                     extra=command_fields(command_id, command.component, command.command))
            return None
        send_accepted = self._config.mqtt.send_accepted
        entry = Entry(command_id, "queued", body, reply_topic, item.correlation, item.received_at,
                      expires_at, 1 if send_accepted else 0, None)
        batch.add_command(entry)
        log.info("command accepted", extra=command_fields(command_id, command.component, command.command))
        if send_accepted:
            batch.publish(self._out(reply_topic, accepted_message(command_id, command.component, command.command,
                                                                  item.received_at), item.correlation, command_id))
        if waits:
            self._hold.add(id(item))
            self.parking.park(item, command, entry)
            return None
        self._promised[command.component] = self._promised.get(command.component, 0) + 1
        return command, entry

    def _reply_topic(self, item: Incoming, body: dict[str, Any], command_id: str) -> str:
        for candidate in (item.response_topic, body.get("reply_to")):
            usable = isinstance(candidate, str) and is_publishable(candidate)
            if usable and self._topics.reply_problem(candidate) is None:
                return candidate
        return self._topics.responses(command_id)

    def _check_reply_topics(self, item: Incoming, body: dict[str, Any]) -> None:
        """A Response Topic or `reply_to` must be a topic one may publish to, and not this vehicle's own."""
        problems = []
        for field, candidate in (("response_topic", item.response_topic), ("reply_to", body.get("reply_to"))):
            if isinstance(candidate, str):
                problem = "contains a wildcard or NUL" if not is_publishable(candidate) \
                    else self._topics.reply_problem(candidate)
                if problem:
                    problems.append((field, f"{candidate!r} cannot be a reply topic: {problem}"))
        if problems:
            raise InvalidCommandError(problems, body.get("id"))

    def _refuse_unsynchronized(self, item: Incoming, batch: Batch, body: dict[str, Any], command_id: str,
                               reply_topic: str) -> None:
        """`expires_at` cannot be judged on a clock not known to be right (e.g. 1970 after a boot without
        RTC): refused, and not remembered, so the same id can be sent again once the clock is set."""
        message = refusal_message(command_id, body, Status.REJECTED, ErrorCode.CLOCK_UNSYNCHRONIZED,
                                  "the device clock is not synchronized, so expires_at cannot be judged; "
                                  "send it again later or use the MQTT 5 Message Expiry Interval",
                                  item.received_at)
        batch.publish(self._out(reply_topic, message, item.correlation, command_id))
        self._on_final(message)
        log.warning("command with expires_at refused: the clock is not synchronized",
                    extra=command_fields(command_id, body.get("component"), body.get("command")))

    def _duplicate(self, item: Incoming, batch: Batch, body: dict[str, Any], command_id: str, reply_topic: str,
                   existing: Entry | None) -> None:
        """A second message with a known id (`existing` is None when its twin is in this same group)."""
        if item.dup and existing is not None:
            if existing.state == "queued" and self.parking.rebind(command_id, item):
                self._hold.add(id(item))  # still waiting for room: its PUBACK is owed on this delivery
            self.stats.redeliveries += 1  # the broker resending what we already recorded
            log.debug("redelivered command %s ignored", command_id,
                      extra=command_fields(command_id, body.get("component"), body.get("command")))
            return
        self.stats.duplicates += 1
        final_known = existing is not None and existing.state == "final"
        self._on_rejected("duplicate" if final_known else "duplicate_in_flight")
        if existing is not None and existing.state == "final" and existing.final_message is not None:
            for message in m.split_result({**existing.final_message, "duplicate": True},
                                          self._config.mqtt.max_payload_bytes):
                batch.publish(self._out(reply_topic, message, item.correlation, command_id))
            log.info("duplicate of a finished command: final response sent again",
                     extra=command_fields(command_id, body.get("component"), body.get("command")))
            return
        received_at = existing.received_at if existing is not None else item.received_at
        batch.publish(self._out(reply_topic, in_flight_duplicate(command_id, body, received_at),
                                item.correlation, command_id))
        log.info("duplicate of a command in flight: its accepted message sent again (not final)",
                 extra=command_fields(command_id, body.get("component"), body.get("command")))

    def _reject_invalid(self, item: Incoming, batch: Batch, command_id: str, body: dict[str, Any], reason: str,
                        problems: list[tuple[str, str]] | None = None) -> None:
        reply_topic = self._reply_topic(item, body, command_id)
        field = problems[0][0] if problems else ""
        self._count_invalid("invalid_command")
        message = refusal_message(command_id, body, Status.REJECTED, ErrorCode.INVALID_COMMAND, reason,
                                  item.received_at, **({"field": field} if field else {}))
        self._record_final(batch, item, body, command_id, reply_topic, message)
        log.info("invalid command rejected: %s", reason,
                 extra=command_fields(command_id, body.get("component"), body.get("command")))
        return None

    def _record_final(self, batch: Batch, item: Incoming, body: dict[str, Any], command_id: str, reply_topic: str,
                      message: dict[str, Any]) -> None:
        batch.publish(self._out(reply_topic, message, item.correlation, command_id))  # marks the clock first
        batch.add_command(Entry(command_id, "final", body, reply_topic, item.correlation, item.received_at,
                                None, message["seq"], message))
        self._on_final(message)

    def _out(self, topic: str, message: dict[str, Any], correlation: bytes | None, command_id: str) -> Outgoing:
        if not message.get("duplicate"):  # a repeat keeps the mark of the time it was made
            message.update(m.clock_mark(self._clock.synchronized()))
        return Outgoing(topic, m.encode(message), correlation, command_id)

    def _count_invalid(self, reason: str) -> None:
        self.stats.invalid[reason] = self.stats.invalid.get(reason, 0) + 1
        if reason != "invalid_command":  # that one is counted with its final `rejected` response
            self._on_rejected(reason)

    def _invalid_event(self, reason: str, detail: str, item: Incoming) -> None:
        """Counts every invalid message; publishes an event for at most N a minute."""
        self._count_invalid(reason)
        log.warning("invalid message on the command topic: %s", detail, extra={"bytes": len(item.payload)})
        now = time.monotonic()
        self._event_times = [t for t in self._event_times if now - t < 60]
        if len(self._event_times) >= self._config.mqtt.invalid_events_per_minute:
            self.stats.events_suppressed += 1
            return
        self._event_times.append(now)
        event = m.event_message("invalid_message", self._clock.wall(), reason=reason, detail=detail,
                                bytes=len(item.payload), **m.clock_mark(self._clock.synchronized()))
        batch = self._store.batch()
        batch.publish(Outgoing(self._topics.events, m.encode(event)))
        batch.commit()
