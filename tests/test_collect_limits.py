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
from collect_support import plan
from mqtt_support import validate_published

from agent.devtools.local_broker import LocalBroker
from agent.fleet.caller import Caller
from agent.system.service import Service

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
        with Caller(config.mqtt, config.vehicle) as backend:
            backend.subscribe(f"{backend.topics.base}/#")
            svc = Service(config)
            svc.start()
            try:
                assert svc.link.wait_connected(10), svc.link.last_error
                backend.wait_status("online", 10)
                yield svc, backend
            finally:
                svc.stop()
            validate_published(backend.seen, backend.topics.base)

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
    caplog.set_level(logging.DEBUG, logger="agent.collect.collector")
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
