"""fault_changed Events from read_faults commands, end to end: real Mosquitto, the agent's Service, the
simulator's DTCs changed by injection, and an agent restart in between (the set is in the store).

Every message the agent publishes is also validated against docs/asyncapi.yaml by the `backend` fixture."""

from __future__ import annotations

import time
import uuid
from typing import Any

from prometheus_client import generate_latest

from agent.config.model import AgentConfig
from agent.devtools.sim.config import fault_from_dict
from agent.devtools.sim.simulator import Simulator
from agent.fleet.caller import Caller
from agent.system.service import Service


def read_faults(backend: Caller, **params: Any) -> dict[str, Any]:
    command_id = f"rf-{uuid.uuid4().hex[:8]}"
    backend.request({"id": command_id, "component": "engine", "command": "read_faults", "params": params})
    final = backend.final(command_id, 15)
    assert final["status"] == "completed", final
    return final


def fault_events(backend: Caller) -> list[dict[str, Any]]:
    with backend._changed:
        seen = list(backend.seen)
    return [s.json() for s in seen if s.topic == backend.topics.events and b'"fault_changed"' in s.payload]


def wait_events(backend: Caller, total: int) -> list[dict[str, Any]]:
    """All fault_changed Events so far, once there are `total` of them."""
    backend.wait_for(lambda s: s.topic == backend.topics.events and b'"fault_changed"' in s.payload, 15, count=total)
    return fault_events(backend)


def summary(events: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    return {(e["code"], e["change"], e["previous"]["raw"], e["status"]["raw"]) for e in events}


def test_new_status_cleared_from_commands(service: Service, backend: Caller, sim: Simulator) -> None:
    read_faults(backend, snapshots=True)
    first = wait_events(backend, 2)  # the first reading of the engine: both of its faults are new
    assert summary(first) == {("P0301", "new", "0x00", "0x2F"), ("U0100", "new", "0x00", "0x09")}
    p0301 = next(e for e in first if e["code"] == "P0301")
    assert p0301["component"] == "engine" and p0301["dtc"] == "0x030100"
    assert p0301["snapshots"] == [{"record": 1, "values": {"engine_speed": 800.0}}]  # asked for: carried over

    engine = sim.ecu("engine")
    engine.set_dtc("P0301", 0x2E)  # the test passed this cycle
    engine.set_dtc("U0100-87", 0)  # healed and aged out
    engine.set_dtc("P0420", 0x08)  # a new one
    read_faults(backend)
    events = wait_events(backend, 5)
    assert summary(events[2:]) == {("P0301", "status", "0x2F", "0x2E"), ("U0100", "cleared", "0x09", "0x00"),
                                   ("P0420", "new", "0x00", "0x08")}
    assert next(e for e in events[2:] if e["code"] == "U0100")["failure_type"] == "0x87"

    # a reading with mask 0x01 (test failed) lists neither; neither is cleared. Then a change to mark the end.
    read_faults(backend, status_mask="0x01")
    engine.set_dtc("P0420", 0x09)
    read_faults(backend, status_mask="0x01")
    events = wait_events(backend, 6)
    assert summary(events[5:]) == {("P0420", "status", "0x08", "0x09")}
    assert events[5]["status_mask"] == "0x01"
    assert service.faults.known("engine") == {0x030100: 0x2E, 0x042000: 0x09}
    scrape = generate_latest(service.registry).decode()
    assert 'sovd_fault_tracking_problems_total{reason="unreadable"} 0.0' in scrape


def test_no_events_for_a_failed_reading(service: Service, backend: Caller, sim: Simulator) -> None:
    read_faults(backend)
    wait_events(backend, 2)
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x19, "nrc": 0x22})])
    command_id = "rf-refused"
    backend.request({"id": command_id, "component": "engine", "command": "read_faults"})
    assert backend.final(command_id, 15)["status"] == "failed"
    sim.ecu("engine").set_faults([])
    sim.ecu("engine").set_dtc("P0301", 0)
    read_faults(backend)
    events = wait_events(backend, 3)
    assert summary(events[2:]) == {("P0301", "cleared", "0x2F", "0x00")}  # the refusal cleared nothing


def test_the_set_survives_a_restart(mqtt_vehicle: AgentConfig, sim: Simulator, backend: Caller) -> None:
    first = Service(mqtt_vehicle)
    first.start()
    try:
        assert first.link.wait_connected(10), first.link.last_error
        backend.wait_status("online", 10)  # subscribed: a command sent before would find no session to queue it
        read_faults(backend)
        wait_events(backend, 2)
    finally:
        first.stop()
    sim.ecu("engine").set_dtc("P0420", 0x08)  # changed while the agent was down
    second = Service(mqtt_vehicle)  # same state_dir: same store
    second.start()
    try:
        assert second.link.wait_connected(10), second.link.last_error
        read_faults(backend)
        events = wait_events(backend, 3)
        # the old faults are not new again; only the change made while the agent was down is reported
        assert summary(events[2:]) == {("P0420", "new", "0x00", "0x08")}
    finally:
        second.stop()


def test_a_reading_that_waited_for_room_is_judged_with_its_own_mask(mqtt_vehicle: AgentConfig, sim: Simulator,
                                                                    backend: Caller) -> None:
    """A read_faults whose component queue was full waits (its PUBACK held) and runs later. Its reading
    with status_mask 0x01 lists neither fault (P0301 no longer has bit 0); it clears that bit of each and
    nothing else. A waiting command's entry is kept without its body (flow.Parking), so the final, when
    built from the entry kept at admission, once judged the reading with the default mask 0xFF and told
    the backend that P0301 and U0100 were gone."""
    import dataclasses

    engine = next(e for e in mqtt_vehicle.ecus if e.name == "engine")
    config = dataclasses.replace(mqtt_vehicle, ecus=tuple(dataclasses.replace(e, queue_size=1) if e is engine else e
                                                         for e in mqtt_vehicle.ecus))
    svc = Service(config)
    svc.start()
    try:
        assert svc.link.wait_connected(10), svc.link.last_error
        backend.wait_status("online", 10)
        read_faults(backend)
        wait_events(backend, 2)  # P0301 0x2F and U0100 0x09 are known
        ecu = sim.ecu("engine")
        ecu.set_dtc("P0301", 0x2E)
        ecu.set_dtc("U0100-87", 0x08)
        ecu.set_faults([fault_from_dict({"service": 0x22, "pending": 40})])
        parked: list[str] = []
        park = svc.intake.parking.park
        svc.intake.parking.park = lambda item, command, entry: parked.append(command.id) or park(item, command, entry)
        slow = [{"id": f"slow-{i}-{uuid.uuid4().hex[:6]}", "component": "engine", "command": "read_data",
                 "params": {"data": "vin"}} for i in range(4)]
        for body in slow:  # 0.8 s each: one runs, one is taken ahead, one fills the queue of 1, one waits
            backend.send(body)
        deadline = time.monotonic() + 10
        while not parked and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = f"rf-{uuid.uuid4().hex[:8]}"
        backend.send({"id": waiting, "component": "engine", "command": "read_faults",
                      "params": {"status_mask": "0x01"}})
        for body in slow:
            assert backend.final(body["id"], 15)["status"] == "completed"
        assert backend.final(waiting, 15)["status"] == "completed"
        assert waiting in parked  # it did wait for room
        events = wait_events(backend, 4)
        assert summary(events[2:]) == {("P0301", "status", "0x2F", "0x2E"), ("U0100", "status", "0x09", "0x08")}
        assert svc._entries == {}
    finally:
        svc.stop()
