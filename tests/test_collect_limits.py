"""Collection against a broker's size limits, end to end: the agent's Service on a real Mosquitto with a
`max_packet_size` of its own, the simulator on a virtual CAN bus.

Telemetry batches are cut to fit the smaller of `mqtt.max_payload_bytes` and the broker's announced
maximum packet size; a sample too large for any batch is left out, counted and logged; a state too
large is published without the values that do not fit, and never holds the other components' states.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator

import pytest
from collect_support import RecordingLink, plan
from mqtt_support import agent_and_backend

from agent.bus.owner import wait_until
from agent.devtools.local_broker import LocalBroker
from agent.fleet.caller import Caller
from agent.fleet.lane import TelemetryLane
from agent.store.collection import CollectionStore
from agent.store.sqlite import Store
from agent.system.service import Service
from agent.wire import messages as m

BIG = {"component": "engine", "data": ["big_block"], "every_ms": 100}  # 4095 bytes: ~8 KiB as hex


@pytest.fixture
def limited(tmp_path, sim, mqtt_vehicle):
    """`limited(max_packet, max_payload)`: the agent and a backend watching every topic, on a broker of the
    test's own whose maximum packet size is `max_packet`; everything published is validated afterwards."""
    stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def start(max_packet: int, max_payload: int | None = None) -> Iterator[tuple[Service, Caller]]:
        broker = stack.enter_context(LocalBroker(tmp_path / "broker", extra=f"max_packet_size {max_packet}\n"))
        mqtt = dataclasses.replace(mqtt_vehicle.mqtt, broker=broker.url,
                                   max_payload_bytes=max_payload or mqtt_vehicle.mqtt.max_payload_bytes)
        config = dataclasses.replace(mqtt_vehicle, mqtt=mqtt)
        with agent_and_backend(config) as pair:
            yield pair

    with stack:
        yield start


def telemetry(backend: Caller, count: int, timeout: float = 30.0) -> list:
    topic = f"{backend.topics.base}/telemetry"
    return backend.wait_for(lambda s: s.topic == topic, timeout, count)


def test_batches_of_large_readings_fit_the_payload_limit_and_none_is_refused(limited):
    """The broker's packet limit equals the configured payload limit (so it is the smaller once the topic
    counts): each ~8 KiB reading could take a batch past it; every batch arrives, none is set aside."""
    with limited(32768, 32768) as (svc, backend):
        backend.publish_plan("big", plan("big", 1, signals=[BIG, {**BIG, "data": ["engine_speed"]}],
                                         batch={"max_age_ms": 3_600_000, "max_samples": 10_000},
                                         budget={"requests_per_s": 50}))
        got = telemetry(backend, 3)
        assert svc.store.refused_messages() == []
    sizes = [len(s.payload) for s in got]
    assert all(24_000 < size <= 32768 - len(f"{backend.topics.base}/telemetry") for size in sizes), sizes
    assert [s.json()["seq"] for s in got] == [1, 2, 3]


def test_a_sample_alone_over_the_limit_is_left_out_counted_and_logged_once(limited, caplog):
    caplog.set_level(logging.DEBUG, logger="agent.collect.results")
    with limited(8192) as (svc, backend):
        backend.publish_plan("mixed", plan("mixed", 1, signals=[{**BIG, "data": ["big_block", "engine_speed"]}],
                                           batch={"max_age_ms": 300, "max_samples": 500}))
        got = telemetry(backend, 3)
        too_large = svc.collection.metrics.too_large.labels("engine")
        assert too_large._value.get() >= 3
        assert svc.store.refused_messages() == []
    assert {sample["data"] for s in got for sample in s.json()["samples"]} == {"engine_speed"}
    warned = [r for r in caplog.records if "left out of plan mixed" in r.getMessage()]
    assert [r.levelno for r in warned[:2]] == [logging.WARNING, logging.DEBUG]
    assert warned[0].data == "big_block" and warned[0].bytes > 8192


def states(backend: Caller, component: str, count: int, timeout: float = 30.0) -> list[dict]:
    topic = f"{backend.topics.base}/state/{component}"
    return [s.json() for s in backend.wait_for(lambda s: s.topic == topic, timeout, count)]


def test_a_state_over_the_limit_goes_without_what_does_not_fit_and_the_others_still_go(limited, caplog):
    """Two components whose state exceeds the broker's 8 KiB (an ~8 KiB raw value each) sort before one
    whose state fits: every state arrives, the large ones without that value, and one log line each."""
    with limited(8192) as (svc, backend):
        backend.publish_plan("three", plan("three", 1, signals=[
            {"component": "camera", "data": ["calibration", "vin"], "every_ms": 200},
            {**BIG, "data": ["big_block", "engine_speed"], "every_ms": 200},
            {"component": "gateway", "data": ["vin"], "every_ms": 200}], batch={"max_age_ms": 300, "max_samples": 1}))
        camera, engines = states(backend, "camera", 3)[-1], states(backend, "engine", 3)
        engine, gateway = engines[-1], states(backend, "gateway", 1)[0]
        # every engine state that carried big_block was trimmed (the first may predate its first reading);
        # each is counted right after the link took it, so the backend may have it a moment before
        truncated = sum("truncated" in s for s in engines)
        trimmed = svc.collection.metrics.state_oversize.labels("engine", "trimmed")
        assert truncated >= 2 and wait_until(lambda: trimmed._value.get() >= truncated, 10)
        assert svc.collection.lane.states_set_aside == 0
    assert (camera["truncated"], sorted(camera["values"])) == (["calibration"], ["vin"])
    assert (engine["truncated"], sorted(engine["values"])) == (["big_block"], ["engine_speed"])
    assert "truncated" not in gateway and sorted(gateway["values"]) == ["vin"]
    assert not [r for r in caplog.records if "telemetry lane pass failed" in r.getMessage()]
    warned = [r.component for r in caplog.records if "is larger than the payload limit" in r.getMessage()]
    assert sorted(warned) == ["camera", "engine"]  # once each, however often their state was trimmed


def test_a_state_that_cannot_fit_at_all_is_set_aside_once_and_the_next_goes(tmp_path):
    """The lane alone, on a real store: its publish callable records instead of a link (the other tests
    here run it on Mosquitto). A state whose faults alone exceed the limit is set aside, counted, logged
    once; the component after it is published, and the lane does not retry the set-aside one."""
    store = Store(tmp_path / "agent.db")
    link = RecordingLink()
    counted: list[tuple[str, str]] = []
    try:
        tables = CollectionStore(store)
        faults = [{"code": f"P{n:04d}", "status": {"raw": "0x09"}} for n in range(200)]
        tables.put_states([("body", "s/body", m.encode(m.state_message("body", 1.0, {}, faults))),
                           ("engine", "s/engine", m.encode(m.state_message("engine", 1.0, {"x": (1, 1.0)}, None)))])
        lane = TelemetryLane(tables, link.publish, lambda: True, lambda: None,
                             limit=lambda topic: 4096, on_oversize=lambda c, how: counted.append((c, how)))
        assert lane.pass_once() is True  # the engine's state awaits its PUBACK
        assert [o.topic for o in link.sent] == ["s/engine"] and counted == [("body", "set_aside")]
        assert [row.component for row in tables.unsent_states()] == ["engine"] and lane.states_set_aside == 1
        lane.published(1, 0x00)
        assert lane.pass_once() is False and len(link.sent) == 1
        assert tables.unsent_states() == []
    finally:
        store.close()
