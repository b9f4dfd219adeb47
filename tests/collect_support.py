"""Test helpers for collection: a recording Output and a running collector over the simulated vehicle."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from agent.collect.collector import Collector, FaultSink
from agent.config.model import AgentConfig, CollectConfig
from agent.core.runtime import Runtime
from agent.metrics.collection import CollectionMetrics
from agent.store.collection import CollectionStore
from agent.store.sqlite import Outgoing, Store
from agent.wire.command import Result
from agent.wire.parse import parse_command


class RecordingLink:
    """The link as the telemetry lane sees it: hands out mids (noted through `on_mid` first, as the real
    link does under paho's lock) and records what it is handed. `full`: paho cannot take more now."""

    def __init__(self) -> None:
        self.sent: list[Outgoing] = []
        self.full = False

    def publish(self, message: Outgoing, on_mid: Callable[[int], None] = lambda mid: None) -> int | None:
        if self.full:
            return None
        self.sent.append(message)
        on_mid(len(self.sent))
        return len(self.sent)


class Recorder:
    """Collection's Output, recording: what the system layer would queue for MQTT."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []
        self.state_log: list[tuple[str, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()

    def telemetry(self, plan: str, seq: int, message: dict[str, Any]) -> None:
        with self._changed:
            self.batches.append(message)
            self._changed.notify_all()

    def states(self, states: list[tuple[str, dict[str, Any]]]) -> None:
        with self._changed:
            self.state_log.extend(states)
            self._changed.notify_all()

    def event(self, message: dict[str, Any]) -> None:
        with self._changed:
            self.events.append(message)
            self._changed.notify_all()

    def wait(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Waits for a condition on what was recorded or on other parts (counters, workers): woken by each
        recorded message, and looking again every 20 ms for changes that record nothing."""
        end = time.monotonic() + timeout
        with self._changed:
            while not (result := predicate()):
                left = end - time.monotonic()
                assert left > 0, "condition not reached"
                self._changed.wait(min(left, 0.02))
        return result

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def samples(self, data: str | None = None) -> list[dict[str, Any]]:
        return [s for b in self.batches for s in b["samples"] if data is None or s["data"] == data]


def plan(name: str = "p", version: int = 1, **fields: Any) -> dict[str, Any]:
    return {"name": name, "version": version, **fields}


def with_collect(config: AgentConfig, **fields: Any) -> AgentConfig:
    return dataclasses.replace(config, collect=dataclasses.replace(config.collect or CollectConfig(), **fields))


class Rig:
    """Runtime + collector on the simulated vehicle, with commands run through the same workers."""

    def __init__(self, config: AgentConfig, state_dir: Path, fault_sink: FaultSink | None = None) -> None:
        self.config = config
        self.results: dict[str, Result] = {}
        self._done = threading.Condition()
        self.runtime = Runtime(config, sink=self._sink)
        self.store = Store(state_dir / "agent.db")
        self.book = CollectionStore(self.store)
        self.out = Recorder()
        self.registry = CollectorRegistry()
        self.metrics = CollectionMetrics(self.registry, [e.name for e in config.ecus])
        self.reachable: list[tuple[str, bool]] = []
        self.collector = Collector(config, self.runtime.workers, self.out, self.metrics, self.book,
                                   fault_sink=fault_sink, on_reachable=lambda c, up: self.reachable.append((c, up)),
                                   bus=self.runtime.owner)

    def _sink(self, result: Result) -> None:
        with self._done:
            self.results[result.command_id] = result
            self._done.notify_all()

    def command(self, component: str, command: str, params: dict[str, Any] | None = None, ident: str = "c1") -> str:
        body: dict[str, Any] = {"id": ident, "component": component, "command": command}
        if params:
            body["params"] = params
        assert self.runtime.submit(parse_command(body, self.config, time.time())).kind == "queued"
        return ident

    def result(self, ident: str, timeout: float = 10.0) -> Result:
        with self._done:
            assert self._done.wait_for(lambda: ident in self.results, timeout)
            return self.results[ident]

    def readings(self, component: str, result: str) -> float:
        value = self.registry.get_sample_value("sovd_collection_readings_total",
                                               {"component": component, "result": result})
        return value or 0.0


@contextmanager
def rig(config: AgentConfig, state_dir: Path, fault_sink: FaultSink | None = None) -> Iterator[Rig]:
    r = Rig(config, state_dir, fault_sink)
    assert r.runtime.start(3.0)
    r.collector.start()
    try:
        yield r
    finally:
        r.collector.stop()
        r.runtime.stop(2.0)
        r.store.close()
