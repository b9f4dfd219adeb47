"""The pause while the vehicle sleeps: bus silence or a condition value, its recheck, and the resume.
Part of the collector thread (`Collector` inherits it and owns the state it uses); kept apart because when
collection may use the bus is one job and what it reads another.
"""

from __future__ import annotations

import logging
from typing import Any

from agent.collect.handoffs import Recheck
from agent.core.worker import Job
from agent.wire import command as c
from agent.wire import messages as m
from agent.wire.command import Outcome, Status

log = logging.getLogger(__name__)


class SleepHandling:
    """Pausing and resuming collection. Runs on the collector thread only."""

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
        self.metrics.drop_values()  # nothing is read while paused: no value is current
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
        worker.offer(Job(c.ReadData((spec,)), lambda outcome, seconds: self._inbox.put(Recheck(outcome))))

    def _rechecked(self, outcome: Outcome) -> None:
        condition = self._settings.sleep.condition
        if condition is None or outcome.status is not Status.COMPLETED or outcome.result is None:
            return
        value = outcome.result.get("values", {}).get(condition.data)
        self.metrics.reading(condition.component, "ok")
        self._condition(condition.component, condition.data, value)
