"""The daemon's parts wired together: intake -> runtime -> results -> store/outbox -> link.

Restart recovery (agent.system.restart), the start marks (agent.system.startmarks), the final responses
(agent.system.finals) and the health and status views (agent.system.health) are parts of the one Service
kept in modules of their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, PlatformCollector

from agent.bus.monitor import BusMonitor
from agent.bus.owner import BusFactory
from agent.clock import Clock
from agent.collect.faults import FaultTracker
from agent.config.model import AgentConfig
from agent.core.runtime import Companion, Runtime
from agent.errors import ConfigError
from agent.fleet.intake import Intake
from agent.fleet.link import MAX_PACKET_IN, MAX_PACKET_SIGNED, MqttLink
from agent.fleet.outbox import Outbox
from agent.fleet.refusals import CONNECTION_DROPPED, REASONS, Refusal, reason_name
from agent.fleet.topics import Topics
from agent.metrics.logcount import LogCounter
from agent.metrics.registry import AgentMetrics
from agent.metrics.server import MetricsServer, tls_file_problems
from agent.policy.admission import Admission
from agent.store.recovery import open_store
from agent.store.sqlite import Entry, Outgoing, StoreError
from agent.system.audit import AuditTrail
from agent.system.collection import Collection
from agent.system.finals import Finals
from agent.system.health import ServiceHealth
from agent.system.procmetrics import ProcessMetrics
from agent.system.restart import RestartRecovery
from agent.system.startmarks import StartMarks
from agent.wire import messages as m
from agent.wire.command import Command, ErrorCode, Outcome, Result, Status, command_fields

if TYPE_CHECKING:
    from agent.fleet.signed import SignatureGate

log = logging.getLogger(__name__)

STORE_FILE = "agent.db"
CLOCK_FILE = "clock.json"
# What a stop may take after the in-flight commands' grace: requeueing, the last commits, the outbox
# flush and the offline status, and the joins of threads that are stopping. systemd kills a stop that
# outlasts TimeoutStopSec (the unit's 20 s: the default grace of 5 s, this, and room for the interpreter's
# exit), and a killed stop reports `interrupted` what a clean one would have queued again.
STOP_AFTER_GRACE_S = 10.0
REFUSAL_REASONS = (*REASONS.values(), "other", CONNECTION_DROPPED)  # every sovd_publish_refused_total reason


class Service(ServiceHealth, StartMarks, RestartRecovery, Finals):
    """Everything `sovd-edge run` runs. Construct, `start()`, and `stop()` on SIGTERM."""

    def __init__(self, config: AgentConfig, bus_factory: BusFactory | None = None,
                 companions: Sequence[Companion] = (), clock: Clock | None = None) -> None:
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock or Clock(config.state_dir / CLOCK_FILE)
        self.started_at = self.clock.wall()
        self.stopped_at: float | None = None  # set when a clean stop begins: the offline status's `since`
        self.topics = Topics(config.mqtt.prefix, config.vehicle)
        gate = signature_gate(config, self.topics, lambda reason, rejected: self.metrics.auth_failure(reason, rejected),
                              known=lambda command_id: self.store.get(command_id) is not None,
                              clock_trusted=self.clock.synchronized)  # before the store: it may refuse the config
        if config.metrics.enabled and (problems := tls_file_problems(config.metrics.tls)):
            raise ConfigError(str(config.source or "config"), problems)  # before the store, like the keys above
        self.registry = CollectorRegistry()
        ProcessMetrics(registry=self.registry)  # also under the unit's ProcSubset=pid
        PlatformCollector(registry=self.registry)
        self.log_counter = LogCounter(self.registry)
        self.metrics = AgentMetrics(self.registry, config.vehicle, [e.name for e in config.ecus],
                                    state=self._metrics_state, refusal_reasons=REFUSAL_REASONS)
        self._outbox_seen: tuple[int, float | None] = (0, None)  # the last outbox figures the store gave
        self._started_at_intake: set[str] = set()  # ids whose start mark shared the intake's commit
        self._marked_ahead: set[str] = set()  # ids marked started ahead of their turn, not yet run
        self._marks_lock = threading.Lock()  # a worker about to run a command marked ahead vs a stop re-queuing it
        self._requeued = False  # the stop queued again what was marked and never ran: nothing starts any more
        # The ledger entry of every command handed to a worker, until its result: the final response is
        # built from it without reading the ledger back. Bounded by the components' queues (plus one in
        # flight each); an entry is dropped when its command ends in any way (`_finish`).
        self._entries: dict[str, Entry] = {}
        self.store, self.store_recovery = open_store(config.state_dir / STORE_FILE, on_error=self._on_store_error,
                                                     now=self.clock.agent_now, wall=self.clock.wall)
        if self.store_recovery is not None:
            self.metrics.store_recoveries.labels(self.store_recovery.reason).inc()
        self._continue_agent_time()
        self.faults = FaultTracker(self.store, {e.name: dict(e.dtc_texts) for e in config.ecus}, clock=self.clock.wall,
                                   on_problem=lambda reason: self.metrics.fault_problems.labels(reason).inc())
        self.runtime = Runtime(config, sink=self._on_result, on_start=self._on_start,
                               bus_factory=bus_factory, companions=companions,
                               on_bus_change=self._on_bus_change, on_probe=self._on_probe, wall=self.clock.wall,
                               on_ahead=self._mark_ahead)
        self.metrics_server = MetricsServer(config.metrics, self.registry) if config.metrics.enabled else None
        self.bus_monitor = BusMonitor(config.bus, self.runtime.owner, config.metrics.bus_state_interval_s,
                                      on_change=self._publish_bus_state)
        self.link = MqttLink(config.mqtt, self.topics, config.mqtt.client_id or f"sovd-edge-{config.vehicle}",
                             status=self._status, on_command=self._on_incoming, on_published=self._on_published,
                             on_connection=self._on_connection, wall=self.clock.wall, on_plan=self._on_plan,
                             on_struck=self._on_struck, on_too_large=self._on_too_large,
                             on_status_refused=self._on_status_refused,
                             max_packet_in=MAX_PACKET_SIGNED if gate is not None else MAX_PACKET_IN)
        self.outbox = Outbox(self.store, config.store, self.link.publish, lambda: self.link.connected,
                             now=self.clock.agent_now, on_refused=self._on_refused,
                             window=lambda: self.link.broker_receive_maximum,
                             wall=lambda: self.clock.wall() if self.clock.synchronized() else None)
        self.collection = Collection(config, self.store, self.runtime, self.topics, self.registry, self.link.publish,
                                     lambda: self.link.connected, self.outbox.wake, on_reachable=self._on_probe,
                                     faults=self.faults, clock_mark=lambda: m.clock_mark(self.clock.synchronized()),
                                     wall=self.clock.wall, broker_limit=self.link.payload_limit,
                                     on_refused=self._on_refused)
        self.audit = AuditTrail(config, self.topics, self.store.get, on_error=self.metrics.audit_errors.inc,
                                on_damage=lambda damage: self.metrics.audit_damaged.inc(),
                                on_lost=lambda how: self.metrics.audit_lost.labels(how).inc())
        self.intake = Intake(config, self.store, self.topics, self.link.ack, self._admit, self.outbox.send_now,
                             self.runtime.check, on_final=self._count_final, idle=self.runtime.idle,
                             on_rejected=lambda reason: self.metrics.rejected.labels(reason).inc(),
                             publish_now=self.link.publish,
                             on_error=lambda stage: self.metrics.intake_errors.labels(stage).inc(), clock=self.clock,
                             authenticate=gate, send_soon=self.outbox.send_soon)

    def _continue_agent_time(self) -> None:
        """Agent time whose state file was missing or unreadable began at the wall clock: a store with rows
        (kept across the loss, or written by an agent before agent time) says when it left off instead."""
        if not self.clock.restarted:
            return
        try:
            newest = self.store.newest_stamp()
        except StoreError as err:
            log.error("agent time began at the wall clock; the store's stamps cannot be read (%s)", err)
            return
        if newest is None:
            return
        began = self.clock.agent_now()
        self.clock.continue_from(newest)
        log.warning("agent time state missing or unreadable: it goes on from the store's newest stamp, not the wall "
                    "clock", extra={"agent_time": newest, "wall_clock_start": began})

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, wait: float = 1.0) -> bool:
        """Starts every part; True when the CAN bus is up (the broker may still be unreachable)."""
        self.log_counter.attach()
        if self.metrics_server is not None:
            try:
                self.metrics_server.start()
            except Exception:  # nothing else runs yet: close what the constructor opened
                self.store.close()
                self.log_counter.detach()
                raise
        batch = self.store.batch()
        self.audit.open(batch)
        try:
            batch.commit(defer=True)
        except StoreError as err:
            log.error("audit log check not stored (%s)", err)
        requeue = self._recover()
        bus_up = self.runtime.start(wait)
        self.collection.start()
        self.bus_monitor.start()
        self.outbox.start()
        self.intake.resume(requeue)  # queued before the stop: they wait for room, never refused `busy`
        self.intake.start()
        self.link.start()
        return bus_up

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking commands, let in-flight ones finish, flush what the broker takes, go offline: within
        `grace` + STOP_AFTER_GRACE_S seconds, however many threads are stuck. Each step waits at most its
        own share, and none past the end; the store's last commits are never skipped."""
        end = time.monotonic() + grace + STOP_AFTER_GRACE_S

        def left(share: float) -> float:
            return max(0.0, min(share, end - time.monotonic()))

        self.stopped_at = self.clock.wall()
        self.intake.stop(left(3.0))
        self.collection.stop(left(3.0))
        self.runtime.stop(left(grace), until=end)  # queued-but-unrun commands stay 'queued' and run after a restart
        self._requeue_unrun()
        self.store.flush()  # the finals handed over without waiting are in the outbox before it is flushed
        if self.link.connected:
            self.outbox.flush(left(min(grace, 3.0)))
        self.outbox.stop(left(1.0))
        self.link.stop(left(4.0))
        self.bus_monitor.stop(left(1.0))
        if self.metrics_server is not None:
            self.metrics_server.stop(left(1.0))
        self.audit.close()
        self.clock.save()
        self.store.close(left(3.0))
        self.log_counter.detach()

    # ---- callbacks -----------------------------------------------------------------------------
    def _on_incoming(self, incoming: Any) -> None:
        self.intake.put(incoming)

    def _on_published(self, mid: int, code: int = 0) -> None:
        self.outbox.published(mid, code)
        self.collection.lane.published(mid, code)

    def _on_struck(self, mid: int) -> bool:
        """A message the broker cut connections on, dropped by the link: its publisher sets it aside and
        reports it; one sent around the store is counted here (the link logs it)."""
        if self.outbox.struck(mid) or self.collection.lane.struck(mid):
            return True
        self.metrics.publish_refused.labels(CONNECTION_DROPPED).inc()
        return False

    def _on_too_large(self, mid: int, size: int, limit: int) -> bool:
        """A message held over the limit the link learned from the broker's cuts: made smaller or set aside
        by its publisher; one sent around the store is counted here (the link logs it)."""
        if self.outbox.too_large(mid, size, limit) or self.collection.lane.too_large(mid, size, limit):
            return True
        self.metrics.publish_refused.labels("packet_too_large").inc()
        return False

    def _on_status_refused(self, code: int) -> None:
        """The broker refused the link's status message (the link logs it): counted like any refusal."""
        self.metrics.publish_refused.labels(reason_name(code)).inc()

    def _on_connection(self, up: bool) -> None:
        self.outbox.wake()
        self.collection.lane.wake()

    def _on_plan(self, name: str, payload: bytes, ack: Callable[[], None]) -> None:
        self.collection.submit_plan(name, payload, ack)

    def _on_refused(self, refusal: Refusal) -> None:
        """A message the broker will never take was set aside: counted, and reported as an Event
        (unless it was an event itself: that could only be refused again)."""
        self.metrics.publish_refused.labels(refusal.reason).inc()
        message = refusal.message
        if message.topic == self.topics.events:
            return
        details = {"reason_code": f"0x{refusal.code:02X}"} if refusal.code is not None else {}
        if message.command_id is not None:
            details["command_id"] = message.command_id
        self._publish_event("publish_refused", topic=message.topic, reason=refusal.reason,
                            bytes=len(message.payload), **details)

    def _on_probe(self, component: str, answered: bool) -> None:
        self.metrics.reachable.labels(component).set(int(answered))

    def _count_final(self, message: dict[str, Any], duration_s: float | None = None) -> None:
        self.metrics.final(str(message.get("component", "")), str(message.get("command", "")),
                           str(message["status"]), duration_s, message.get("error"))

    def _on_store_error(self, error: StoreError) -> None:
        self.metrics.store_errors.labels(error.operation).inc()

    def _admit(self, command: Command, entry: Entry) -> None:
        started = entry.state == "started"  # intake's commit marked it started: its worker was idle
        if started:
            self._started_at_intake.add(command.id)
        self._entries[command.id] = entry
        try:
            admission = self.runtime.submit(command)
        except Exception as err:  # a bug: recorded and acknowledged, it still gets its one final, not silence
            log.exception("queueing a recorded command failed; answered failed/internal",
                          extra=command_fields(command.id, command.component, command.command))
            self._started_at_intake.discard(command.id)
            self._finish(entry, Result(command.id, command.component, command.command, Outcome.failure(
                Status.FAILED, ErrorCode.INTERNAL, f"the agent could not queue it: {type(err).__name__}"),
                command.received_at, None, self.clock.wall()))
            return
        if admission is Admission.QUEUED:
            return
        self._started_at_intake.discard(command.id)
        outcome = admission.refusal(command.component, command.command)
        assert outcome.error is not None
        log.warning("command refused: %s", outcome.error.message,
                    extra=command_fields(command.id, command.component, command.command))
        self._finish(entry, Result(command.id, command.component, command.command, outcome,
                                   command.received_at, None, self.clock.wall()))

    def _on_bus_change(self, up: bool, reason: str) -> None:
        self.bus_monitor.poke()

    def _publish_bus_state(self, interface: str, state: str, previous: str) -> None:
        """A `bus_state` event for every change the bus monitor sees (kernel state, or the bus lost)."""
        self._publish_event("bus_state", interface=interface, state=state, previous=previous)

    def _publish_event(self, kind: str, **fields: Any) -> None:
        """An event through the outbox; straight through the link while the store fails."""
        event = m.event_message(kind, self.clock.wall(), **fields, **m.clock_mark(self.clock.synchronized()))
        message = Outgoing(self.topics.events, m.encode(event))
        batch = self.store.batch()
        batch.publish(message)
        try:
            batch.commit(defer=True)
        except StoreError as err:
            log.warning("%s event not stored (%s): sent without the outbox", event["type"], err)
            self.link.publish(message)
        self.outbox.wake()


def signature_gate(config: AgentConfig, topics: Topics, on_failure: Callable[[str, bool], None],
                   known: Callable[[str], bool], clock_trusted: Callable[[], bool]) -> SignatureGate | None:
    """Intake's check of signed commands; None (and `cryptography` never imported) when none are configured.

    Raises ConfigError when a configured key cannot be loaded (or `cryptography` is missing).
    """
    if not config.security.signatures_configured:
        return None
    from agent.fleet.signed import SignatureGate  # imported only by agents that check signatures
    from agent.policy.signature import load_authenticator

    authenticator = load_authenticator(config.security, str(config.source or "config"))
    return SignatureGate(authenticator, topics, on_failure, known, config.security.failure_logs_per_minute,
                         clock_trusted=clock_trusted)
