"""What the running agent says about itself: health and wedge checks (watchdog), the STATUS= line, the
retained online/offline status, the metrics' state figures. Part of `Service` (it inherits this and owns
the parts read here); kept apart because reporting on the daemon is one job and wiring it another.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from agent.fleet.lane import QUIET_S as LANE_QUIET_S
from agent.fleet.link import CONNECT_LIMIT_S
from agent.metrics.registry import AgentState
from agent.store.sqlite import StoreError
from agent.wire import messages as m

if TYPE_CHECKING:
    from agent.bus.monitor import BusMonitor
    from agent.clock import Clock
    from agent.config.model import AgentConfig
    from agent.core.runtime import Runtime
    from agent.fleet.intake import Intake
    from agent.fleet.link import MqttLink
    from agent.fleet.outbox import Outbox
    from agent.metrics.server import MetricsServer
    from agent.store.sqlite import Store
    from agent.system.audit import AuditTrail
    from agent.system.collection import Collection

DISPATCH_STUCK_S = 5.0


class ServiceHealth:
    """Read-only views of the service's parts; none of these changes what the agent does."""

    # what Service owns and these methods read (set in its constructor)
    config: AgentConfig
    clock: Clock
    store: Store
    audit: AuditTrail
    intake: Intake
    outbox: Outbox
    link: MqttLink
    runtime: Runtime
    bus_monitor: BusMonitor
    collection: Collection
    metrics_server: MetricsServer | None
    started_at: float
    stopped_at: float | None
    _outbox_seen: tuple[int, float | None]

    def health(self) -> list[str]:
        """What is wrong right now (empty: healthy): what `wedged` finds, a store that fails, and an audit
        log that cannot be written (neither is cured by a restart, so neither is in `wedged`)."""
        problems = self.wedged()
        trouble = self.store.trouble
        if trouble is not None:  # no running duration in the text: STATUS= changes only when health does
            problems.append(f"store unavailable ({trouble.operation}: {trouble.error}); "
                            "commands are refused storage_unavailable")
        if self.audit.trouble is not None:
            problems.append(f"audit log unavailable ({self.audit.trouble}); mutating commands are refused "
                            "storage_unavailable")
        return problems

    def wedged(self) -> list[str]:
        """What a restart would cure. The watchdog pings only while this is empty; a failing store is not
        in it (a restart would not free the disk: commands are refused `storage_unavailable` meanwhile),
        except a database file (or its WAL) deleted or replaced under the agent, or one SQLite found damaged:
        nothing mends it while it runs, and a restart's recovery checks it and, where it must, opens a fresh
        store (reported `store_recovered`, agent/store/recovery.py).

        A worker counts as wedged once its command runs past the longest deadline any command can
        have, plus the waits a transaction may add after it (P2*, a flow-control timeout). The MQTT loop
        thread blocked in one connect attempt (name lookup, TCP, TLS: a broker outage) is not silent; an
        attempt longer than any of those can take (CONNECT_LIMIT_S) is a wedge. So is the CAN notifier
        thread inside one frame's handlers for DISPATCH_STUCK_S: they only queue the frame.
        """
        now = time.monotonic()
        problems = [f"{name} thread died" for name, alive in self.threads_alive().items() if not alive]
        trouble = self.store.trouble
        if trouble is not None and "SQLITE_READONLY_DBMOVED" in trouble.error:
            problems.append(f"store file deleted or replaced ({self.store.path})")
        elif self.store.damaged is not None:
            problems.append(f"store damaged ({self.store.path}: {self.store.damaged})")
        connecting = self.link.connecting_since  # read before the heartbeat: the link writes them the other way
        if connecting is not None and now - connecting > CONNECT_LIMIT_S:
            problems.append(f"mqtt connecting for {now - connecting:.0f} s")
        beats = {"mqtt": (self.link.heartbeat if connecting is None else now, 10.0),  # a connect is no silence
                 "intake": (self.intake.heartbeat, 15.0),
                 "outbox": (self.outbox.heartbeat, 10.0), "can-supervisor": (self.runtime.owner.heartbeat, 10.0),
                 "bus-monitor": (self.bus_monitor.heartbeat, self.config.metrics.bus_state_interval_s + 10.0),
                 "collector": (self.collection.collector.heartbeat, 15.0),
                 "telemetry-lane": (self.collection.lane.heartbeat, LANE_QUIET_S + 15.0)}
        problems += [f"{name} silent for {now - beat:.0f} s" for name, (beat, limit) in beats.items()
                     if now - beat > limit]
        stuck = self.runtime.owner.dispatch_stuck_s()
        if stuck > DISPATCH_STUCK_S:  # handlers only queue a frame: seconds in one is a bug, and every frame waits
            problems.append(f"CAN notifier stuck in a frame handler for {stuck:.0f} s")
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
        pending, _ = self._outbox_stats()
        queued = sum(w.depth for w in self.runtime.workers.values())
        link = "connected to broker" if self.link.connected else f"broker unreachable ({self.link.last_error})"
        bus = "bus up" if self.runtime.owner.is_up else f"bus down ({self.runtime.owner.last_error})"
        store = "" if self.store.trouble is None else "; store unavailable"
        audit = "" if self.audit.trouble is None else "; audit log unavailable"
        return f"{link}; {bus}; {queued} queued; outbox {pending}{store}{audit}"

    def _outbox_stats(self) -> tuple[int, float | None]:
        """The outbox figures; while the store fails, the last ones it gave."""
        with contextlib.suppress(StoreError):
            self._outbox_seen = self.store.outbox_stats()
        return self._outbox_seen

    def threads_alive(self) -> dict[str, bool]:
        metrics = {} if self.metrics_server is None else {"metrics-http": self.metrics_server.alive}
        return {"intake": self.intake.alive, "outbox": self.outbox.alive, "mqtt": self.link.alive,
                "store-writer": self.store.writer_alive,
                "bus-monitor": self.bus_monitor.alive, "can-supervisor": self.runtime.owner.supervisor_alive,
                **self.collection.threads_alive(), **metrics}

    def _status(self, state: str) -> bytes:
        """The status the link publishes: online, the offline one of a clean stop, or the Last Will (built
        when the link is made, before any stop: it can only carry the start time)."""
        names = [e.name for e in self.config.ecus]
        if state == "online":
            return m.encode(m.online_status(self.config.vehicle, names, self.started_at))
        if self.stopped_at is None:
            return m.encode(m.last_will(self.config.vehicle, names, self.started_at))
        return m.encode(m.offline_status(self.config.vehicle, names, self.stopped_at))

    def _metrics_state(self) -> AgentState:
        pending, oldest = self._outbox_stats()
        stats = self.link.stats
        workers = self.runtime.workers.values()
        return AgentState(
            queue_depth={w.ecu.name: w.depth for w in workers},
            answers_discarded={w.ecu.name: w.executor.discarded for w in workers},
            in_flight=sum(1 for w in workers if w.in_flight is not None),
            mqtt_connected=self.link.connected, mqtt_reconnects=stats.reconnects, mqtt_received=stats.messages_in,
            mqtt_sent=stats.messages_out, mqtt_callback_errors=stats.callback_errors,
            mqtt_refused=dict(stats.refusals), mqtt_takeovers=stats.taken_over, mqtt_stray=stats.stray,
            mqtt_oversize=stats.oversize,
            outbox_pending=pending,
            outbox_oldest_age_s=max(0.0, self.clock.agent_now() - oldest) if oldest else 0.0,
            outbox_dropped=self.outbox.dropped, ledger_dropped=self.outbox.ledger_dropped,
            ledger_held_bytes=self.outbox.ledger_held_bytes, ledger_max_bytes=self.config.store.ledger_max_bytes,
            store_available=self.store.trouble is None, store_deferred=self.store.deferred,
            store_deferred_dropped=self.store.deferred_dropped,
            bus=self.bus_monitor.current,  # none before the monitor's first read
        )
