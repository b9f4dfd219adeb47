"""The collection scheduler: one thread that applies plans, hands readings to the component workers and
turns their outcomes into telemetry, state, gauges and events.

No thread per signal: a heap of due times (agent.collect.schedule), one job at a time per component
(the worker runs it only when no command waits), a request budget per plan, a backoff per component
that stops answering, and a pause while the vehicle sleeps.

This module is the thread and its dispatch; the class takes what a plan message does from
agent.collect.plans, what a finished reading becomes from agent.collect.results, and the pause from
agent.collect.pause (one object, one thread: they share its state). Other threads reach it only through
its inbox, with the frozen hand-offs of agent.collect.handoffs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from agent.bus.owner import BusOwner, RxFilter
from agent.collect.handoffs import Handoff, Load, Mark, PlanMessage, Reading, Recheck, Stop, Wake
from agent.collect.pause import SleepHandling
from agent.collect.plans import PlanIntake
from agent.collect.results import Assembly, ResultAssembly
from agent.collect.schedule import Backoff, Budget, Schedule, Task, TaskKey
from agent.collect.sleep import TrafficWatch, diagnostic_ids
from agent.collect.telemetry import Telemetry
from agent.config.model import AgentConfig
from agent.core.worker import ComponentWorker, Job
from agent.metrics.collection import CollectionMetrics
from agent.store.collection import PlanRow
from agent.store.sqlite import StoreError
from agent.uds.executor import DEFAULT_SESSION
from agent.wire import messages as m
from agent.wire.command import Outcome
from agent.wire.plan import Plan

log = logging.getLogger(__name__)

# (component, a read_faults result's entries, the status mask it was read with) -> Events still to publish
FaultSink = Callable[[str, list[dict[str, Any]], int], list[dict[str, Any]]]
MAX_WAIT_S = 5.0  # the scheduler looks around at least this often (heartbeat)
SESSION_POLL_S = 0.25  # how often it looks whether a component is back in its default session


class Output(Protocol):
    """Where collection's messages go (the system layer: store, outbox, MQTT)."""

    def telemetry(self, plan: str, seq: int, message: dict[str, Any]) -> None: ...

    def states(self, states: list[tuple[str, dict[str, Any]]]) -> None:
        """The new state of each (component, state): all stored at once."""

    def event(self, message: dict[str, Any]) -> None: ...


class PlanBook(Protocol):
    """Durable plan storage: after a reboot without network, collection resumes as it was."""

    def load_plans(self) -> list[PlanRow]: ...

    def save_plan(self, name: str, version: int, body: dict[str, Any] | None) -> None: ...



class Collector(PlanIntake, ResultAssembly, SleepHandling):
    """Runs every applied plan. `submit_plan` may be called from any thread; the rest runs on one thread."""

    def __init__(self, config: AgentConfig, workers: Mapping[str, ComponentWorker], out: Output,
                 metrics: CollectionMetrics, book: PlanBook, fault_sink: FaultSink | None = None,
                 on_reachable: Callable[[str, bool], None] | None = None, bus: BusOwner | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 payload_limit: Callable[[], int] | None = None) -> None:
        self.config = config
        self._settings = config.collect
        self._workers = workers
        self._out = out
        self.metrics = metrics
        self._book = book
        self._fault_sink = fault_sink
        self._on_reachable = on_reachable
        self._clock = clock
        self._wall = wall
        self._inbox: queue.SimpleQueue[Handoff] = queue.SimpleQueue()  # from other threads (handoffs.py)
        self.schedule = Schedule()
        # the largest telemetry batch payload: the system layer knows the broker's limit and the topic
        self._payload_limit = payload_limit or (lambda: config.mqtt.max_payload_bytes - m.MARK_BYTES)
        self.telemetry = Telemetry(self._payload_limit())
        self._too_large_logged: set[tuple[str, str, str]] = set()
        self.backoff = Backoff(self._settings.backoff_s, self._settings.backoff_max_s)
        self.plans: dict[str, Plan] = {}
        self._versions: dict[str, int] = {}
        self._refused_copies: dict[str, bytes] = {}  # plan name -> its last message, rejected as invalid
        self._requests: dict[str, int] = {}  # scheduled requests of each applied plan
        self._seqs: dict[str, int] = {}
        self._unstored: set[str] = set()  # what the store refused last time: "event", "telemetry", "state"
        self._budgets: dict[str, Budget] = {}
        self._ready: dict[str, deque[Task]] = {}
        self._outstanding: dict[str, TaskKey] = {}
        self._assembling: dict[TaskKey, Assembly] = {}  # fault readings waiting for their snapshots
        self._last_states = clock()
        self.paused: str | None = None
        self._recheck_at: float | None = None
        sleep = self._settings.sleep
        self.traffic: TrafficWatch | None = None
        if sleep.silence_ms > 0:
            self.traffic = TrafficWatch(diagnostic_ids(config.ecus), clock,
                                        on_traffic=lambda: self._inbox.put(Wake()))
        self._bus = bus
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.heartbeat = clock()
        self.passes = 0  # scheduler passes: tests check that waiting is not spinning

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.traffic is not None and self._bus is not None:  # every frame, to tell the vehicle's from ours
            self._bus.admit(RxFilter(0, False, mask=0))
            self._bus.admit(RxFilter(0, True, mask=0))
            self._bus.tap(self.traffic.frame)
        self._inbox.put(Load())
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._inbox.put(Stop())
        if self._thread is not None:
            self._thread.join(timeout)
        if self.traffic is not None and self._bus is not None:
            self._bus.untap(self.traffic.frame)
        for worker in self._workers.values():
            worker.withdraw()

    def submit_plan(self, name: str, payload: bytes, ack: Callable[[], None] = lambda: None) -> None:
        """A message on `plans/{name}` (an empty payload removes the plan); decided on the collector thread,
        then `ack` (its PUBACK): a kill before that makes the broker deliver it again, so a removal, which
        the broker does not retain, is never lost."""
        self._inbox.put(PlanMessage(name, payload, ack))

    def wait_idle(self, timeout: float) -> bool:
        """Waits until every event handed over so far has been handled (tests, the demo)."""
        done = threading.Event()
        self._inbox.put(Mark(done))
        return done.wait(timeout)

    # ---- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = self._clock()
            try:
                handoff: Handoff | None = self._inbox.get(timeout=self._wait())
            except queue.Empty:
                handoff = None
            try:
                if handoff is not None and not self._handle(handoff):
                    return
                while True:  # everything else already handed over, before looking at the clock again
                    try:
                        handoff = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    if not self._handle(handoff):
                        return
                self._tick()
            except Exception:  # one bad pass never ends collection
                log.exception("collection pass failed")
                self._stop.wait(1.0)

    def _handle(self, handoff: Handoff) -> bool:
        """One hand-off from another thread; False for the stop."""
        if isinstance(handoff, Stop):
            for batch in self.telemetry.flush():  # what was collected so far goes out (the lane is durable)
                self._send_batch(batch)
            return False
        if isinstance(handoff, Load):
            self._load()
        elif isinstance(handoff, PlanMessage):
            try:
                self._plan_message(handoff.name, handoff.payload)
            finally:  # decided, stored, its Event in the outbox (or failed: logged; it would fail again)
                self._acknowledge(handoff.ack)
        elif isinstance(handoff, Reading):
            self._result(handoff.task, handoff.version, handoff.outcome, handoff.at)
        elif isinstance(handoff, Wake):
            if self.paused == "bus_silent":
                self._resume("bus_traffic")
        elif isinstance(handoff, Recheck):
            self._rechecked(handoff.outcome)
        elif isinstance(handoff, Mark):
            handoff.done.set()
        return True

    @staticmethod
    def _acknowledge(ack: Callable[[], None]) -> None:
        try:
            ack()
        except Exception:
            log.exception("acknowledging a plan message failed; the broker delivers it again on reconnect")

    def _wait(self) -> float:
        now = self._clock()
        times = [now + MAX_WAIT_S, self.telemetry.next_due() or now + MAX_WAIT_S]
        if self.paused is None:
            if (due := self.schedule.next_due()) is not None:
                times.append(due)
            for component, ready in self._ready.items():
                if not ready or component in self._outstanding:
                    continue  # its result wakes the collector
                if not self._may_read(component):
                    times.append(now + SESSION_POLL_S)  # a command holds another session: look again later
                    continue
                blocked = self.backoff.blocked_until(component, now)
                times.append(blocked if blocked is not None else self._budgets[ready[0].plan].ready_at(now))
        elif self._recheck_at is not None:
            times.append(self._recheck_at)
        if self.traffic is not None and self.paused != "bus_silent":
            times.append(self.traffic.last_seen + self._settings.sleep.silence_ms / 1000)
        if self.plans:
            times.append(self._last_states + self._state_period())
        return max(0.0, min(times) - now)

    def _tick(self) -> None:
        self.passes += 1
        now = self._clock()
        if self.paused != "bus_silent" and self.traffic is not None and \
                self.traffic.silent_for() >= self._settings.sleep.silence_ms / 1000:
            # bus silence always wins, a pause for the condition too: nothing goes on the bus, not even its
            # recheck, until a vehicle frame resumes collection (the condition is then read again by the plan)
            self._pause("bus_silent", silent_ms=round(self.traffic.silent_for() * 1000))
        if self.paused is None:
            for task in self.schedule.due(now):
                self._queue(task)
            self._dispatch(now)
        elif self._recheck_at is not None and now >= self._recheck_at:
            self._recheck(now)
        batches = self.telemetry.due(now)
        for batch in batches:
            self._send_batch(batch)
        if batches or (self.plans and now >= self._last_states + self._state_period()):
            self._send_states(now)

    # ---- readings ------------------------------------------------------------------------------
    def _queue(self, task: Task) -> None:
        ready = self._ready.setdefault(task.component, deque())
        if any(t.key == task.key for t in ready) or self._outstanding.get(task.component) == task.key \
                or task.key in self._assembling:
            self.metrics.overruns.labels(task.component).inc()
            return
        ready.append(task)

    def _dispatch(self, now: float) -> None:
        for component, ready in self._ready.items():
            if not ready or component in self._outstanding or self.backoff.blocked_until(component, now):
                continue
            if not self._may_read(component):
                continue  # a command holds the component in another session: collection waits
            worker = self._workers[component]
            task = ready[0]
            if not self._budgets[task.plan].take(now):
                continue
            if worker.offer(self._job(task)):
                ready.popleft()
                self._outstanding[component] = task.key

    def _may_read(self, component: str) -> bool:
        worker = self._workers.get(component)
        return worker is not None and worker.executor.session == DEFAULT_SESSION

    def _job(self, task: Task) -> Job:
        version = self.plans[task.plan].version

        def done(outcome: Outcome, seconds: float) -> None:  # on the worker thread: hand over only
            self._inbox.put(Reading(task, version, outcome, self._wall()))

        return Job(task.params, done)

    # ---- telemetry and state -------------------------------------------------------------------
    def _hand_out(self, kind: str, what: str, send: Callable[[], None]) -> None:
        """Hands `what` to the output; what it cannot take is lost (counted there). A failing store is
        logged once while it lasts (a plan may batch several times a second, the log is on the same
        card), and when it takes `kind` again; anything else is a bug, logged with its traceback each time."""
        try:
            send()
        except StoreError as err:
            level = logging.DEBUG if kind in self._unstored else logging.ERROR
            log.log(level, "%s could not be queued (%s); while the store fails, the next ones are not logged",
                    what, err, extra={"kind": kind})
            self._unstored.add(kind)
            return
        except Exception:
            log.exception("%s could not be queued", what)
            return
        if kind in self._unstored:
            self._unstored.discard(kind)
            log.info("collection %s queued again", kind)

    def _event(self, message: dict[str, Any]) -> None:
        self._hand_out("event", f"collection event {message.get('type')}", lambda: self._out.event(message))

    def _state_period(self) -> float:
        return min((p.batch.max_age_ms for p in self.plans.values()), default=10_000) / 1000

    def _send_batch(self, batch: dict[str, Any]) -> None:
        self._seqs[batch["plan"]] = batch["seq"]
        self._hand_out("telemetry", f"telemetry batch {batch['plan']}/{batch['seq']}",
                    lambda: self._out.telemetry(batch["plan"], batch["seq"], batch))

    def _send_states(self, now: float) -> None:
        self._last_states = now
        states = self.telemetry.states()
        if not states:
            return
        self._hand_out("state", f"state of {', '.join(c for c, _ in states)}", lambda: self._out.states(states))
