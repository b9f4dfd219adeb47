"""Collection attacked from outside: plans replaced mid-batch, storage that refuses writes, components that
stay silent for days. End to end on a real Mosquitto with the simulator on a virtual CAN bus, except the
pure parts (schedule.Backoff), tested on their own.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from collect_support import plan

from agent.collect.schedule import Backoff
from agent.fleet.caller import Caller
from agent.system.service import Service

SPEED = {"component": "engine", "data": ["engine_speed", "oil_temp"], "every_ms": 100}


def wait_until(predicate: Callable[[], object], timeout: float = 15.0) -> bool:
    """Polls a condition that publishes nothing (a counter): True once it holds, False at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def readings(service: Service, component: str = "engine") -> float:
    return service.registry.get_sample_value("sovd_collection_readings_total",
                                             {"component": component, "result": "ok"}) or 0.0


def seen(backend: Caller, topic: str) -> list[dict]:
    with backend._changed:
        return [s.json() for s in backend.seen if s.topic == topic]


def test_a_replaced_plan_never_numbers_two_batches_alike(service, backend):
    """Batches are deduplicated by (plan, seq). A new version that arrives while the old one's batch is still
    open sends that batch first; the new version's first batch must come after it, not reuse its number
    (it did: the new batches started from the number before the flushed one, and the backend dropped them)."""
    backend.publish_plan("seqs", plan("seqs", 1, signals=[SPEED], batch={"max_age_ms": 3_600_000,
                                                                        "max_samples": 10_000}))
    backend.wait_for(lambda s: s.topic == backend.topics.events and s.json()["type"] == "plan_applied", 15)
    assert wait_until(lambda: readings(service) >= 4)  # samples wait in version 1's open batch
    backend.publish_plan("seqs", plan("seqs", 2, signals=[SPEED], batch={"max_age_ms": 100, "max_samples": 1}))
    topic = f"{backend.topics.base}/telemetry"
    backend.wait_for(lambda s: s.topic == topic and s.json()["version"] == 2, 15, count=3)
    batches = seen(backend, topic)
    old = [b["seq"] for b in batches if b["version"] == 1]
    new = [b["seq"] for b in batches if b["version"] == 2]
    assert old and min(new) > max(old), (old, new)
    assert len({b["seq"] for b in batches}) == len(batches)


def test_a_fault_change_seen_while_the_store_refuses_writes_is_reported_once_it_takes_them(service, backend, sim):
    """A fault reading's new set and its fault_changed Events are committed together. When that commit fails
    (the SD card remounted read-only, or full), neither is stored: the next reading must find the change again.
    It did not: the tracker had already taken the new set as known, so the change was never reported.
    The storage failure is SQLite's own SQLITE_READONLY (`PRAGMA query_only` on the agent's connection)."""
    events = backend.topics.events

    def changes() -> list[tuple[str, str]]:
        return [(e["code"], e["change"]) for e in seen(backend, events) if e["type"] == "fault_changed"]

    backend.publish_plan("fw", plan("fw", 1, faults=[{"component": "engine", "every_ms": 200}]))
    backend.wait_for(lambda s: s.topic == events and b'"fault_changed"' in s.payload, 15, count=2)
    assert sorted(changes()) == [("P0301", "new"), ("U0100", "new")]
    with service.store._lock:
        service.store._db.execute("PRAGMA query_only = 1")
    try:
        sim.ecu("engine").set_dtc("P0420", 0x08)
        start = readings(service)
        assert wait_until(lambda: readings(service) >= start + 2)  # read (and not stored) at least once
    finally:
        with service.store._lock:
            service.store._db.execute("PRAGMA query_only = 0")
    backend.wait_for(lambda s: s.topic == events and b'"P0420"' in s.payload, 15)
    assert changes().count(("P0420", "new")) == 1


def test_backoff_stays_at_its_cap_however_long_a_component_is_silent():
    """A component away for days (a trailer's ECU) fails reading after reading. Past 1024 failures in a row
    the doubling overflowed a float: every later reading raised, was never backed off, and stalled the
    collector for a second each time."""
    backoff = Backoff(1.0, 300.0)
    waits = [backoff.failed("trailer", float(n)) for n in range(5000)]
    assert waits[:3] == [1.0, 2.0, 4.0] and set(waits[9:]) == {300.0}
    assert backoff.blocked_until("trailer", 4999.0) == 4999.0 + 300.0
    assert backoff.answered("trailer") and backoff.failed("trailer", 0.0) == 1.0


def test_state_drops_its_faults_once_no_plan_watches_them(service, backend):
    """The state carries a component's faults only while a plan watches them. A plan that stopped watching
    the engine's faults (but still reads its values) kept publishing the last fault list it ever read, as if
    current, in every later state of the engine."""
    watched = plan("st", 1, signals=[SPEED], faults=[{"component": "engine", "every_ms": 200}],
                   batch={"max_age_ms": 200, "max_samples": 50})
    backend.publish_plan("st", watched)
    topic = f"{backend.topics.base}/state/engine"
    backend.wait_for(lambda s: s.topic == topic and "faults" in s.json(), 15)
    backend.publish_plan("st", {**watched, "version": 2, "faults": []})
    applied = backend.wait_for(lambda s: s.topic == backend.topics.events and s.json().get("version") == 2, 15)
    assert applied[0].json()["type"] == "plan_applied"
    with backend._changed:
        before = sum(1 for s in backend.seen if s.topic == topic)
    # two may have been on their way already (one in flight, one stored; only the newest is kept): the third is not
    latest = backend.wait_for(lambda s: s.topic == topic, 15, count=before + 3)[-1].json()
    assert "faults" not in latest and latest["values"], latest


def test_a_telemetry_batch_the_store_cannot_take_is_counted_as_dropped(service, backend):
    """A full or read-only disk: the batch is lost, and was counted only among the store's own errors; the
    telemetry metric said nothing was dropped. It counts `not_stored` now. (SQLite's own SQLITE_READONLY,
    `PRAGMA query_only` on the agent's connection, stands in for the failing disk.)"""
    backend.publish_plan("t", plan("t", 1, signals=[SPEED], batch={"max_age_ms": 100, "max_samples": 1}))
    backend.wait_for(lambda s: s.topic == f"{backend.topics.base}/telemetry", 15)
    not_stored = service.collection.metrics.telemetry_dropped.labels("not_stored")
    with service.store._lock:
        service.store._db.execute("PRAGMA query_only = 1")
    try:
        assert wait_until(lambda: not_stored._value.get() >= 2, 10)
    finally:
        with service.store._lock:
            service.store._db.execute("PRAGMA query_only = 0")
    assert service.collection.metrics.telemetry_dropped.labels("bound")._value.get() == 0
