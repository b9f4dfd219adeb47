"""Collection metrics: readings by result, exported ECU values as gauges, pauses and telemetry drops.

`sovd_ecu_value` series exist only for signals a plan exports (bounded by the plans) and are removed
when their plan no longer exports them, when a reading of the value fails and while collection is paused:
a value shown is one read at the last reading. Label values are component names from the config, DID names
from the config, OBD-II PID names from the agent's table and units from either: bounded sets.
"""

from __future__ import annotations

import contextlib
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge

READING_RESULTS = ("ok", "timeout", "negative_response", "error")
PLAN_SOURCES = ("mqtt", "config", "store")  # a plan message, the agent's config, the plans stored at a restart


class CollectionMetrics:
    def __init__(self, registry: CollectorRegistry, components: list[str]) -> None:
        self.readings = Counter("sovd_collection_readings", "Values read by collection plans, by result.",
                                ["component", "result"], registry=registry)
        self.value = Gauge("sovd_ecu_value", "Last value of a signal a collection plan exports, in the unit the "
                                             "`unit` label names (empty: unitless).",
                           ["component", "data", "unit"], registry=registry)
        self.paused = Gauge("sovd_collection_paused", "1 while collection is paused (vehicle asleep or a "
                                                      "configured condition).", registry=registry)
        self.telemetry_dropped = Counter("sovd_telemetry_dropped", "Telemetry batches dropped: the oldest by the "
                                                                   "telemetry byte bound (bound), or one the store "
                                                                   "could not take (not_stored).", ["reason"],
                                         registry=registry)
        for reason in ("bound", "not_stored"):
            self.telemetry_dropped.labels(reason)
        self.too_large = Counter("sovd_telemetry_too_large", "Samples left out of telemetry: on its own, the sample "
                                                             "makes a batch larger than the payload limit.",
                                 ["component"], registry=registry)
        self.state_oversize = Counter("sovd_state_oversize", "States larger than the payload limit: published "
                                                             "without the values that do not fit (trimmed) or not "
                                                             "at all (set_aside).", ["component", "outcome"],
                                      registry=registry)
        self.overruns = Counter("sovd_collection_overruns", "Readings skipped because the previous one of the same "
                                                            "signal group had not run yet.", ["component"],
                                registry=registry)
        self.plans = Gauge("sovd_collection_plans", "Collection plans applied.", registry=registry)
        self.plans_rejected = Counter("sovd_collection_plans_rejected", "Collection plans that could not be applied "
                                      "(a plan_rejected event says why), by where they came from.", ["source"],
                                      registry=registry)
        for source in PLAN_SOURCES:
            self.plans_rejected.labels(source)
        for component in components:
            self.overruns.labels(component)
            self.too_large.labels(component)
            for outcome in ("trimmed", "set_aside"):
                self.state_oversize.labels(component, outcome)
            for result in READING_RESULTS:
                self.readings.labels(component, result)
        self._exported: dict[tuple[str, str, str], Gauge] = {}  # the series, kept: labels() is a lookup per call
        self._lock = threading.Lock()

    def reading(self, component: str, result: str, count: int = 1) -> None:
        self.readings.labels(component, result).inc(count)

    def set_value(self, component: str, data: str, unit: str | None, value: float) -> None:
        key = (component, data, unit or "")
        with self._lock:
            series = self._exported.get(key)
            if series is None:
                series = self._exported[key] = self.value.labels(*key)
        series.set(value)

    def drop_value(self, component: str, data: str, unit: str | None) -> None:
        """A value that could not be read: its series goes until a reading gives it again, rather than go
        on showing the last value as if it were current."""
        key = (component, data, unit or "")
        with self._lock:
            series = self._exported.pop(key, None)
        if series is not None:
            with contextlib.suppress(KeyError):
                self.value.remove(*key)

    def drop_values(self) -> None:
        """Every value goes (collection paused: nothing is read, nothing is current)."""
        with self._lock:
            keys = list(self._exported)
            self._exported.clear()
        for key in keys:
            with contextlib.suppress(KeyError):
                self.value.remove(*key)

    def keep_values(self, wanted: set[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """Removes every exported series not in `wanted` (after a plan changed); returns the removed ones."""
        with self._lock:
            stale = sorted(set(self._exported) - wanted)
            for key in stale:
                del self._exported[key]
        for key in stale:
            with contextlib.suppress(KeyError):  # never set since it was wanted
                self.value.remove(*key)
        return stale
