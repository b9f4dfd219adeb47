"""A broker that comes back without the agent's session (restarted without persistence): Session Present 0.

Real Mosquitto and the whole agent in-process; between them a relay (fake_broker.Gate) that keeps the
agent out while the broker restarts, so that the backend is subscribed again before the agent returns.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

import pytest
from fake_broker import Gate

from agent.bus.owner import wait_until
from agent.devtools.local_broker import LocalBroker
from agent.devtools.sim.config import fault_from_dict
from agent.fleet.caller import Caller
from agent.system.service import Service


def read_vin() -> dict:
    return {"id": f"s-{uuid.uuid4().hex[:10]}", "component": "engine", "command": "read_data",
            "params": {"data": "vin"}}


@pytest.fixture(params=[False, True], ids=["forgets", "persists"])
def forgetful(request, tmp_path):
    """A Mosquitto whose restart forgets every session, subscription and queued message (no persistence), or
    keeps them (persistence: Session Present 1, the commands whose PUBACK was held are delivered again)."""
    extra = "" if request.param else "persistence false\n"
    broker = LocalBroker(tmp_path / "broker", extra=extra).start()
    gate = Gate(broker.port)
    yield broker, gate, request.param
    gate.close()
    broker.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_broker_restart_with_or_without_the_session_loses_no_command_the_agent_took_and_no_response(
        forgetful, mqtt_vehicle, sim, caplog, protocol):
    """Commands running, queued and waiting with their PUBACK held when the broker restarts, forgetting the
    session or not: each runs once, every final reaches the backend, and new commands are taken (the
    subscription made again on a connection that has no session)."""
    caplog.set_level(logging.INFO, logger="agent.fleet.link")
    broker, gate, persists = forgetful
    engine = dataclasses.replace(mqtt_vehicle.ecus[0], queue_size=1)
    config = dataclasses.replace(mqtt_vehicle, ecus=[engine, *mqtt_vehicle.ecus[1:]],
                                 mqtt=dataclasses.replace(mqtt_vehicle.mqtt, broker=gate.url, protocol=protocol))
    direct = dataclasses.replace(config.mqtt, broker=broker.url)
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "pending": 20})])
    bodies = [read_vin() for _ in range(4)]  # one runs, one is queued, two wait with their PUBACK held
    svc = Service(config)
    svc.start()
    try:
        with Caller(direct, config.vehicle) as before:
            before.subscribe(f"{before.topics.base}/#")
            before.wait_status("online", 10)
            for body in bodies:
                before.send(body)
            assert wait_until(lambda: len(svc.intake.parking) == 2, 10)
            gate.shut()
            assert wait_until(lambda: not svc.link.connected, 10)
        broker.restart()
        with Caller(direct, config.vehicle) as after:
            after.subscribe(f"{after.topics.base}/#")
            assert wait_until(lambda: sim.ecu("engine").server.executed[0x22] == 4, 20)  # ran while away
            gate.open()
            assert wait_until(lambda: svc.link.connected, 30), svc.link.last_error
            connects = [r for r in caplog.records if r.getMessage() == "connected to broker"]
            assert [r.session_present for r in connects][-1] is persists
            finals = {b["id"]: after.final(b["id"], timeout=30) for b in bodies}
            assert [finals[b["id"]]["status"] for b in bodies] == ["completed"] * 4
            # the broker's redeliveries (persistence) are not answered as the backend's duplicates
            assert not [r for b in bodies for r in after.replies(b["id"]) if r.get("duplicate")]
            fresh = read_vin()
            after.send(fresh)
            assert after.final(fresh["id"], timeout=15)["status"] == "completed"
    finally:
        svc.stop()
    assert sim.ecu("engine").server.executed[0x22] == 5
