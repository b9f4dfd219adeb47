"""Plan intake and versions: a plan message loaded, decided (parsed, version, bounds, stored), applied,
removed or rejected. Part of the collector thread (`Collector` inherits it and owns the state it uses);
kept apart because deciding what runs is one job and running it another.
"""

from __future__ import annotations

import logging
from typing import Any

from agent.collect.schedule import Budget, Task, plan_tasks
from agent.store.sqlite import StoreError
from agent.wire import messages as m
from agent.wire.decode import Undecodable, decode_command
from agent.wire.plan import InvalidPlanError, Plan, parse_plan, plan_identity

log = logging.getLogger(__name__)

REFUSED_COPIES = 64  # plan names whose last message was invalid, remembered to stay quiet on its redelivery


class PlanIntake:
    """Which plans are applied, at which version. Runs on the collector thread only."""

    def _load(self) -> None:
        """Stored plans first (what ran before the restart), then the config's local plans."""
        try:
            stored = self._book.load_plans()
        except Exception as err:  # the store's failure; anything else is a bug, with its traceback
            log.error("stored collection plans cannot be read: %s", err, exc_info=not isinstance(err, StoreError))
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
        """A retained plan comes again on every reconnect: one already rejected as invalid is rejected once,
        not with a new `plan_rejected` each time (a refusal that may pass later, bounds or storage, is not
        remembered: the same plan is decided afresh)."""
        if not payload:
            self._refused_copies.pop(name, None)
            self._remove(name)
            return
        if self._refused_copies.get(name) == payload:
            log.debug("plan %s again, rejected already (retained copy)", name, extra={"plan": name})
            return
        body = decode_command(payload)
        if isinstance(body, Undecodable):
            self._rejected(name, None, [{"path": body.field, "message": body.reason}], "mqtt")
            invalid = True
        else:
            invalid = self._decide(body, name, "mqtt") == "invalid"
        self._refused_copies.pop(name, None)
        if invalid:
            self._refused_copies[name] = payload
            while len(self._refused_copies) > REFUSED_COPIES:
                del self._refused_copies[next(iter(self._refused_copies))]

    def _decide(self, body: dict[str, Any], name: str | None, source: str, store: bool = True) -> str:
        """Applies the plan, or rejects it with an Event: "applied", "same" (the applied version again),
        "invalid" (the same body will always be rejected) or "refused" (bounds or storage: may pass later)."""
        try:
            plan = parse_plan(body, self.config, name)
        except InvalidPlanError as err:
            self._rejected(err.name or name, err.version, err.errors, source)
            return "invalid"
        known = self._versions.get(plan.name)
        if store and known is not None:
            current = self.plans.get(plan.name)
            if plan.version == known and current is not None and current.body == plan.body:
                log.debug("plan %s version %d again (retained copy)", plan.name, plan.version)
                return "same"
            if plan.version <= known:
                self._rejected(plan.name, plan.version, [{"path": "version", "message":
                               f"version {plan.version} is not above version {known}, already applied"}], source)
                return "invalid"
        tasks = plan_tasks(plan, self._settings.max_dids_per_request)
        if (bound := self._over_bounds(plan, len(tasks))) is not None:
            self._rejected(plan.name, plan.version, [bound], source)
            return "refused"
        if store:
            try:
                self._book.save_plan(plan.name, plan.version, plan.body)
            except Exception as err:
                if not isinstance(err, StoreError):  # a bug, not the disk: its traceback
                    log.exception("storing plan %s failed", plan.name, extra={"plan": plan.name})
                self._rejected(plan.name, plan.version, [{"path": "", "message": f"cannot store the plan: {err}"}],
                               source)
                return "refused"
        self._apply(plan, tasks, source)
        return "applied"

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
            log.error("removal of plan %s not stored (it comes back after a restart): %s", name, err,
                      exc_info=not isinstance(err, StoreError))
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
        self.metrics.plans_rejected.labels(source).inc()
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
        self.telemetry.forget_faults({f.component for p in self.plans.values() for f in p.faults})

    def _drop_ready(self, plan: str) -> None:
        for ready in self._ready.values():
            for task in [t for t in ready if t.plan == plan]:
                ready.remove(task)
        for key in [k for k in self._assembling if k[0] == plan]:
            del self._assembling[key]  # its snapshot reading still on the bus is dropped when it comes
