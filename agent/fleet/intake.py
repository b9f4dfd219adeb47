"""Command intake: decode, dedupe against the ledger, record durably, PUBACK, then queue for execution.

Each message is decided on its own into a Decision: the ledger row and the messages it comes to,
and the command to run. A group of decisions is committed at once (one SQLite commit, one fsync),
and only then are the group's PUBACKs sent. A crash before the commit makes the broker redeliver;
never a lost command.

A message fails alone. An exception while deciding one becomes its own `rejected`/`invalid_command`
(an `invalid_message` event when no id can be read); a group commit that fails is retried message
by message; a message the store cannot take is refused `storage_unavailable`, straight through the
link. Every message is acknowledged once it is answered, so none can clog the broker's in-flight
window, and none is redelivered to fail again.
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
from agent.policy.admission import Admission, allows
from agent.store.sqlite import Batch, Entry, Outgoing, Store, StoreError
from agent.wire import decode
from agent.wire import messages as m
from agent.wire.command import Command, ErrorCode, Status, command_fields
from agent.wire.messages import accepted_message, clip, in_flight_duplicate, refusal_message
from agent.wire.parse import InvalidCommandError, UnknownComponentError, parse_body, parse_envelope

log = logging.getLogger(__name__)

GROUP_MAX = 64
_ROOM = object()  # put on the queue when a component's queue has room again
# (incoming, decoded body, publish) -> (body to process, signing key id or None), or None when refused
Authenticate = Callable[[Incoming, dict[str, Any] | decode.Undecodable, Callable[[Outgoing], None]],
                        tuple[dict[str, Any] | decode.Undecodable, str | None] | None]


@dataclasses.dataclass
class IntakeStats:
    received: int = 0
    invalid: dict[str, int] = dataclasses.field(default_factory=dict)
    duplicates: int = 0
    redeliveries: int = 0
    events_suppressed: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)  # unexpected exceptions, by stage
    storage_refusals: int = 0


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

    def remember(self, entry: Entry) -> None:
        self.batch.add_command(entry)
        self.remembered = True

    def publish(self, message: Outgoing) -> None:
        self.batch.publish(message)
        self.messages.append(message)


class Intake:
    """Owns the intake thread. `submit(command, entry)` hands accepted commands to execution."""

    def __init__(self, config: AgentConfig, store: Store, topics: Topics, ack: Callable[..., None],
                 submit: Callable[[Command, Entry], None], wake_outbox: Callable[[], None],
                 check: Callable[[Command, int], Admission],
                 on_final: Callable[[dict[str, Any]], None] | None = None,
                 on_rejected: Callable[[str], None] | None = None,
                 publish_now: Callable[[Outgoing], int | None] | None = None,
                 on_error: Callable[[str], None] | None = None, clock: Clock | None = None,
                 authenticate: Authenticate | None = None) -> None:
        self._config = config
        self._authenticate = authenticate
        self._store = store
        self._topics = topics
        self._ack = ack
        self._submit = submit
        self._check = check
        self._on_final = on_final or (lambda message: None)
        self._on_rejected = on_rejected or (lambda reason: None)
        self._publish_now = publish_now or (lambda message: None)  # around the outbox, when the store fails
        self._on_error = on_error or (lambda stage: None)
        self._wake_outbox = wake_outbox
        self._clock = clock or Clock()
        self.parking = Parking(config.mqtt.max_waiting_commands)
        self._hold: set[int] = set()  # id() of this group's messages whose PUBACK waits for room
        self._queue: queue.Queue[Incoming | object | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._event_times: list[float] = []
        self._promised: dict[str, int] = {}  # per component: accepted in the group being processed
        self._seen: dict[str, Decision] = {}  # per id: its decision in the group being processed
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
            except Exception:  # each step below catches per message; this is the last line of defence
                self._error("group")
                log.exception("intake failed on a group of %d messages", len(group))

    # ---- a group: decide each, record all, acknowledge each, then run ---------------------------
    def _process(self, group: list[Incoming]) -> None:
        self._promised, self._seen = {}, {}
        self._hold = set()
        decisions = []
        for item in group:
            self.stats.received += 1
            decisions.append(self._decide_safely(item))
        self._record(decisions)
        for decision in decisions:
            if id(decision.item) not in self._hold:  # a waiting command's PUBACK is sent when it is queued
                self._acknowledge(decision.item)
        self._wake_outbox()
        for decision in decisions:
            self._settle(decision)
        self._release()

    def _release(self) -> None:
        """Waiting commands whose component has room are queued now, and their PUBACKs sent."""
        if len(self.parking):
            self.parking.release(self._check, self._submit,
                                 lambda item: self._ack(item.mid, item.qos, item.generation))

    def _decide_safely(self, item: Incoming) -> Decision:
        decision = Decision(item, self._store.batch())
        try:
            self._decide(decision)
            return decision
        except StoreError as err:
            self._forget_seen(decision)
            return self._unrecordable(decision, err)
        except Exception:
            self._forget_seen(decision)
            self._error("decide")
            log.exception("intake failed on one message; it is refused alone",
                          extra=self._fields(decision))
            return self._failed(item)

    def _record(self, decisions: list[Decision]) -> None:
        """One commit for the group; if that fails, one commit per message, each failing alone."""
        try:
            self._store.commit_group([d.batch for d in decisions])
            return
        except Exception as err:
            if len(decisions) > 1:
                log.warning("group commit of %d messages failed (%s); recording them one by one", len(decisions),
                            err)
        for i, decision in enumerate(decisions):
            try:
                self._store.commit_group([decision.batch])
            except StoreError as err:
                self._unpark(decision)
                decisions[i] = self._unrecordable(decision, err) if err.unavailable else self._unrecorded(decision)
            except Exception:
                self._unpark(decision)
                decisions[i] = self._unrecorded(decision)

    def _unpark(self, decision: Decision) -> None:
        """A waiting command whose ledger row could not be written does not wait: its message is answered."""
        if decision.parked and decision.command_id is not None:
            self.parking.forget(decision.command_id)
            self._hold.discard(id(decision.item))
            decision.parked = False

    def _acknowledge(self, item: Incoming) -> None:
        try:
            self._ack(item.mid, item.qos)
        except Exception:
            self._error("acknowledge")
            log.exception("PUBACK failed", extra={"mid": item.mid})

    def _settle(self, decision: Decision) -> None:
        """After the commit: count the finals, hand the accepted command to execution."""
        try:
            for message in decision.finals:
                self._on_final(message)
            if decision.run is not None:
                command, entry = decision.run
                log.info("command accepted", extra=command_fields(command.id, command.component, command.command))
                self._submit(command, entry)
        except Exception:
            self._error("settle")
            log.exception("intake failed handing over a recorded command", extra=self._fields(decision))

    # ---- when a message cannot be decided or recorded --------------------------------------------
    def _failed(self, item: Incoming) -> Decision:
        """An unexpected exception on this message: `rejected`/`invalid_command`, or an event without an id."""
        decision = Decision(item, self._store.batch())
        command_id = _salvage_id(item.payload)
        if command_id is None:
            self._invalid_event(decision, "internal", "the agent could not process this message")
            return decision
        decision.command_id = command_id
        decision.reply_topic = self._reply_topic(item, {}, command_id)
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
            self.stats.storage_refusals += 1
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

    # ---- one message ---------------------------------------------------------------------------
    def _decide(self, d: Decision) -> None:
        item = d.item
        if item.retain:  # redelivered on every subscribe: it would run again once its id is forgotten
            self._invalid_event(d, "retained", "a retained message on the command topic is never executed")
            return
        body = decode.decode_command(item.payload)
        signer = None
        if self._authenticate is not None:  # signed commands: the envelope's inner Command, or refused
            passed = self._authenticate(item, body, d.publish)
            if passed is None:
                return
            body, signer = passed
        if isinstance(body, decode.Undecodable):
            if body.command_id is None:
                self._invalid_event(d, "undecodable", body.reason)
                return
            self._identify(d, body.command_id, {})
            if not self._repeated(d):
                self._reject_invalid(d, body.reason, body.field)
            return
        command_id = decode.readable_id(body)
        if command_id is None:
            self._invalid_event(d, "bad_id", "the command has no valid id")
            return
        self._identify(d, command_id, body)
        if self._repeated(d):
            return
        try:
            envelope = parse_envelope(body, self._config)
            self._check_reply_topics(item, body)
        except InvalidCommandError as err:
            self._reject_invalid(d, str(err), err.problems[0][0] if err.problems else "")
            return
        except UnknownComponentError as err:
            self._refuse(d, Status.REJECTED, ErrorCode.UNKNOWN_COMPONENT, str(err))
            return
        if not allows(envelope.ecu, envelope.command):  # policy first: params of a refused command are not read
            self._refusal(d, Admission.NOT_PERMITTED, envelope.component, envelope.command)
            return
        try:
            command = self._with_properties(parse_body(envelope, item.received_at), item)
        except InvalidCommandError as err:
            self._reject_invalid(d, str(err), err.problems[0][0] if err.problems else "")
            return
        if command.expires_at is not None and not self._clock.synchronized():
            # `expires_at` cannot be judged on a clock not known to be right (e.g. 1970 after a boot
            # without RTC): transient, so the same id can be sent again once the clock is set.
            self._refuse(d, Status.REJECTED, ErrorCode.CLOCK_UNSYNCHRONIZED,
                         "the device clock is not synchronized, so expires_at cannot be judged; "
                         "send it again later or use the MQTT 5 Message Expiry Interval")
            return
        admission = self._check(command, self._promised.get(command.component, 0))
        waits = admission is Admission.BUSY or (admission is Admission.QUEUED and self.parking.holds(command.component))
        if waits and item.qos > 0 and self.parking.has_room():
            admission = Admission.QUEUED  # recorded now, queued when its component has room
        else:
            waits = False
        if admission is not Admission.QUEUED:  # refused before it was ever queued: no `accepted`
            self._refusal(d, admission, command.component, command.command)
            return
        self._accept(d, command, waits, signer)

    def _identify(self, d: Decision, command_id: str, body: dict[str, Any]) -> None:
        d.command_id, d.body = command_id, body
        d.reply_topic = self._reply_topic(d.item, body, command_id)

    def _with_properties(self, command: Command, item: Incoming) -> Command:
        """The MQTT 5 properties of the message that carried the command: expiry and correlation data.

        A Message Expiry Interval is relative: it runs on the monotonic clock in this process (`deadline`);
        the ledger keeps its wall-clock end for a restart (see `_ledger_expiry`).
        """
        if item.expiry_interval is not None:
            command = dataclasses.replace(command, deadline=item.received_mono + item.expiry_interval)
        return dataclasses.replace(command, correlation_data=item.correlation)

    @staticmethod
    def _ledger_expiry(command: Command, item: Incoming) -> float | None:
        if item.expiry_interval is None:
            return command.expires_at
        expiry = item.received_at + item.expiry_interval
        return min(command.expires_at or expiry, expiry)

    def _accept(self, d: Decision, command: Command, waits: bool = False, signer: str | None = None) -> None:
        """Recorded as queued; with `waits`, it waits for room in its component's queue, its PUBACK held.
        `signer` is the key id of a signed command (the audit log's "who")."""
        item = d.item
        send_accepted = self._config.mqtt.send_accepted and self._takes_progress(item, d.body, d.reply_topic)
        entry = Entry(command.id, "queued", d.body, d.reply_topic, item.correlation, item.received_at,
                      self._ledger_expiry(command, item), 1 if send_accepted else 0, None, signer)
        d.remember(entry)
        if send_accepted:
            d.publish(self._out(d.reply_topic, accepted_message(command.id, command.component, command.command,
                                                                item.received_at), item.correlation, command.id))
        if waits:
            self._hold.add(id(item))
            self.parking.park(item, command, entry)
            d.parked = True
            return
        self._promised[command.component] = self._promised.get(command.component, 0) + 1
        d.run = (command, entry)

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

    def _takes_progress(self, item: Incoming, body: dict[str, Any], reply_topic: str) -> bool:
        """Whether non-final messages (`accepted`, an in-flight duplicate's reply) go to `reply_topic`.

        Protocol revision 1.1: always on the default `responses/{id}`; on a Response Topic or `reply_to`
        the command gave, only with `"progress": true`, because request/response clients take the
        first message there as the answer. Final responses and the `running` chunks of a large
        result go everywhere.
        """
        chosen = reply_topic in (item.response_topic, body.get("reply_to"))
        return not chosen or body.get("progress") is True

    # ---- repeated ids --------------------------------------------------------------------------
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
            self.stats.redeliveries += 1  # the broker resending what we already recorded
            log.debug("redelivered command %s ignored", command_id, extra=fields)
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
        if not (self._config.mqtt.send_accepted and self._takes_progress(item, d.body, d.reply_topic)):
            log.info("duplicate of a command in flight: no non-final message goes to %s; the final follows "
                     "where the first copy asked for it", d.reply_topic, extra=fields)
            return
        body, received_at = (existing.body, existing.received_at) if existing is not None else \
            (twin.body if twin is not None else {}, twin.item.received_at if twin is not None else item.received_at)
        d.publish(self._out(d.reply_topic, in_flight_duplicate(command_id, body, received_at), item.correlation,
                            command_id))
        log.info("duplicate of a command in progress: its accepted message sent again", extra=fields)

    def _forget_seen(self, d: Decision) -> None:
        if d.command_id is not None and self._seen.get(d.command_id) is d:
            del self._seen[d.command_id]

    # ---- finals --------------------------------------------------------------------------------
    def _reject_invalid(self, d: Decision, reason: str, field: str) -> None:
        assert d.command_id is not None
        self._count_invalid("invalid_command")
        message = refusal_message(d.command_id, d.body, Status.REJECTED, ErrorCode.INVALID_COMMAND, reason,
                                  d.item.received_at, **({"field": field} if field else {}))
        self._final(d, message)
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
        self._final(d, message, remember=not code.transient)
        log.info("command refused: %s", message["error"]["message"], extra=self._fields(d))

    def _final(self, d: Decision, message: dict[str, Any], remember: bool = True) -> None:
        """A final answer decided at intake: published, and remembered (its id and outcome, never its body)."""
        item, command_id = d.item, d.command_id
        assert command_id is not None
        d.publish(self._out(d.reply_topic, message, item.correlation, command_id))  # marks the clock first
        if remember:
            d.remember(Entry(command_id, "final", {}, d.reply_topic, item.correlation, item.received_at, None,
                             message["seq"], message))
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
        """Counts every invalid message; publishes an event for at most N a minute."""
        self._count_invalid(reason)
        log.warning("invalid message on the command topic: %s", clip(detail), extra={"bytes": len(d.item.payload)})
        now = time.monotonic()
        self._event_times = [t for t in self._event_times if now - t < 60]
        if len(self._event_times) >= self._config.mqtt.invalid_events_per_minute:
            self.stats.events_suppressed += 1
            return
        self._event_times.append(now)
        event = m.event_message("invalid_message", self._clock.wall(), reason=reason, detail=clip(detail),
                                bytes=len(d.item.payload), **m.clock_mark(self._clock.synchronized()))
        d.publish(Outgoing(self._topics.events, m.encode(event)))

    @staticmethod
    def _fields(d: Decision) -> dict[str, Any]:
        if d.command_id is None:
            return {"bytes": len(d.item.payload)}
        return command_fields(d.command_id, d.body.get("component"), d.body.get("command"))


def _salvage_id(payload: bytes) -> str | None:
    """The id of a message, if one can be read at all (used after something unexpected went wrong)."""
    try:
        body = decode.decode_command(payload)
        return body.command_id if isinstance(body, decode.Undecodable) else decode.readable_id(body)
    except Exception:
        return None
