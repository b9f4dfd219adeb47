"""Shared fixtures: a fresh virtual CAN channel per test, the test vehicle, and a leak guard."""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import can.interfaces.virtual as virtual
import pytest

from agent.config import AgentConfig, load_config
from agent.local import LocalSession
from agent.sim.config import load_sim_config
from agent.sim.simulator import Simulator

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


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

