"""Collection wired to the daemon: plans from MQTT and config, telemetry into its durable lane, state,
events through the outbox, metrics, and the fault tracker's events."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from agent.collect.collector import Collector, FaultSink
from agent.collect.faults import FaultTracker
from agent.config.model import AgentConfig
from agent.core.runtime import Runtime
from agent.fleet.lane import TelemetryLane
from agent.fleet.refusals import Refusal
from agent.fleet.topics import Topics
from agent.metrics.collection import CollectionMetrics
from agent.store.collection import CollectionStore
from agent.store.sqlite import Outgoing, Store
from agent.wire import messages as m

log = logging.getLogger(__name__)


def payload_limit(config: AgentConfig, broker_limit: Callable[[str], int | None], topic: str,
                  reserve: int = m.MARK_BYTES) -> int:
    """The largest payload collection may hand over for `topic`: the configured limit, or the broker's
    announced maximum packet size less the topic and properties when that is smaller, less `reserve`
    (by default room for the clock mark, which is added afterwards)."""
    limits = [config.mqtt.max_payload_bytes]
    if (broker := broker_limit(topic)) is not None:
        limits.append(broker)
    return min(limits) - reserve


class CollectionOutput:
    """Collection's Output: telemetry into the bounded lane, state into its table, events into the outbox.
    Each message carries the clock mark (`"clock": "unsynchronized"` while the device clock is not known
    to be right), as responses do: its sample timestamps may then be far off."""

    def __init__(self, config: AgentConfig, store: Store, tables: CollectionStore, topics: Topics,
                 metrics: CollectionMetrics, wake_lane: Callable[[], None], wake_outbox: Callable[[], None],
                 clock_mark: Callable[[], dict[str, Any]] = dict) -> None:
        self._clock_mark = clock_mark
        self._config = config
        self._store = store
        self._tables = tables
        self._topics = topics
        self._metrics = metrics
        self._wake_lane = wake_lane
        self._wake_outbox = wake_outbox

    def telemetry(self, plan: str, seq: int, message: dict[str, Any]) -> None:
        limit = self._config.collect.telemetry_max_bytes
        try:
            dropped = self._tables.add_telemetry(self._topics.telemetry, m.encode({**message, **self._clock_mark()}),
                                                 plan, seq, limit)
        except Exception:  # logged by the collector (the store also counts its own errors)
            self._metrics.telemetry_dropped.labels("not_stored").inc()
            raise
        if dropped:
            self._metrics.telemetry_dropped.labels("bound").inc(dropped)
            log.warning("telemetry over its byte bound: dropped the %d oldest batches", dropped,
                        extra={"max_bytes": limit, "plan": plan})
        self._wake_lane()

    def states(self, states: list[tuple[str, dict[str, Any]]]) -> None:
        mark = self._clock_mark()
        self._tables.put_states([(c, self._topics.state(c), m.encode({**message, **mark})) for c, message in states])
        self._wake_lane()

    def fault_events(self, tracker: FaultTracker, clock_mark: Callable[[], dict[str, Any]]) -> FaultSink:
        """The collector's fault sink: the tracker's new fault set and its `fault_changed` Events are
        committed in one transaction (both or neither: a crash between them would lose the Events). When that
        commit fails, the tracker forgets the set it took as known: the next reading is compared with the
        stored one, and the changes not stored are reported then."""
        def sink(component: str, faults: list[dict[str, Any]], status_mask: int) -> list[dict[str, Any]]:
            batch = self._store.batch()
            try:
                for event in tracker.observe(component, faults, status_mask=status_mask, batch=batch):
                    batch.publish(Outgoing(self._topics.events, m.encode({**event, **clock_mark()})))
                batch.commit()
            except Exception:
                tracker.forget(component)
                raise  # logged by the collector
            self._wake_outbox()
            return []  # published here, with the set

        return sink

    def event(self, message: dict[str, Any]) -> None:
        batch = self._store.batch()
        batch.publish(Outgoing(self._topics.events, m.encode({**message, **self._clock_mark()})))
        batch.commit()
        self._wake_outbox()


class Collection:
    """Collection's parts as the daemon runs them: metrics, tables, output, the telemetry lane, the collector."""

    def __init__(self, config: AgentConfig, store: Store, runtime: Runtime, topics: Topics, registry: Any,
                 publish: Callable[[Outgoing, Callable[[int], None]], int | None], connected: Callable[[], bool],
                 wake_outbox: Callable[[], None], on_reachable: Callable[[str, bool], None],
                 faults: FaultTracker | None = None, clock_mark: Callable[[], dict[str, Any]] = dict,
                 wall: Callable[[], float] = time.time,
                 broker_limit: Callable[[str], int | None] = lambda topic: None,
                 on_refused: Callable[[Refusal], None] = lambda refusal: None) -> None:
        self.metrics = CollectionMetrics(registry, [e.name for e in config.ecus])
        self.tables = CollectionStore(store)
        self.lane = TelemetryLane(self.tables, publish, connected, wake_outbox,
                                  limit=lambda topic: payload_limit(config, broker_limit, topic, reserve=0),
                                  on_oversize=lambda component, how: self.metrics.state_oversize.labels(
                                      component, how).inc(), on_refused=on_refused)
        self.output = CollectionOutput(config, store, self.tables, topics, self.metrics, self.lane.wake, wake_outbox,
                                       clock_mark)
        fault_sink = self.output.fault_events(faults, clock_mark) if faults is not None else None
        self.collector = Collector(config, runtime.workers, self.output, self.metrics, self.tables,
                                   fault_sink=fault_sink, on_reachable=on_reachable, bus=runtime.owner, wall=wall,
                                   payload_limit=lambda: payload_limit(config, broker_limit, topics.telemetry))

    def start(self) -> None:
        self.lane.start()
        self.collector.start()

    def stop(self, timeout: float = 6.0) -> None:
        """Stops the collector, then the lane; `timeout` bounds both joins together."""
        end = time.monotonic() + timeout
        self.collector.stop(timeout / 2)  # its last open batches go into the lane, which keeps them for the next start
        self.lane.stop(max(0.0, end - time.monotonic()))

    def submit_plan(self, name: str, payload: bytes, ack: Callable[[], None] = lambda: None) -> None:
        self.collector.submit_plan(name, payload, ack)

    def threads_alive(self) -> dict[str, bool]:
        return {"collector": self.collector.alive, "telemetry-lane": self.lane.alive}
