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
from agent.fleet.decision import Authenticate, Decision, IntakeStats
from agent.fleet.fallback import Fallbacks
from agent.fleet.flow import Parking
from agent.fleet.packets import Incoming
from agent.fleet.repeats import Repeats
from agent.fleet.replies import check_reply_topics, choose_reply_topic, takes_progress
from agent.fleet.topics import Topics
from agent.policy.admission import Admission, allows
from agent.policy.mutating import is_mutating
from agent.store.sqlite import Entry, Outgoing, Store, StoreError
from agent.wire import decode
from agent.wire.command import Command, ErrorCode, Status, command_fields
from agent.wire.messages import accepted_message
from agent.wire.parse import InvalidCommandError, UnknownComponentError, parse_body, parse_envelope
from agent.wire.timefmt import parse_rfc3339

log = logging.getLogger(__name__)

GROUP_MAX = 64
# How long the `accepted` message of a command that starts at once may wait to go out together with its
# final response. Publishing it while the command runs costs the command's own latency (the broker and
# the backend handle it during the exchange: about 0.3 ms of a 2 ms round trip in `python -m bench`); a
# command that takes longer still gets its `accepted` this soon after it was recorded.
ACCEPTED_GRACE_S = 0.05
_ROOM = object()  # put on the queue when a component's queue has room again


class Intake(Repeats, Fallbacks):
    """Owns the intake thread. `submit(command, entry)` hands accepted commands to execution."""

    def __init__(self, config: AgentConfig, store: Store, topics: Topics, ack: Callable[..., None],
                 submit: Callable[[Command, Entry], None], wake_outbox: Callable[[], None],
                 check: Callable[[Command, int], Admission],
                 on_final: Callable[[dict[str, Any]], None] | None = None,
                 on_rejected: Callable[[str], None] | None = None,
                 publish_now: Callable[[Outgoing], int | None] | None = None,
                 on_error: Callable[[str], None] | None = None, clock: Clock | None = None,
                 authenticate: Authenticate | None = None, idle: Callable[[str], bool] | None = None,
                 send_soon: Callable[[float], None] | None = None) -> None:
        self._config = config
        self._authenticate = authenticate
        self._store = store
        self._topics = topics
        self._ack = ack
        self._submit = submit
        self._check = check
        self._idle = idle or (lambda component: False)  # its worker has nothing to do: the command runs next
        self._on_final = on_final or (lambda message: None)
        self._on_rejected = on_rejected or (lambda reason: None)
        self._publish_now = publish_now or (lambda message: None)  # around the outbox, when the store fails
        self._on_error = on_error or (lambda stage: None)
        self._wake_outbox = wake_outbox
        self._send_soon = send_soon
        self._clock = clock or Clock()
        self.parking = Parking(config.mqtt.max_waiting_commands)
        self._hold: set[int] = set()  # id() of this group's messages whose PUBACK waits for room
        self._queue: queue.Queue[Incoming | object | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._event_times: list[float] = []
        self._unlogged_invalid = 0
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
                self._release_safely()
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
            decisions.append(self._decide_safely(item))
        self._record(decisions)
        for decision in decisions:  # recorded: the workers may start now, before the PUBACKs are written
            self._settle(decision)
        for decision in decisions:
            if id(decision.item) not in self._hold:  # a waiting command's PUBACK is sent when it is queued
                self._acknowledge(decision.item)
        if self._send_soon is not None and decisions and all(_starts_at_once(d) for d in decisions):
            self._send_soon(ACCEPTED_GRACE_S)  # only `accepted` messages: they may go with the finals
        else:
            self._wake_outbox()
        self._release_safely()  # the group is done: a failure here is the release's, not the group's

    def _release_safely(self) -> None:
        try:
            self._release()
        except Exception:  # as for a group: logged and counted, the thread goes on
            self._error("release")
            log.exception("intake failed releasing waiting commands")

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
        """One commit for the group; if that fails, one commit per message, each failing alone.

        When every command of the group waits behind another in its component's queue, the commit
        waits a moment for a worker's commit to carry it (one fsync for both): none of them would run
        sooner, only their PUBACKs wait."""
        runs = [d.run for d in decisions if d.run is not None]
        company = bool(runs) and all(entry.state == "queued" and not self._idle(command.component)
                                     for command, entry in runs)
        try:
            self._store.commit_group([d.batch for d in decisions], company=company)
            return
        except Exception as err:
            if len(decisions) > 1 or not isinstance(err, StoreError):  # one message: its own retry says why
                log.warning("group commit of %d message(s) failed (%s); recording them one by one", len(decisions),
                            err, exc_info=not isinstance(err, StoreError))
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
            self._ack(item.mid, item.qos, item.generation)  # not on a newer connection: the broker redelivers
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
                # DEBUG: one INFO line per command on the hot path, its outcome (the worker's "command <status>")
                log.debug("command accepted", extra=command_fields(command.id, command.component, command.command))
                self._submit(command, entry)
        except Exception:
            self._error("settle")
            log.exception("intake failed handing over a recorded command", extra=self._fields(decision))

    # ---- one message ---------------------------------------------------------------------------
    def _decide(self, d: Decision) -> None:
        """Which message this is: never a retained one, decoded (and unwrapped when signed), its id read, a
        repeat of a known id answered as such; a new command goes on to `_decide_command`."""
        item = d.item
        if item.retain:  # redelivered on every subscribe: it would run again once its id is forgotten
            self._invalid_event(d, "retained", "a retained message on the command topic is never executed")
            return
        body = self._decoded(item.payload)
        signer = None
        if self._authenticate is not None:  # signed commands: the envelope's inner Command, or refused
            passed = self._authenticate(item, body, d.publish)
            if passed is None:
                return
            body, signer = passed
            d.signer, d.signed_until = signer, _signed_expiry(body)
        if isinstance(body, decode.Undecodable):
            if body.command_id is None:
                self._invalid_event(d, "undecodable", body.reason)
                return
            self._identify(d, body.command_id, {})
            if not self._repeated(d):
                # unverified input where signatures are required must not claim an id a genuine command may carry
                claims_id = signer is not None or self._config.security.require_signature == "none"
                self._reject_invalid(d, body.reason, body.field, remember=claims_id)
            return
        command_id = decode.readable_id(body)
        if command_id is None:
            self._invalid_event(d, "bad_id", "the command has no valid id")
            return
        self._identify(d, command_id, body)
        if self._repeated(d):
            return
        self._decide_command(d, body, signer)

    def _decoded(self, payload: bytes) -> dict[str, Any] | decode.Undecodable:
        """The decoded message. Where signatures are checked, an envelope may be larger than a Command (its
        Command's bytes in base64): up to MAX_ENVELOPE_BYTES; its Command is held to the Command's limit when
        it is unwrapped. Anything else over MAX_COMMAND_BYTES is refused as too large, its id read."""
        if self._authenticate is None or len(payload) <= decode.MAX_COMMAND_BYTES:
            return decode.decode_command(payload)
        from agent.policy.signature import is_envelope  # only where signatures are checked (never loaded else)

        body = decode.decode_command(payload, decode.MAX_ENVELOPE_BYTES)
        return body if is_envelope(body) else decode.decode_command(payload)

    def _decide_command(self, d: Decision, body: dict[str, Any], signer: str | None) -> None:
        """A new command: validated, its component's policy first (params of a refused command are not
        read), its expiry judged only on a synchronized clock, then accepted, to wait for room, or refused."""
        item = d.item
        try:
            envelope = parse_envelope(body, self._config)
            check_reply_topics(self._topics, item, body)
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
        d.reply_topic = choose_reply_topic(self._topics, d.item, body, command_id)

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

    def _keep_until(self, command: Command, item: Incoming, signer: str | None) -> float | None:
        """Until when the ledger's bounds keep this command's id once it ran: a resend before its `expires_at`
        would be accepted, so forgetting it earlier would run a captured signed envelope twice (the MQTT
        Message Expiry Interval is outside the signature and does not count). An unsigned command's hold is
        capped at security.max_expiry_ahead_s after receipt, as a signed one's is by the signature check:
        otherwise plain commands with far expiries could grow the ledger past its bound for good."""
        if command.expires_at is None:
            return None
        if signer is not None:
            return command.expires_at
        return min(command.expires_at, item.received_at + self._config.security.max_expiry_ahead_s)

    def _accept(self, d: Decision, command: Command, waits: bool = False, signer: str | None = None) -> None:
        """Recorded as queued (as started when it goes straight to an idle worker: `_starts_now`); with
        `waits`, it waits for room in its component's queue, its PUBACK held.
        `signer` is the key id of a signed command (the audit log's "who")."""
        item = d.item
        send_accepted = self._config.mqtt.send_accepted and takes_progress(item, d.body, d.reply_topic)
        state = "started" if self._starts_now(command, waits) else "queued"
        entry = Entry(command.id, state, d.body, d.reply_topic, item.correlation, item.received_at,
                      self._ledger_expiry(command, item), 1 if send_accepted else 0, None, signer,
                      self._keep_until(command, item, signer))
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

    def _starts_now(self, command: Command, waits: bool) -> bool:
        """Whether the command's start mark can share this commit (store docstring): it goes straight
        to an idle worker, nothing else of its component is in this group, and it is not mutating (a
        mutating command's audit record is written when it starts)."""
        return (not waits and not self._promised.get(command.component) and not is_mutating(command.command)
                and self._idle(command.component))


def _starts_at_once(decision: Decision) -> bool:
    """The command was recorded as started (its worker was idle): all it stored to send is its `accepted`."""
    return decision.run is not None and decision.run[1].state == "started"


def _signed_expiry(body: object) -> float | None:
    """The `expires_at` of a verified signed command (the signature check read it already; None if unreadable)."""
    raw = body.get("expires_at") if isinstance(body, dict) else None
    try:
        return parse_rfc3339(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
