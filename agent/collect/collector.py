"""The collection scheduler: one thread that applies plans, hands readings to the component workers and
turns their outcomes into telemetry, state, gauges and events.

No thread per signal: a heap of due times (agent.collect.schedule), one job at a time per component
(the worker runs it only when no command waits), a request budget per plan, a backoff per component
that stops answering, and a pause while the vehicle sleeps.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from agent.bus.owner import BusOwner, RxFilter
from agent.collect.schedule import Backoff, Budget, Schedule, Task, TaskKey, plan_tasks, snapshot_task
from agent.collect.sleep import TrafficWatch, diagnostic_ids
from agent.collect.telemetry import Telemetry
from agent.config.model import AgentConfig
from agent.core.worker import ComponentWorker, Job
from agent.metrics.collection import CollectionMetrics
from agent.store.collection import PlanRow
from agent.uds.executor import DEFAULT_SESSION
from agent.wire import command as c
from agent.wire import messages as m
from agent.wire import obd
from agent.wire.command import ErrorCode, Outcome, Status
from agent.wire.decode import Undecodable, decode_command
from agent.wire.plan import InvalidPlanError, Item, Plan, Signal, parse_plan, plan_identity

log = logging.getLogger(__name__)

# (component, a read_faults result's entries, the status mask it was read with) -> Events still to publish
FaultSink = Callable[[str, list[dict[str, Any]], int], list[dict[str, Any]]]
MAX_WAIT_S = 5.0  # the scheduler looks around at least this often (heartbeat)
SESSION_POLL_S = 0.25  # how often it looks whether a component is back in its default session


@dataclass
class _Assembly:
    """A fault reading whose DTCs' snapshots are still being read, one job each."""

    version: int
    faults: list[dict[str, Any]]
    at: float
    next: int = 0  # index in `faults` of the DTC whose snapshots are read next


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


def reading_result(outcome: Outcome) -> str:
    """The `result` label of a reading."""
    if outcome.status is Status.COMPLETED:
        return "ok"
    if outcome.status is Status.TIMEOUT:
        return "timeout"
    if outcome.error is not None and outcome.error.code is ErrorCode.NEGATIVE_RESPONSE:
        return "negative_response"
    return "error"


def answered(outcome: Outcome) -> bool:
    """Did the ECU answer at all (a negative response is an answer)?"""
    return outcome.status is not Status.TIMEOUT and not (
        outcome.error is not None and outcome.error.code is ErrorCode.BUS_ERROR)


class Collector:
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
        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.schedule = Schedule()
        # the largest telemetry batch payload: the system layer knows the broker's limit and the topic
        self._payload_limit = payload_limit or (lambda: config.mqtt.max_payload_bytes - m.MARK_BYTES)
        self.telemetry = Telemetry(self._payload_limit())
        self._too_large_logged: set[tuple[str, str, str]] = set()
        self.backoff = Backoff(self._settings.backoff_s, self._settings.backoff_max_s)
        self.plans: dict[str, Plan] = {}
        self._versions: dict[str, int] = {}
        self._requests: dict[str, int] = {}  # scheduled requests of each applied plan
        self._seqs: dict[str, int] = {}
        self._budgets: dict[str, Budget] = {}
        self._ready: dict[str, deque[Task]] = {}
        self._outstanding: dict[str, TaskKey] = {}
        self._assembling: dict[TaskKey, _Assembly] = {}  # fault readings waiting for their snapshots
        self._last_states = clock()
        self.paused: str | None = None
        self._recheck_at: float | None = None
        sleep = self._settings.sleep
        self.traffic: TrafficWatch | None = None
        if sleep.silence_ms > 0:
            self.traffic = TrafficWatch(diagnostic_ids(config.ecus), clock,
                                        on_traffic=lambda: self._events.put(("wake",)))
        self._bus = bus
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.heartbeat = clock()
        self.passes = 0  # scheduler passes: tests check that waiting is not spinning

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.traffic is not None and self._bus is not None:  # every frame, to tell the vehicle's from ours
            self._bus.listen(RxFilter(0, False, mask=0))
            self._bus.listen(RxFilter(0, True, mask=0))
            self._bus.tap(self.traffic.frame)
        self._events.put(("load",))
        self._thread = threading.Thread(target=self._run, name="collector", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._events.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)
        if self.traffic is not None and self._bus is not None:
            self._bus.untap(self.traffic.frame)
        for worker in self._workers.values():
            worker.withdraw()

    def submit_plan(self, name: str, payload: bytes) -> None:
        """A message on `plans/{name}` (an empty payload removes the plan); decided on the collector thread."""
        self._events.put(("plan", name, payload))

    def idle(self, timeout: float) -> bool:
        """Waits until every event handed over so far has been handled (tests, the demo)."""
        done = threading.Event()
        self._events.put(("mark", done))
        return done.wait(timeout)

    # ---- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = self._clock()
            try:
                event = self._events.get(timeout=self._wait())
            except queue.Empty:
                event = None
            try:
                if event is not None and not self._handle(event):
                    return
                while True:  # everything else already handed over, before looking at the clock again
                    try:
                        event = self._events.get_nowait()
                    except queue.Empty:
                        break
                    if not self._handle(event):
                        return
                self._tick()
            except Exception:  # one bad pass never ends collection
                log.exception("collection pass failed")
                self._stop.wait(1.0)

    def _handle(self, event: tuple[Any, ...]) -> bool:
        kind = event[0]
        if kind == "stop":
            for batch in self.telemetry.flush():  # what was collected so far goes out (the lane is durable)
                self._send_batch(batch)
            return False
        if kind == "load":
            self._load()
        elif kind == "plan":
            self._plan_message(event[1], event[2])
        elif kind == "result":
            self._result(*event[1:])
        elif kind == "wake":
            if self.paused == "bus_silent":
                self._resume("bus_traffic")
        elif kind == "recheck":
            self._rechecked(event[1])
        elif kind == "mark":
            event[1].set()
        return True

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

    # ---- plans ---------------------------------------------------------------------------------
    def _load(self) -> None:
        """Stored plans first (what ran before the restart), then the config's local plans."""
        try:
            stored = self._book.load_plans()
        except Exception as err:
            log.error("stored collection plans cannot be read: %s", err)
            stored = []
        for record in stored:
            self._versions[record.name] = record.version
            self._seqs[record.name] = record.seq
            if record.body is not None:
                self._decide(record.body, record.name, "store", store=False)
        for body in self._settings.plans:
            name, version = plan_identity(body)
            if name is not None and version is not None and self._versions.get(name, -1) >= version:
                log.info("local plan %s version %d: version %d is already known", name, version,
                         self._versions[name], extra={"plan": name})
                continue
            self._decide(body, None, "config")

    def _plan_message(self, name: str, payload: bytes) -> None:
        if not payload:
            self._remove(name)
            return
        body = decode_command(payload)
        if isinstance(body, Undecodable):
            self._rejected(name, None, [{"path": body.field, "message": body.reason}], "mqtt")
            return
        self._decide(body, name, "mqtt")

    def _decide(self, body: dict[str, Any], name: str | None, source: str, store: bool = True) -> None:
        try:
            plan = parse_plan(body, self.config, name)
        except InvalidPlanError as err:
            self._rejected(err.name or name, err.version, err.errors, source)
            return
        known = self._versions.get(plan.name)
        if store and known is not None:
            current = self.plans.get(plan.name)
            if plan.version == known and current is not None and current.body == plan.body:
                log.debug("plan %s version %d again (retained copy)", plan.name, plan.version)
                return
            if plan.version <= known:
                self._rejected(plan.name, plan.version, [{"path": "version", "message":
                               f"version {plan.version} is not above version {known}, already applied"}], source)
                return
        tasks = plan_tasks(plan, self._settings.max_dids_per_request)
        if (bound := self._over_bounds(plan, len(tasks))) is not None:
            self._rejected(plan.name, plan.version, [bound], source)
            return
        if store:
            try:
                self._book.save_plan(plan.name, plan.version, plan.body)
            except Exception as err:
                self._rejected(plan.name, plan.version, [{"path": "", "message": f"cannot store the plan: {err}"}],
                               source)
                return
        self._apply(plan, tasks, source)

    def _over_bounds(self, plan: Plan, requests: int) -> dict[str, str] | None:
        """Whether applying `plan` (replacing its own older version) would pass collect.max_plans or
        collect.max_scheduled_requests: the error, with its path, that rejects it."""
        others = [name for name in self.plans if name != plan.name]
        if len(others) >= self._settings.max_plans:
            return {"path": "name", "message": f"{len(others)} other plans are applied: at most collect.max_plans "
                                               f"({self._settings.max_plans}) at once; remove one first"}
        scheduled = sum(self._requests.get(name, 0) for name in others)
        if scheduled + requests > self._settings.max_scheduled_requests:
            return {"path": "signals", "message": f"the plan needs {requests} requests and the other plans "
                                                  f"{scheduled}: more than collect.max_scheduled_requests "
                                                  f"({self._settings.max_scheduled_requests})"}
        return None

    def _apply(self, plan: Plan, tasks: list[Task], source: str) -> None:
        now = self._clock()
        last = self.telemetry.set_plan(plan, self._seqs.get(plan.name, self.telemetry.seq(plan.name)))
        if last is not None:
            self._send_batch(last)
        self._drop_ready(plan.name)
        self.schedule.set_plan(plan.name, tasks, now)
        self._requests[plan.name] = len(tasks)
        self._budgets[plan.name] = Budget(plan.requests_per_s, now)
        self.plans[plan.name] = plan
        self._versions[plan.name] = plan.version
        self._too_large_logged = {k for k in self._too_large_logged if k[0] != plan.name}
        self._plans_changed()
        log.info("collection plan %s version %d applied", plan.name, plan.version,
                 extra={"plan": plan.name, "version": plan.version, "source": source})
        self._event(m.event_message("plan_applied", self._wall(), name=plan.name, version=plan.version))

    def _remove(self, name: str) -> None:
        plan = self.plans.pop(name, None)
        if plan is None:
            log.info("removal of plan %s, which is not applied", name, extra={"plan": name})
            return
        try:
            self._book.save_plan(name, plan.version, None)
        except Exception as err:
            log.error("removal of plan %s not stored (it comes back after a restart): %s", name, err)
        last = self.telemetry.close(name)
        if last is not None:
            self._send_batch(last)
        self.schedule.remove_plan(name)
        self._requests.pop(name, None)
        self._drop_ready(name)
        self._budgets.pop(name, None)
        self._plans_changed()
        log.info("collection plan %s removed", name, extra={"plan": name, "version": plan.version})
        self._event(m.event_message("plan_removed", self._wall(), name=name, version=plan.version))

    def _rejected(self, name: str | None, version: int | None, errors: list[dict[str, str]], source: str) -> None:
        log.warning("collection plan %s rejected: %s", name, "; ".join(f"{e['path']}: {e['message']}" for e in errors),
                    extra={"plan": name, "version": version, "source": source})
        self._event(m.event_message("plan_rejected", self._wall(), name=name, version=version, errors=errors))

    def _plans_changed(self) -> None:
        self.metrics.plans.set(len(self.plans))
        exported = {(s.component, i.name, i.unit or "") for p in self.plans.values() for s in p.signals if s.export
                    for i in s.items}
        self.metrics.keep_values(exported)
        self.telemetry.forget_values({(s.component, i.name) for p in self.plans.values() for s in p.signals
                                      for i in s.items})

    def _drop_ready(self, plan: str) -> None:
        for ready in self._ready.values():
            for task in [t for t in ready if t.plan == plan]:
                ready.remove(task)
        for key in [k for k in self._assembling if k[0] == plan]:
            del self._assembling[key]  # its snapshot reading still on the bus is dropped when it comes

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
            self._events.put(("result", task, version, outcome, self._wall()))

        return Job(task.params, done)

    def _result(self, task: Task, version: int, outcome: Outcome, at: float) -> None:
        now = self._clock()
        component = task.component
        if self._outstanding.get(component) == task.key:
            del self._outstanding[component]
        self._reachability(component, outcome, now)
        current = task.plan in self.plans and self.plans[task.plan].version == version and self.paused is None
        if task.watch is not None:
            self.metrics.reading(component, reading_result(outcome))
            if task.key[2] == "snapshot":
                self._snapshot_read(task, version, outcome, current)
            elif outcome.status is Status.COMPLETED and outcome.result is not None and current:
                faults = list(outcome.result.get("faults", []))
                if task.watch.snapshots and faults:
                    self._assembling[task.key] = _Assembly(version, faults, at)
                    self._next_snapshot(task)
                else:
                    self._faults(component, faults, task.watch.status_mask, at)
            return
        values = _values(task, outcome)
        counts: dict[str, int] = {}
        for _, _, _, result in values:
            counts[result] = counts.get(result, 0) + 1
        for result, count in counts.items():
            self.metrics.reading(component, result, count)
        self._refresh_limit(now)
        for signal, item, value, result in values:
            if result != "ok" or not current:
                continue
            dropped = self.telemetry.too_large
            self.telemetry.reading(task.plan, signal, item, value, at, now)
            if self.telemetry.too_large != dropped:
                self._sample_too_large(task.plan, component, item.name, value)
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if signal.export and item.numeric and numeric:
                self.metrics.set_value(component, item.name, item.unit, float(value))
            self._condition(component, item.name, value)
        for batch in self.telemetry.cut():  # a batch the next sample would have taken past the limit
            self._send_batch(batch)

    def _refresh_limit(self, now: float) -> None:
        try:
            limit = self._payload_limit()
        except Exception:
            log.exception("the telemetry payload limit is unknown: %d bytes kept", self.telemetry.max_bytes)
            return
        if limit != self.telemetry.max_bytes:
            log.info("telemetry payload limit: %d bytes", limit, extra={"max_bytes": limit})
            dropped = self.telemetry.set_limit(limit, now)
            for entry in dropped:
                self.metrics.too_large.labels(entry["component"]).inc()
            if dropped:
                log.warning("telemetry payload limit now %d bytes: %d samples no longer fit in any batch and are "
                            "left out", limit, len(dropped), extra={"max_bytes": limit})
            for batch in self.telemetry.cut():
                self._send_batch(batch)

    def _sample_too_large(self, plan: str, component: str, data: str, value: Any) -> None:
        """A sample that alone exceeds the payload limit: never sent; counted, logged once per plan and value."""
        self.metrics.too_large.labels(component).inc()
        key = (plan, component, data)
        level = logging.DEBUG if key in self._too_large_logged else logging.WARNING
        self._too_large_logged.add(key)
        log.log(level, "sample %s of %s left out of plan %s's telemetry: larger than the payload limit of %d bytes "
                "on its own", data, component, plan, self.telemetry.max_bytes,
                extra={"plan": plan, "component": component, "data": data, "max_bytes": self.telemetry.max_bytes,
                       "bytes": len(m.encode(m.sample(component, data, value, 0.0)))})

    def _next_snapshot(self, watch_task: Task) -> None:
        """Queues the next DTC's snapshot reading first in its component's line (a command still goes
        before it), or completes the fault reading when every DTC's snapshots were read."""
        assembly = self._assembling[watch_task.key]
        if assembly.next < len(assembly.faults):
            dtc = int(assembly.faults[assembly.next]["dtc"], 16)
            self._ready.setdefault(watch_task.component, deque()).appendleft(snapshot_task(watch_task, dtc))
            return
        del self._assembling[watch_task.key]
        assert watch_task.watch is not None
        self._faults(watch_task.component, assembly.faults, watch_task.watch.status_mask, assembly.at)

    def _snapshot_read(self, task: Task, version: int, outcome: Outcome, current: bool) -> None:
        """One DTC's snapshots: into its fault entry (a failure stays in that entry, as in `read_faults`).
        A reading whose plan changed or paused meanwhile is dropped."""
        plan, component, _, index = task.key
        watch_key = (plan, component, "faults", index)
        assembly = self._assembling.get(watch_key)
        if assembly is None or not current or assembly.version != version:
            self._assembling.pop(watch_key, None)
            return
        entry = assembly.faults[assembly.next]
        if outcome.status is Status.COMPLETED and outcome.result is not None:
            entry.update(outcome.result)
        elif outcome.error is not None:
            entry["snapshots_error"] = outcome.error.as_dict()
        assembly.next += 1
        watch_task = self.schedule.task(watch_key)
        if watch_task is None:
            self._assembling.pop(watch_key, None)
            return
        self._next_snapshot(watch_task)

    def _faults(self, component: str, faults: list[dict[str, Any]], status_mask: int, at: float) -> None:
        self.telemetry.faults(component, faults, at)
        if self._fault_sink is None:
            return
        try:
            events = self._fault_sink(component, faults, status_mask)
        except Exception:
            log.exception("fault tracker failed on a reading of %s", component, extra={"component": component})
            return
        for event in events:
            self._event(event)

    def _reachability(self, component: str, outcome: Outcome, now: float) -> None:
        if answered(outcome):
            if self.backoff.answered(component):
                log.info("%s answers again: collection resumes", component, extra={"component": component})
            if self._on_reachable is not None:
                self._on_reachable(component, True)
            return
        wait = self.backoff.failed(component, now)
        if self._on_reachable is not None:
            self._on_reachable(component, False)
        log.warning("%s did not answer a collection reading: next attempt in %.1f s", component, wait,
                    extra={"component": component, "failures": self.backoff.failures(component)})

    # ---- telemetry and state -------------------------------------------------------------------
    def _event(self, message: dict[str, Any]) -> None:
        try:
            self._out.event(message)
        except Exception:  # e.g. the store fails: logged and counted there; collection carries on
            log.exception("collection event %s could not be queued", message.get("type"))

    def _state_period(self) -> float:
        return min((p.batch.max_age_ms for p in self.plans.values()), default=10_000) / 1000

    def _send_batch(self, batch: dict[str, Any]) -> None:
        self._seqs[batch["plan"]] = batch["seq"]
        try:
            self._out.telemetry(batch["plan"], batch["seq"], batch)
        except Exception:
            log.exception("telemetry batch %s/%d could not be queued", batch["plan"], batch["seq"])

    def _send_states(self, now: float) -> None:
        self._last_states = now
        states = self.telemetry.states()
        if not states:
            return
        try:
            self._out.states(states)
        except Exception:
            log.exception("state of %s could not be queued", ", ".join(c for c, _ in states))

    # ---- sleep ---------------------------------------------------------------------------------
    def _pause(self, reason: str, **details: Any) -> None:
        self.paused = reason
        for worker in self._workers.values():
            job = worker.withdraw()
            if job is not None:
                self._outstanding.pop(worker.ecu.name, None)
        for ready in self._ready.values():
            ready.clear()
        self._assembling.clear()
        if self.traffic is not None:
            self.traffic.mark_asleep()
        condition = self._settings.sleep.condition
        self._recheck_at = None
        if reason == "condition" and condition is not None and condition.recheck_ms > 0:
            self._recheck_at = self._clock() + condition.recheck_ms / 1000
        for batch in self.telemetry.flush():
            self._send_batch(batch)
        self.metrics.paused.set(1)
        log.warning("collection paused: %s", reason, extra={"reason": reason, **details})
        self._event(m.event_message("collection_paused", self._wall(), reason=reason, **details))

    def _resume(self, reason: str) -> None:
        self.paused = None
        self._recheck_at = None
        self.metrics.paused.set(0)
        log.info("collection resumed: %s", reason, extra={"reason": reason})
        self._event(m.event_message("collection_resumed", self._wall(), reason=reason))

    def _condition(self, component: str, data: str, value: Any) -> None:
        condition = self._settings.sleep.condition
        if condition is None or (component, data) != (condition.component, condition.data):
            return
        if not isinstance(value, int | float) or isinstance(value, bool):
            return
        if self.paused is None and value < condition.below:
            self._pause("condition", component=component, data=data, value=value, below=condition.below)
        elif self.paused == "condition" and value >= condition.below:
            self._resume("condition_cleared")

    def _recheck(self, now: float) -> None:
        """While paused by the condition: one read of the condition's DID, then wait `recheck_ms` again."""
        condition = self._settings.sleep.condition
        assert condition is not None
        self._recheck_at = now + condition.recheck_ms / 1000
        worker = self._workers.get(condition.component)
        spec = worker.ecu.did_by_name(condition.data) if worker is not None else None
        if worker is None or spec is None:
            return
        worker.offer(Job(c.ReadData((spec,)), lambda outcome, seconds: self._events.put(("recheck", outcome))))

    def _rechecked(self, outcome: Outcome) -> None:
        condition = self._settings.sleep.condition
        if condition is None or outcome.status is not Status.COMPLETED or outcome.result is None:
            return
        value = outcome.result.get("values", {}).get(condition.data)
        self.metrics.reading(condition.component, "ok")
        self._condition(condition.component, condition.data, value)


def _values(task: Task, outcome: Outcome) -> list[tuple[Signal, Item, Any, str]]:
    """(signal, item, value, result label) for each value of a signal task."""
    if outcome.status is not Status.COMPLETED or outcome.result is None:
        result = reading_result(outcome)
        return [(signal, item, None, result) for signal, item in task.items]
    values = outcome.result.get("values", {})
    out: list[tuple[Signal, Item, Any, str]] = []
    for signal, item in task.items:
        if item.pid is not None:
            entry = values.get(obd.pid_name(item.pid))
            value = entry.get("value") if isinstance(entry, dict) else None
            out.append((signal, item, value, "ok" if entry is not None else "error"))
            continue
        value = values.get(item.name)
        bad = item.name not in values or (isinstance(value, dict) and "error" in value)
        out.append((signal, item, value, "error" if bad else "ok"))
    return out
