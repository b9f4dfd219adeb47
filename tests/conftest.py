"""Shared fixtures: a fresh virtual CAN channel per test, the test vehicle, and a leak guard."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import can.interfaces.virtual as virtual
import pytest
from hypothesis import HealthCheck, settings

from agent.config import AgentConfig, load_config
from agent.devtools.local_broker import LocalBroker
from agent.devtools.sim.config import load_sim_config
from agent.devtools.sim.simulator import Simulator
from agent.fleet.caller import Caller
from agent.system.local import LocalSession
from agent.system.service import Service

pytest_plugins = ("pki",)  # the test-time PKI fixture

# Property-based fuzzing: a modest example count by default (CI); SOVD_FUZZ=deep or
# `--hypothesis-profile deep` for a long run. Examples share one agent and one broker, hence the
# function-scoped fixtures; the agent's own timing is not what is measured, hence no deadline.
_FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
         "derandomize": False, "print_blob": True}
settings.register_profile("ci", max_examples=25, **_FUZZ)
settings.register_profile("deep", max_examples=1500, **_FUZZ)
settings.load_profile(os.environ.get("SOVD_FUZZ", "ci"))

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True, scope="session")
def quick_notifier_stops() -> Iterator[None]:
    """Every bus stop waits out what is left of the CAN notifier's poll (0.25 s), and the suite stops buses
    over a thousand times (each Service, LocalSession and simulator): a 0.02 s poll saves minutes of CI.
    No test depends on its length; agents started as processes, and the bench, keep the real one."""
    from agent.bus import owner

    real, owner.NOTIFIER_POLL_S = owner.NOTIFIER_POLL_S, 0.02
    yield
    owner.NOTIFIER_POLL_S = real


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fails any test that leaves a thread running or a virtual bus open."""
    threads_before = set(threading.enumerate())
    channels_before = set(virtual.channels)
    yield
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        leaked = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        open_channels = set(virtual.channels) - channels_before
        if not leaked and not open_channels:
            return
        time.sleep(0.02)
    assert not leaked, f"test left threads running: {[t.name for t in leaked]}"
    assert not open_channels, f"test left virtual CAN buses open on: {sorted(map(str, open_channels))}"


@pytest.fixture
def channel() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def vehicle(channel: str) -> AgentConfig:
    config = load_config(DATA / "vehicle.yaml")
    return dataclasses.replace(config, bus=dataclasses.replace(config.bus, channel=channel))


@pytest.fixture
def sim(vehicle: AgentConfig) -> Iterator[Simulator]:
    simulator = Simulator(load_sim_config(DATA / "vehicle-sim.yaml"), bus=vehicle.bus)
    assert simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture
def agent(vehicle: AgentConfig, sim: Simulator) -> Iterator[LocalSession]:
    with LocalSession(vehicle) as session:
        yield session



# ---- MQTT fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A real Mosquitto on a free loopback port, one per test module."""
    with LocalBroker(tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def mqtt_vehicle(vehicle: AgentConfig, broker: LocalBroker, tmp_path: Path) -> AgentConfig:
    """The test vehicle with its own vehicle id (own topics and client id) on the module's broker."""
    return dataclasses.replace(
        vehicle, vehicle=f"VT{uuid.uuid4().hex[:12].upper()}", state_dir=tmp_path / "state",
        mqtt=dataclasses.replace(vehicle.mqtt, broker=broker.url),
    )


@pytest.fixture
def backend(mqtt_vehicle: AgentConfig) -> Iterator[Caller]:
    """The fleet backend's view: subscribed to everything under the vehicle's topics.

    On teardown every message the agent published is validated against docs/asyncapi.yaml.
    """
    from mqtt_support import validate_published

    with Caller(mqtt_vehicle.mqtt, mqtt_vehicle.vehicle) as caller:
        caller.subscribe(f"{caller.topics.base}/#")
        caller.subscribe("replies/#")
        yield caller
        validate_published(caller.seen, caller.topics.base)


@pytest.fixture
def service(mqtt_vehicle: AgentConfig, sim: Simulator, backend: Caller) -> Iterator[Service]:
    svc = Service(mqtt_vehicle)
    svc.start()
    assert svc.link.wait_connected(10), svc.link.last_error
    backend.wait_status("online", 10)
    yield svc
    svc.stop()


@pytest.fixture
def legacy(mqtt_vehicle: AgentConfig, sim: Simulator) -> Iterator[tuple[AgentConfig, Caller]]:
    """The agent on MQTT 3.1.1 (no Response Topic: commands name their reply topic in `reply_to`)."""
    from mqtt_support import validate_published

    config = dataclasses.replace(mqtt_vehicle, mqtt=dataclasses.replace(mqtt_vehicle.mqtt, protocol="3.1.1"))
    svc = Service(config)
    svc.start()
    try:
        with Caller(config.mqtt, config.vehicle) as backend:
            backend.subscribe(f"{backend.topics.base}/#")
            backend.subscribe("legacy/#")
            backend.wait_status("online", 10)
            yield config, backend
            validate_published(backend.seen, backend.topics.base)
    finally:
        svc.stop()
