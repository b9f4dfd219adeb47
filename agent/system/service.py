"""The daemon's parts wired together: intake -> runtime -> results -> store/outbox -> link, and recovery."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, PlatformCollector, ProcessCollector

from agent import __version__
from agent.bus.owner import BusFactory
from agent.collect.faults import FaultTracker
from agent.config.model import AgentConfig
from agent.config.reader import InvalidValueError, integer
from agent.core.runtime import Companion, Runtime
from agent.fleet.intake import Intake
from agent.fleet.link import MqttLink
from agent.fleet.outbox import Outbox
from agent.fleet.topics import Topics
from agent.metrics.busmonitor import BusMonitor
from agent.metrics.registry import AgentMetrics, AgentState
from agent.metrics.server import MetricsServer
from agent.policy.admission import Admission
from agent.store.sqlite import Batch, Entry, Outgoing, Store
from agent.system.audit import AuditTrail
from agent.wire import messages as m
from agent.wire.command import Command, ErrorCode, Outcome, Result, Status, command_fields
from agent.wire.messages import response_message
from agent.wire.parse import InvalidCommandError, UnknownComponentError, parse_command

if TYPE_CHECKING:
    from agent.fleet.signed import SignatureGate

log = logging.getLogger(__name__)

STORE_FILE = "agent.db"


class Service:
    """Everything `sovd-edge run` runs. Construct, `start()`, and `stop()` on SIGTERM."""

    def __init__(self, config: AgentConfig, bus_factory: BusFactory | None = None,
                 companions: Sequence[Companion] = ()) -> None:
        self.config = config
        self.started_at = time.time()
        self.stopped_at: float | None = None  # set when a clean stop begins: the offline status's `since`
        self.topics = Topics(config.mqtt.prefix, config.vehicle)
        gate = signature_gate(config, self.topics, lambda reason: self.metrics.auth_failure(reason),
                              known=lambda command_id: self.store.get(command_id) is not None)  # first: may refuse
        self.store = Store(config.state_dir / STORE_FILE)
        self.faults = FaultTracker(self.store, {e.name: dict(e.dtc_texts) for e in config.ecus},
                                   on_problem=lambda reason: self.fault_problems.labels(reason).inc())
        self.runtime = Runtime(config, sink=self._on_result, on_start=self._on_start,
                               bus_factory=bus_factory, companions=companions,
                               on_bus_change=self._on_bus_change, on_probe=self._on_probe)
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.fault_problems = Counter("sovd_fault_tracking_problems", "Fault reading entries the fault-change "
                                      "tracker skipped: unreadable, or DTCs over its bound.", ["reason"],
                                      registry=self.registry)
        for reason in ("unreadable", "over_bound"):
            self.fault_problems.labels(reason)
        self.metrics = AgentMetrics(self.registry, config.vehicle, [e.name for e in config.ecus],
                                    state=self._metrics_state)
        self.metrics_server = MetricsServer(config.metrics, self.registry) if config.metrics.enabled else None
        self.bus_monitor = BusMonitor(config.bus, self.runtime.owner, config.metrics.bus_state_interval_s,
                                      on_change=self._publish_bus_state)
        self.link = MqttLink(config.mqtt, self.topics, config.mqtt.client_id or f"sovd-edge-{config.vehicle}",
                             status=self._status, on_command=self._on_incoming, on_published=self._on_published,
                             on_connection=self._on_connection)
        self.outbox = Outbox(self.store, config.store, self.link.publish, lambda: self.link.connected)
        self.audit = AuditTrail(config, self.topics, self.store.get, on_error=self.metrics.audit_errors.inc,
                                on_damage=lambda damage: self.metrics.audit_damaged.inc())
        self.intake = Intake(config, self.store, self.topics, self.link.ack, self._admit, self.outbox.wake,
                             self.runtime.check, on_final=self._count_final,
                             on_rejected=lambda reason: self.metrics.rejected.labels(reason).inc(),
                             authenticate=gate)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, wait: float = 1.0) -> bool:
        """Starts every part; True when the CAN bus is up (the broker may still be unreachable)."""
        if self.metrics_server is not None:
            self.metrics_server.start()
        batch = self.store.batch()
        self.audit.open(batch)
        batch.commit()
        requeue = self._recover()
        bus_up = self.runtime.start(wait)
        self.bus_monitor.start()
        self.outbox.start()
        self.intake.start()
        for command, entry in requeue:
            self._admit(command, entry)
        self.link.start()
        return bus_up

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking commands, let in-flight ones finish, flush what the broker takes, go offline."""
        self.stopped_at = time.time()
        self.intake.stop()
        self.runtime.stop(grace)  # queued-but-unrun commands stay 'queued' and run after a restart
        if self.link.connected:
            self.outbox.flush(min(grace, 3.0))
        self.outbox.stop()
        self.link.stop()
        self.bus_monitor.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.audit.close()
        self.store.close()

    def health(self) -> list[str]:
        """What is wrong right now (empty: healthy). The watchdog pings only while this is empty.

        A worker counts as wedged once its command runs past the longest deadline any command can
        have, plus the waits a transaction may add after it (P2*, a flow-control timeout).
        """
        now = time.monotonic()
        problems = [f"{name} thread died" for name, alive in self.threads_alive().items() if not alive]
        beats = {"mqtt": (self.link.heartbeat, 10.0), "intake": (self.intake.heartbeat, 15.0),
                 "outbox": (self.outbox.heartbeat, 10.0), "can-supervisor": (self.runtime.owner.heartbeat, 10.0),
                 "bus-monitor": (self.bus_monitor.heartbeat, self.config.metrics.bus_state_interval_s + 10.0)}
        problems += [f"{name} silent for {now - beat:.0f} s" for name, (beat, limit) in beats.items()
                     if now - beat > limit]
        for name, worker in self.runtime.workers.items():
            if not worker.alive:
                problems.append(f"worker {name} died")
            elif worker.busy_since is not None and now - worker.busy_since > self.wedge_limit_s(worker.ecu.name):
                problems.append(f"worker {name} wedged for {now - worker.busy_since:.0f} s")
        return problems

    def wedge_limit_s(self, component: str) -> float:
        ecu = self.config.ecu(component)
        assert ecu is not None
        longest = max(self.config.max_command_timeout_ms, ecu.timing.request_ms) / 1000
        return longest + ecu.timing.p2_star_ms / 1000 + 5.0

    def status_line(self) -> str:
        """The one-line STATUS= systemd shows."""
        pending, _ = self.store.outbox_stats()
        queued = sum(w.depth for w in self.runtime.workers.values())
        link = "connected to broker" if self.link.connected else f"broker unreachable ({self.link.last_error})"
        bus = "bus up" if self.runtime.owner.is_up else f"bus down ({self.runtime.owner.last_error})"
        return f"{link}; {bus}; {queued} queued; outbox {pending}"

    def threads_alive(self) -> dict[str, bool]:
        return {"intake": self.intake.alive, "outbox": self.outbox.alive, "mqtt": self.link.alive,
                "bus-monitor": self.bus_monitor.alive, "can-supervisor": self.runtime.owner.supervisor_alive}

    # ---- callbacks -----------------------------------------------------------------------------
    def _status(self, state: str) -> bytes:
        """The status the link publishes: online, the offline one of a clean stop, or the Last Will (built
        when the link is made, before any stop: it can only carry the start time)."""
        names = [e.name for e in self.config.ecus]
        if state == "online":
            return m.encode(m.online_status(self.config.vehicle, names, self.started_at))
        if self.stopped_at is None:
            return m.encode(m.last_will(self.config.vehicle, names, self.started_at))
        return m.encode(m.offline_status(self.config.vehicle, names, self.stopped_at))

    def _on_incoming(self, incoming: Any) -> None:
        self.intake.put(incoming)

    def _on_published(self, mid: int) -> None:
        self.outbox.published(mid)

    def _on_connection(self, up: bool) -> None:
        self.outbox.wake()

    def _on_probe(self, component: str, answered: bool) -> None:
        self.metrics.reachable.labels(component).set(int(answered))

    def _count_final(self, message: dict[str, Any], duration_s: float | None = None) -> None:
        self.metrics.final(str(message.get("component", "")), str(message.get("command", "")),
                           str(message["status"]), duration_s, message.get("error"))

    def _metrics_state(self) -> AgentState:
        pending, oldest = self.store.outbox_stats()
        stats = self.link.stats
        workers = self.runtime.workers.values()
        return AgentState(
            queue_depth={w.ecu.name: w.depth for w in workers},
            in_flight=sum(1 for w in workers if w.in_flight is not None),
            mqtt_connected=self.link.connected, mqtt_reconnects=stats.reconnects, mqtt_received=stats.messages_in,
            mqtt_sent=stats.messages_out, mqtt_callback_errors=stats.callback_errors,
            outbox_pending=pending, outbox_oldest_age_s=max(0.0, time.time() - oldest) if oldest else 0.0,
            outbox_dropped=self.outbox.dropped, bus=self.bus_monitor.reading,
        )

    def _admit(self, command: Command, entry: Entry) -> None:
        admission = self.runtime.submit(command)
        if admission is Admission.QUEUED:
            return
        outcome = admission.refusal(command.component, command.command)
        self._finish(entry, Result(command.id, command.component, command.command, outcome,
                                   command.received_at, None, time.time()))

    def _on_start(self, command: Command) -> None:
        batch = self.store.batch()
        self.audit.started(command, batch)  # a mutating command's record is on the disk before it runs
        batch.set_state(command.id, "started")
        batch.commit()

    def _on_result(self, result: Result) -> None:
        entry = self.store.get(result.command_id)
        if entry is None:
            log.error("result for a command missing from the ledger",
                      extra=command_fields(result.command_id, result.component, result.command))
            return
        self._finish(entry, result)

    def _finish(self, entry: Entry, result: Result) -> None:
        final = response_message(result, seq=entry.seq + 1)
        pieces = m.split_result(final, self.config.mqtt.max_payload_bytes)
        batch = self.store.batch()
        observed = self._observe_faults(entry, result, batch)  # before the response: a backend that has the
        for message in pieces:                                  # answer has heard of the changes it shows
            batch.publish(Outgoing(entry.reply_topic, m.encode(message), entry.correlation, entry.id))
        self.audit.finished(entry, result, batch)
        batch.set_state(entry.id, "final", seq=pieces[-1]["seq"], final_message=final)
        try:
            batch.commit()
        except Exception:
            if observed:
                self.faults.forget(result.component)  # not stored: the next reading reports the changes again
            raise
        self.outbox.wake()
        duration = result.finished_at - result.started_at if result.started_at is not None else None
        self._count_final(final, duration)
        if len(pieces) > 1:
            self.metrics.chunks.inc(len(pieces) - 1)

    def _observe_faults(self, entry: Entry, result: Result, batch: Batch) -> bool:
        """A completed `read_faults`: its fault_changed Events and the component's new fault set into `batch`.

        A failure here is logged and leaves the response alone. True when the tracker was asked.
        """
        faults = result.outcome.result.get("faults") if result.outcome.result else None
        if result.command != "read_faults" or result.status is not Status.COMPLETED or not isinstance(faults, list):
            return False
        params = entry.body.get("params")
        raw_mask = params.get("status_mask", 0xFF) if isinstance(params, dict) else 0xFF
        try:
            mask = integer(0, 0xFF)(raw_mask)
        except InvalidValueError:
            mask = 0x00  # cannot happen for a parsed command; and a reading of unknown mask clears nothing
        try:
            for event in self.faults.observe(result.component, faults, status_mask=mask, batch=batch):
                batch.publish(Outgoing(self.topics.events, m.encode(event)))
        except Exception:
            log.exception("fault changes of %s not compared", result.component,
                          extra=command_fields(result.command_id, result.component, result.command))
        return True

    def _on_bus_change(self, up: bool, reason: str) -> None:
        self.bus_monitor.poke()

    def _publish_bus_state(self, interface: str, state: str, previous: str) -> None:
        """A `bus_state` event for every change the bus monitor sees (kernel state, or the bus lost)."""
        event = m.event_message("bus_state", time.time(), interface=interface, state=state, previous=previous)
        batch = self.store.batch()
        batch.publish(Outgoing(self.topics.events, m.encode(event)))
        batch.commit()
        self.outbox.wake()

    # ---- restart recovery ----------------------------------------------------------------------
    def _recover(self) -> list[tuple[Command, Entry]]:
        """Started-but-unfinished commands get `interrupted` (never re-run); queued ones run again."""
        interrupted = self.store.entries("started")
        for entry in interrupted:
            self._finish(entry, _never_ran(entry, Outcome.failure(
                Status.INTERRUPTED, ErrorCode.INTERRUPTED,
                "the agent stopped while this command ran; it was not run again")))
        ids = [e.id for e in interrupted]
        event = m.event_message("agent_started", time.time(), interrupted=ids, agent_version=__version__)
        batch = self.store.batch()
        batch.publish(Outgoing(self.topics.events, m.encode(event)))
        batch.commit()
        if ids:
            log.warning("%d commands were interrupted by the last stop", len(ids), extra={"ids": ids})
        return [pair for pair in (self._reparse(e) for e in self.store.entries("queued")) if pair is not None]

    def _reparse(self, entry: Entry) -> tuple[Command, Entry] | None:
        try:
            command = parse_command(entry.body, self.config, entry.received_at)
        except (InvalidCommandError, UnknownComponentError) as err:
            self._finish(entry, _never_ran(entry, refusal_outcome(err)))
            return None
        return dataclasses.replace(command, expires_at=entry.expires_at, correlation_data=entry.correlation), entry


def signature_gate(config: AgentConfig, topics: Topics, on_failure: Callable[[str], None],
                   known: Callable[[str], bool]) -> SignatureGate | None:
    """Intake's check of signed commands; None (and `cryptography` never imported) when none are configured.

    Raises ConfigError when a configured key cannot be loaded (or `cryptography` is missing).
    """
    if not config.security.signatures_configured:
        return None
    from agent.fleet.signed import SignatureGate  # imported only by agents that check signatures
    from agent.policy.signature import load_authenticator

    authenticator = load_authenticator(config.security, str(config.source or "config"))
    return SignatureGate(authenticator, topics, on_failure, known, config.security.failure_logs_per_minute)


def _never_ran(entry: Entry, outcome: Outcome) -> Result:
    """The result of a recorded command that ends without running, as its final response reports it."""
    return Result(entry.id, str(entry.body.get("component", "")), str(entry.body.get("command", "")),
                  outcome, entry.received_at, None, time.time())


def refusal_outcome(err: Exception) -> Outcome:
    if isinstance(err, UnknownComponentError):
        return Outcome.failure(Status.FAILED, ErrorCode.UNKNOWN_COMPONENT, str(err))
    return Outcome.failure(Status.REJECTED, ErrorCode.INVALID_COMMAND, f"invalid after a config change: {err}")
