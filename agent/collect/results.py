"""Result assembly: a reading's outcome into values, fault readings (with their DTCs' snapshots, one job
each), reachability and the too-large accounting. Part of the collector thread (`Collector` inherits it and
owns the state it uses); kept apart because turning an answer into data is one job and scheduling another.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

from agent.collect.schedule import Task, snapshot_task
from agent.wire import messages as m
from agent.wire import obd
from agent.wire.command import ErrorCode, Outcome, Status
from agent.wire.plan import Item, Signal

log = logging.getLogger(__name__)


@dataclass
class Assembly:
    """A fault reading whose DTCs' snapshots are still being read, one job each."""

    version: int
    faults: list[dict[str, Any]]
    at: float
    next: int = 0  # index in `faults` of the DTC whose snapshots are read next

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

class ResultAssembly:
    """What a finished reading becomes. Runs on the collector thread only."""

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
                    self._assembling[task.key] = Assembly(version, faults, at)
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
            if result != "ok" and current and signal.export:
                self.metrics.drop_value(component, item.name, item.unit)  # never a stale value as current
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
