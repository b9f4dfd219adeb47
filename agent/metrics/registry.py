"""The agent's metrics. Event metrics are counted as things happen; state is read at scrape time.

Label values come from bounded sets only: component names from the config, command names from the
protocol, statuses, NRC bytes. A component or command that is not in those sets is "unknown".
Never a command id, DTC or free text as a label.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.registry import Collector

from agent import __version__
from agent.bus.canstate import STATES
from agent.bus.monitor import BusReading
from agent.config.model import ALL_COMMANDS
from agent.wire.command import AuthFailure, ErrorCode

log = logging.getLogger(__name__)

# UDS round trips: 1 ms (a local read) to 30 s (long routines behind NRC 0x78).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STORE_OPERATIONS = ("open", "read", "write", "acknowledge", "maintain")
STORE_RECOVERY_REASONS = ("unreadable", "damaged", "torn_wal", "vanished")
INTAKE_STAGES = ("decide", "record", "acknowledge", "settle", "group", "release")
# Why a command message was refused before execution: the codes of a `rejected` final, and the intake's
# own reasons for messages that never became a command (or repeated one).
REJECTION_REASONS = (*(str(code) for code in (
    ErrorCode.INVALID_COMMAND, ErrorCode.UNKNOWN_COMPONENT, ErrorCode.NOT_PERMITTED, ErrorCode.BUSY,
    ErrorCode.STORAGE_UNAVAILABLE, ErrorCode.CLOCK_UNSYNCHRONIZED, ErrorCode.UNAUTHENTICATED, ErrorCode.INTERNAL)),
    "undecodable", "bad_id", "retained", "duplicate", "duplicate_in_flight")


@dataclass(frozen=True)
class AgentState:
    """What the agent's parts hold right now; built by the service at scrape time."""

    queue_depth: dict[str, int] = field(default_factory=dict)
    answers_discarded: dict[str, int] = field(default_factory=dict)  # per component, since start
    in_flight: int = 0
    mqtt_connected: bool = False
    mqtt_reconnects: int = 0
    mqtt_received: int = 0
    mqtt_sent: int = 0
    mqtt_callback_errors: int = 0
    mqtt_refused: dict[str, int] = field(default_factory=dict)  # CONNACK refusals by reason
    mqtt_takeovers: int = 0
    mqtt_stray: int = 0
    mqtt_oversize: int = 0
    outbox_pending: int = 0
    outbox_oldest_age_s: float = 0.0
    outbox_dropped: int = 0
    ledger_dropped: int = 0
    ledger_held_bytes: int = 0
    ledger_max_bytes: int = 0
    store_available: bool = True
    store_deferred: int = 0
    store_deferred_dropped: int = 0
    bus: BusReading | None = None


class AgentMetrics:
    """Creates every metric on `registry` (tests pass a fresh one) and records events."""

    def __init__(self, registry: CollectorRegistry, vehicle: str, components: list[str],
                 state: Callable[[], AgentState] | None = None, refusal_reasons: Iterable[str] = ()) -> None:
        """`refusal_reasons`: the label values of sovd_publish_refused_total, there at 0 from the start
        (the fleet layer names them; this package does not import it)."""
        self.registry = registry
        self.components = set(components)
        self.executed = Counter("commands_executed", "Commands finished, by final protocol status.",
                                ["status", "command", "component"], registry=registry)
        self.duration = Histogram("command_execution_duration_seconds",
                                  "Time from a command's start to its end (the UDS round trips).",
                                  ["command", "component"], buckets=DURATION_BUCKETS, registry=registry)
        self.timeouts = Counter("sovd_command_timeout", "Commands that ended in a timeout.", ["component"],
                                registry=registry)
        self.chunks = Counter("sovd_response_chunks", "Chunk messages (status running) sent for large results.",
                              registry=registry)
        self.negative = Counter("sovd_negative_responses", "UDS negative responses, by service and NRC.",
                                ["component", "service", "nrc"], registry=registry)
        self.rejected = Counter("sovd_rejected_messages",
                                "Command messages refused before execution, by reason.", ["reason"],
                                registry=registry)
        self.auth_failures = Counter("sovd_authentication_failures",
                                     "Command messages that failed authentication (signed commands), by reason.",
                                     ["reason"], registry=registry)
        for reason in AuthFailure:
            self.auth_failures.labels(str(reason))
        self.audit_damaged = Counter("sovd_audit_log_damaged",
                                     "Damaged last lines found in the audit log at start (power lost mid-write).",
                                     registry=registry)
        self.audit_errors = Counter("sovd_audit_log_write_errors", "Audit records that could not be written.",
                                    registry=registry)
        self.audit_lost = Counter("sovd_audit_log_lost", "Audit files found deleted or replaced while the agent "
                                  "had them open (a fresh file was opened), by how.", ["how"], registry=registry)
        for how in ("deleted", "replaced"):
            self.audit_lost.labels(how)
        self.publish_refused = Counter("sovd_publish_refused",
                                       "Messages the broker refused for good (PUBACK reason code), set aside.",
                                       ["reason"], registry=registry)
        for reason in refusal_reasons:
            self.publish_refused.labels(reason)
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        self.reachable = Gauge("sovd_ecu_reachable", "1 if the component answered its last request or probe.",
                               ["component"], registry=registry)
        self.store_errors = Counter("sovd_store_errors", "Failed operations on the durable store (SQLite).",
                                    ["operation"], registry=registry)
        self.store_recoveries = Counter("sovd_store_recoveries",
                                        "Damaged stores found at start, moved aside and replaced by empty ones.",
                                        ["reason"], registry=registry)
        self.finish_errors = Counter("sovd_finish_errors",
                                     "Unexpected exceptions building a command's final response; the command is "
                                     "answered failed/internal instead.", registry=registry)
        self.intake_errors = Counter("sovd_intake_errors",
                                     "Unexpected exceptions on one command message (each refused alone), by stage.",
                                     ["stage"], registry=registry)
        self.fault_problems = Counter("sovd_fault_tracking_problems", "Fault reading entries the fault-change "
                                      "tracker skipped: unreadable, or DTCs over its bound.", ["reason"],
                                      registry=registry)
        for reason in ("unreadable", "over_bound"):
            self.fault_problems.labels(reason)
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)
        for reason in STORE_RECOVERY_REASONS:
            self.store_recoveries.labels(reason)
        for stage in INTAKE_STAGES:
            self.intake_errors.labels(stage)
        Info("sovd_build", "Agent version and vehicle.", registry=registry).info(
            {"version": __version__, "vehicle": vehicle})
        for component in components:
            self.timeouts.labels(component)
            for command in ALL_COMMANDS:
                self.executed.labels("completed", command, component)
        if state is not None:
            registry.register(StateCollector(state))

    def auth_failure(self, reason: str, rejected: bool = True) -> None:
        """A message failed authentication: counted by reason, and as a rejected message unless it is counted
        as one elsewhere (`rejected` False: one without an id, counted with its invalid_message event)."""
        self.auth_failures.labels(reason if reason in set(AuthFailure) else "unknown").inc()
        if rejected:
            self.rejected.labels("unauthenticated").inc()

    def label_component(self, component: str) -> str:
        return component if component in self.components else "unknown"

    def final(self, component: str, command: str, status: str, duration_s: float | None,
              error: dict[str, object] | None = None) -> None:
        """One command reached its final status."""
        component = self.label_component(component)
        command = command if command in ALL_COMMANDS else "unknown"
        self.executed.labels(status, command, component).inc()
        if duration_s is not None:
            self.duration.labels(command, component).observe(duration_s)
        if status == "timeout":
            self.timeouts.labels(component).inc()
        code = (error or {}).get("code")
        if code == "negative_response":
            self.negative.labels(component, str((error or {}).get("service", "unknown")),
                                 str((error or {}).get("nrc", "unknown"))).inc()
        if status == "rejected" and code:
            self.rejected.labels(str(code)).inc()
        if component != "unknown" and status in ("completed", "failed", "timeout"):
            self.reachable.labels(component).set(0 if status == "timeout" or code == "bus_error" else 1)


class StateCollector(Collector):
    """Reads the agent's state at scrape time; a failure drops these series for one scrape, never the scrape.
    Its traceback is logged once until a scrape works again (a scrape every 15 s would flood the card)."""

    def __init__(self, state: Callable[[], AgentState]) -> None:
        self._state = state
        self._failing = False

    def collect(self) -> Iterator[Metric]:
        try:  # built whole before the first is yielded: a failure half way must not fail the scrape either
            families = list(self._families(self._state()))
        except Exception:
            if self._failing:
                log.debug("metrics: reading the agent state failed again", exc_info=True)
            else:
                log.exception("metrics: reading the agent state failed (logged once until it works again)")
            self._failing = True
            return
        self._failing = False
        yield from families

    @staticmethod
    def _families(s: AgentState) -> Iterator[Metric]:
        depth = GaugeMetricFamily("sovd_command_queue_depth", "Commands waiting per component.", labels=["component"])
        for component, value in sorted(s.queue_depth.items()):
            depth.add_metric([component], value)
        yield depth
        discarded = CounterMetricFamily("sovd_uds_answers_discarded", "ECU answers discarded as not for the request "
                                        "they came during (a late answer, another tester's, a wrong echo).",
                                        labels=["component"])
        for component, value in sorted(s.answers_discarded.items()):
            discarded.add_metric([component], value)
        yield discarded
        yield GaugeMetricFamily("sovd_commands_in_flight", "Commands executing now.", value=s.in_flight)
        yield GaugeMetricFamily("sovd_mqtt_connected", "1 while connected to the broker.", value=int(s.mqtt_connected))
        yield CounterMetricFamily("sovd_mqtt_reconnects", "Reconnection attempts to the broker.",
                                  value=s.mqtt_reconnects)
        yield CounterMetricFamily("sovd_mqtt_messages_received", "MQTT messages received.", value=s.mqtt_received)
        yield CounterMetricFamily("sovd_mqtt_messages_sent", "MQTT messages handed to the client.", value=s.mqtt_sent)
        yield CounterMetricFamily("sovd_mqtt_callback_errors", "Exceptions caught in MQTT callbacks.",
                                  value=s.mqtt_callback_errors)
        refused = CounterMetricFamily("sovd_mqtt_connections_refused", "Connections the broker refused (CONNACK "
                                      "reason code), by reason.", labels=["reason"])
        for reason, value in sorted(s.mqtt_refused.items()):
            refused.add_metric([reason], value)
        yield refused
        yield CounterMetricFamily("sovd_mqtt_session_takeovers", "Connections lost to another client with the "
                                  "agent's client id (said by the broker, or judged from repeated early cuts).",
                                  value=s.mqtt_takeovers)
        yield CounterMetricFamily("sovd_mqtt_stray_messages", "Messages on topics the agent no longer subscribes "
                                  "to (left in its session by an earlier configuration), ignored.",
                                  value=s.mqtt_stray)
        yield CounterMetricFamily("sovd_mqtt_oversize_packets", "Incoming packets over the size the agent takes, "
                                  "cut to their head as they were read.", value=s.mqtt_oversize)
        yield GaugeMetricFamily("sovd_outbox_pending_messages", "Messages waiting for the broker's PUBACK.",
                                value=s.outbox_pending)
        yield GaugeMetricFamily("sovd_outbox_oldest_pending_age_seconds", "Age of the oldest message in the outbox.",
                                value=s.outbox_oldest_age_s)
        yield CounterMetricFamily("sovd_outbox_dropped", "Messages dropped from the outbox by its bounds.",
                                  value=s.outbox_dropped)
        yield CounterMetricFamily("sovd_ledger_dropped",
                                  "Finished command ids forgotten before their retention time (ledger byte bound).",
                                  value=s.ledger_dropped)
        yield GaugeMetricFamily("sovd_ledger_held_bytes",
                                "Ledger bytes the byte bound may not forget at its last pass: unfinished commands "
                                "and commands that ran and could still be accepted (before their expires_at).",
                                value=s.ledger_held_bytes)
        yield GaugeMetricFamily("sovd_ledger_over_bound",
                                "1 while what the ledger must hold alone exceeds store.ledger_max_bytes.",
                                value=int(s.ledger_held_bytes > s.ledger_max_bytes > 0))
        yield GaugeMetricFamily("sovd_store_available", "1 while the durable store takes writes.",
                                value=int(s.store_available))
        yield GaugeMetricFamily("sovd_store_deferred_writes",
                                "Writes held in memory until the store takes writes again.", value=s.store_deferred)
        yield CounterMetricFamily("sovd_store_deferred_dropped",
                                  "Writes held in memory while the store failed that were dropped, lost for good: "
                                  "beyond the in-memory bound, or refused for their own data when replayed.",
                                  value=s.store_deferred_dropped)
        if s.bus is not None:
            yield from _bus_metrics(s.bus)


def _bus_metrics(b: BusReading) -> Iterator[Metric]:
    state = StateSetMetricFamily("sovd_can_bus_state", "CAN controller state.", labels=["interface"])
    state.add_metric([b.interface], {name: name == b.state for name in STATES})
    yield state
    errors = GaugeMetricFamily("sovd_can_bus_error_counter", "CAN transmit/receive error counters (TEC/REC).",
                               labels=["interface", "direction"])
    for direction, value in (("tx", b.tx_errors), ("rx", b.rx_errors)):
        if value is not None:
            errors.add_metric([b.interface, direction], value)
    yield errors
    yield _counter("sovd_can_bus_off", "Times the controller went bus-off.", b.interface, b.bus_off)
    yield _counter("sovd_can_restarts", "Controller restarts after bus-off.", b.interface, b.restarts)
    yield _counter("sovd_can_bus_rebuilds", "Times the agent rebuilt its bus connection.", b.interface, b.rebuilds)
    yield _counter("sovd_can_send_errors", "Failed attempts to send a frame (one is retried; a second in a row "
                   "rebuilds the bus) or, on kernel ISO-TP, a PDU (its socket is opened again).", b.interface,
                   b.send_errors)
    yield _counter("sovd_can_receive_errors", "Receive failures that stopped the agent's CAN reader (the bus is "
                   "rebuilt) or a kernel ISO-TP socket (opened again).", b.interface, b.recv_errors)
    yield _counter("sovd_can_frames_dropped", "Frames for an ISO-TP link dropped because its queue was full (a "
                   "transfer broken under its command).", b.interface, b.frames_dropped)
    yield _counter("sovd_can_handler_errors", "Exceptions the agent's own frame handlers raised (a bug: the frame is "
                   "lost to that handler, the bus carries on; the first of each handler is logged).", b.interface,
                   b.handler_errors)
    frames = CounterMetricFamily("sovd_can_frames", "CAN frames.", labels=["interface", "direction"])
    frames.add_metric([b.interface, "rx"], b.rx_frames)
    frames.add_metric([b.interface, "tx"], b.tx_frames)
    yield frames
    octets = CounterMetricFamily("sovd_can_bytes", "CAN payload bytes.", labels=["interface", "direction"])
    octets.add_metric([b.interface, "rx"], b.rx_bytes)
    octets.add_metric([b.interface, "tx"], b.tx_bytes)
    yield octets
    if b.load is not None:
        load = GaugeMetricFamily("sovd_can_bus_load_ratio", "Estimated share of bit time used (0..1).",
                                 labels=["interface"])
        load.add_metric([b.interface], b.load)
        yield load


def _counter(name: str, doc: str, interface: str, value: int) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=["interface"])
    family.add_metric([interface], value)
    return family
