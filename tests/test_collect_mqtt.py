"""Collection end to end: the agent's Service on a real Mosquitto, the simulator on a virtual CAN bus.

Retained plans applied, replaced and rejected; telemetry batches and retained state as the backend
receives them (validated against docs/asyncapi.yaml by the `backend` fixture); durable plans across a
restart without the broker; the telemetry lane's byte bound; exported gauges scraped by a real Prometheus.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import pytest
import yaml
from collect_support import plan
from conftest import ROOT
from prom_support import PrometheusServer

from agent.bus.owner import wait_until
from agent.config.model import CollectConfig
from agent.fleet.caller import Caller
from agent.store.collection import CollectionStore
from agent.store.sqlite import Outgoing, Store
from agent.system.service import Service

SPEED = {"component": "engine", "data": ["engine_speed", "oil_temp"], "every_ms": 100}
FAST = {"max_age_ms": 300, "max_samples": 50}


def events(backend: Caller, kind: str, count: int = 1, timeout: float = 15.0) -> list[dict]:
    found = backend.wait_for(lambda s: s.topic == backend.topics.events and s.json()["type"] == kind, timeout, count)
    return [s.json() for s in found]


def batches(backend: Caller, count: int = 1, timeout: float = 15.0, version: int | None = None) -> list[dict]:
    topic = f"{backend.topics.base}/telemetry"
    found = backend.wait_for(lambda s: s.topic == topic and (version is None or s.json()["version"] == version),
                             timeout, count)
    return [s.json() for s in found]


def test_a_retained_plan_is_applied_and_replaced_by_a_higher_version(service, backend):
    backend.publish_plan("pt", plan("pt", 1, signals=[SPEED], batch=FAST))
    assert events(backend, "plan_applied")[0] | {"at": 0} == {"type": "plan_applied", "at": 0, "name": "pt",
                                                              "version": 1}
    first = batches(backend)[0]
    assert first["plan"] == "pt" and {s["data"] for s in first["samples"]} == {"engine_speed", "oil_temp"}
    assert {s["value"] for s in first["samples"] if s["data"] == "engine_speed"} == {750}
    backend.publish_plan("pt", plan("pt", 2, signals=[{**SPEED, "data": ["oil_temp"]}], batch=FAST))
    assert events(backend, "plan_applied", 2)[1]["version"] == 2
    newer = batches(backend, version=2)[0]
    assert {s["data"] for s in newer["samples"]} == {"oil_temp"}


def test_an_invalid_plan_is_rejected_with_paths_and_the_old_one_keeps_running(service, backend):
    backend.publish_plan("pt", plan("pt", 4, signals=[SPEED], batch=FAST))
    events(backend, "plan_applied")
    backend.publish_plan("pt", plan("pt", 5, signals=[{**SPEED, "every_ms": 5, "data": ["vin"], "export": True}]))
    rejected = events(backend, "plan_rejected")[0]
    assert (rejected["name"], rejected["version"]) == ("pt", 5)
    assert {e["path"] for e in rejected["errors"]} == {"signals[0].every_ms", "signals[0].data[0]"}
    backend.publish_plan("pt", b"\xff\xfe not json")
    assert events(backend, "plan_rejected", 2)[1]["version"] is None
    seen = len(batches(backend))
    batches(backend, count=seen + 2, version=4)  # version 4 still runs
    assert service.collection.collector.plans["pt"].version == 4


def test_on_change_suppresses_steady_values_and_state_is_retained(service, backend, mqtt_vehicle):
    backend.publish_plan("steady", plan("steady", 1, signals=[{**SPEED, "on_change": True}], batch=FAST))
    events(backend, "plan_applied")
    state_topic = f"{backend.topics.base}/state/engine"
    backend.wait_for(lambda s: s.topic == state_topic, 15)
    readings = service.collection.metrics.readings.labels("engine", "ok")
    start = readings._value.get()
    deadline = time.monotonic() + 15
    while readings._value.get() < start + 10 and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a counter: readings publish nothing when they are steady
    samples = [s for b in batches(backend) for s in b["samples"]]
    assert sorted(s["data"] for s in samples) == ["engine_speed", "oil_temp"]  # once each, then only changes
    with Caller(mqtt_vehicle.mqtt, mqtt_vehicle.vehicle, client_id="late-subscriber") as late:
        late.subscribe(state_topic)
        [retained] = late.wait_for(lambda s: s.topic == state_topic, 10)
    assert retained.retained
    state = retained.json()
    assert state["component"] == "engine" and state["values"]["engine_speed"]["value"] == 750


def test_removing_a_plan_with_an_empty_retained_message(service, backend):
    backend.publish_plan("gone", plan("gone", 1, signals=[SPEED], batch=FAST))
    events(backend, "plan_applied")
    backend.publish_plan("gone", None)
    assert events(backend, "plan_removed")[0]["name"] == "gone"
    assert "gone" not in service.collection.collector.plans


def test_a_plan_removal_received_but_not_yet_decided_when_the_agent_died_comes_again(mqtt_vehicle, sim, backend):
    """A removal is an empty message the broker does not retain. It was acknowledged on receipt: an agent
    killed before its collector stored the removal ran the plan from its store after the restart, for
    good. It is acknowledged once decided now, and the broker delivers it again. (The kill is stood in
    for by holding the collector on that message while the agent stops: a SIGKILL cannot be aimed at
    that instant.)"""
    first = Service(mqtt_vehicle)
    first.start()
    hold = threading.Event()
    try:
        assert first.link.wait_connected(10)
        backend.publish_plan("gone", plan("gone", 1, signals=[SPEED], batch=FAST))
        events(backend, "plan_applied")
        collector = first.collection.collector
        decide = collector._plan_message
        collector._plan_message = lambda name, payload: hold.wait(30) if not payload else decide(name, payload)
        received = first.link.stats.messages_in
        backend.publish_plan("gone", None)
        assert wait_until(lambda: first.link.stats.messages_in > received, 10)
    finally:
        first.stop()
        hold.set()
    again = Service(mqtt_vehicle)
    again.start()
    try:
        assert events(backend, "plan_removed")[0]["name"] == "gone"
        assert "gone" not in again.collection.collector.plans
    finally:
        again.stop()


def test_a_stored_plan_collects_after_a_restart_without_the_broker(mqtt_vehicle, sim, backend):
    with_broker = Service(mqtt_vehicle)
    with_broker.start()
    try:
        assert with_broker.link.wait_connected(10)
        backend.publish_plan("durable", plan("durable", 7, signals=[SPEED], batch=FAST))
        last_seq = batches(backend)[0]["seq"]
    finally:
        with_broker.stop()
    backend.publish_plan("durable", None)  # the broker no longer has it: only the agent's store does
    offline = dataclasses.replace(mqtt_vehicle, mqtt=dataclasses.replace(mqtt_vehicle.mqtt,
                                                                         broker="mqtt://127.0.0.1:1"))
    again = Service(offline)
    again.start()
    try:
        tables = again.collection.tables
        deadline = time.monotonic() + 15
        while tables.telemetry_stats()[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tables.telemetry_stats()[0] > 0  # batches wait in the lane for the broker
        assert again.collection.collector.plans["durable"].version == 7
    finally:
        again.stop()
    assert stored_plans(offline)["durable"].seq > last_seq  # batch numbers carried on


def stored_plans(config) -> dict:
    """The plans table of an agent's store, read after the agent stopped."""
    store = Store(config.state_dir / "agent.db")
    try:
        return {row.name: row for row in CollectionStore(store).load_plans()}
    finally:
        store.close()


def test_the_telemetry_lane_drops_its_oldest_batches_beyond_its_bound_and_counts_them(mqtt_vehicle, sim, caplog):
    offline = dataclasses.replace(
        mqtt_vehicle, mqtt=dataclasses.replace(mqtt_vehicle.mqtt, broker="mqtt://127.0.0.1:1"),
        collect=CollectConfig(telemetry_max_bytes=16 * 1024, plans=(
            plan("big", 1, signals=[{"component": "engine", "data": ["big_block"], "every_ms": 100}],
                 batch={"max_age_ms": 100, "max_samples": 1}),)))
    service = Service(offline)
    service.start()
    try:
        dropped = service.collection.metrics.telemetry_dropped.labels("bound")
        deadline = time.monotonic() + 20
        while dropped._value.get() < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dropped._value.get() >= 3
        count, size = service.collection.tables.telemetry_stats()
        assert count > 0 and size <= 16 * 1024
    finally:
        service.stop()
    assert any("telemetry over its byte bound" in r.getMessage() for r in caplog.records)


def test_responses_go_first_telemetry_waits_while_the_outbox_holds_anything(tmp_path):
    store = Store(tmp_path / "agent.db")
    try:
        tables = CollectionStore(store)
        for seq in range(1, 4):
            tables.add_telemetry("t", b"x" * 100, "p", seq, 1 << 20)
        batch = store.batch()
        batch.publish(Outgoing("responses/c1", b"{}", None, "c1"))
        batch.commit()
        assert tables.promote_telemetry(2) == (0, 3)  # a response waits: telemetry stays in its lane
        [row] = store.pending(0, 10)
        store.acknowledge([row.n])
        assert tables.promote_telemetry(2) == (2, 1)
        assert [p.message.topic for p in store.pending(0, 10)] == ["t", "t"]
    finally:
        store.close()


@pytest.fixture
def edge(service, tmp_path):
    config = yaml.safe_load((ROOT / "config/prometheus/edge.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{service.metrics_server.port}"]}]
    server = PrometheusServer(tmp_path / "edge", config).start()
    yield server
    server.stop()


def test_exported_values_are_scraped_by_prometheus_and_vanish_with_their_plan(service, backend, edge):
    exported = {"component": "engine", "data": ["engine_speed", "vin"], "every_ms": 200}
    backend.publish_plan("gauges", plan("gauges", 1, signals=[{**exported, "data": ["engine_speed"], "export": True},
                                                             {**exported, "data": ["vin"]}], batch=FAST))
    events(backend, "plan_applied")
    query = 'sovd_ecu_value{component="engine",data="engine_speed"}'
    deadline = time.monotonic() + 30
    while edge.value(query) is None and time.monotonic() < deadline:
        time.sleep(0.25)
    assert edge.value(query) == 750
    found = edge.api("series", **{"match[]": "sovd_ecu_value"})
    assert {s["data"] for s in found} == {"engine_speed"}  # never the VIN
    assert json.dumps(found).count("WVWZZZ") == 0
    backend.publish_plan("gauges", None)
    events(backend, "plan_removed")
    text = _scrape(service)
    assert "sovd_ecu_value{" not in text


def _scrape(service) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_server.port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_collection_messages_carry_the_clock_mark_while_the_clock_is_unsynchronized(mqtt_vehicle, sim, backend):
    """Like responses (issue 10), telemetry, state and collection events say `"clock": "unsynchronized"`
    while the device clock is not known to be right (their timestamps may be far off). The sync source is
    injected: no timesyncd/NTP state can be set here."""
    from agent.clock import Clock

    clock = Clock(mqtt_vehicle.state_dir / "clock.json", kernel=lambda: False, daemon_present=lambda: True)
    svc = Service(mqtt_vehicle, clock=clock)
    svc.start()
    try:
        assert svc.link.wait_connected(10), svc.link.last_error
        backend.publish_plan("pt", plan("pt", 1, signals=[SPEED], batch=FAST))
        assert events(backend, "plan_applied")[0]["clock"] == "unsynchronized"
        assert batches(backend)[0]["clock"] == "unsynchronized"
        state = backend.wait_for(lambda s: s.topic == f"{backend.topics.base}/state/engine", 15)[0].json()
        assert state["clock"] == "unsynchronized"
    finally:
        svc.stop()
