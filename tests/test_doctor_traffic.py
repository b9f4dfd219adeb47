"""doctor's bus checks: frames seen while listening, error counters rising (wrong bitrate), each configured
ECU answering TesterPresent. On the virtual bus with the real simulator; the kernel's counters come from
recorded `ip -json` outputs (no CAN controller in this kernel), the only stand-in here."""

import dataclasses
import json

import can
from conftest import DATA, ROOT

from agent.bus.canstate import parse_ip_link
from agent.system.doctor import FAIL, OK, SKIP, WARN, render, traffic_checks


def results(checks):
    return {c.name: c.result for c in checks}


def test_every_configured_ecu_answers(vehicle, sim):
    checks = traffic_checks(vehicle, listen_s=0.2)
    got = results(checks)
    assert got == {"frames": WARN, "error counters": SKIP, "ecu engine": OK, "ecu body": OK, "ecu gateway": OK,
                   "ecu camera": OK}  # the simulator is silent until asked
    assert "answers TesterPresent on 0x7E0" in render(checks)
    assert "CAN-H pin 6" in next(c.fix for c in checks if c.name == "frames")


def test_a_silent_ecu_fails_with_a_fix_and_no_probe_sends_nothing(vehicle, sim):
    wrong = dataclasses.replace(vehicle.ecu("body"), addressing=dataclasses.replace(
        vehicle.ecu("body").addressing, request_id=0x6F2))
    config = dataclasses.replace(vehicle, ecus=(vehicle.ecu("engine"), wrong))
    checks = {c.name: c for c in traffic_checks(config, listen_s=0.1)}
    assert checks["ecu engine"].result == OK and checks["ecu body"].result == FAIL
    assert "sovd-edge discover" in checks["ecu body"].fix and "0x6F2" in checks["ecu body"].detail
    before = sim.ecu("engine").received[0x3E]
    assert not any(name.startswith("ecu ") for name in results(traffic_checks(config, 0.1, probe=False)))
    assert sim.ecu("engine").received[0x3E] == before


def test_frames_seen_and_error_counters_rising(vehicle):
    """A socketcan config read through a virtual bus (factory) and two recorded kernel readings."""
    chatter = can.Bus(interface="virtual", channel=vehicle.bus.channel)
    task = chatter.send_periodic(can.Message(arbitration_id=0x123, data=b"\x00"), 0.01)
    good, bad = (json.loads((DATA / "iproute2" / f"{n}.json").read_text()) for n in ("error-active", "error-warning"))
    readings = iter([good, bad])

    def reader(interface):
        return parse_ip_link(json.dumps(next(readings)), interface)

    config = dataclasses.replace(vehicle, bus=dataclasses.replace(vehicle.bus, interface="socketcan", channel="can0"))
    try:
        checks = {c.name: c for c in traffic_checks(
            config, listen_s=0.3, probe=False, reader=reader,
            factory=lambda: can.Bus(interface="virtual", channel=vehicle.bus.channel))}
    finally:
        task.stop()
        chatter.shutdown()
    assert checks["frames"].result == OK and "from 1 ids" in checks["frames"].detail
    assert checks["error counters"].result == FAIL and "wrong bitrate" in checks["error counters"].fix


def test_simulated_configs_and_unopenable_buses(vehicle):
    demo = dataclasses.replace(vehicle, simulate=(ROOT / "config/sim/demo-vehicle.yaml",))
    assert results(traffic_checks(demo, 0.1)) == {"traffic": SKIP}
    broken = dataclasses.replace(vehicle, bus=dataclasses.replace(vehicle.bus, interface="nonexistent_iface"))
    (check,) = traffic_checks(broken, 0.1)
    assert check.result == FAIL and "hw/can-up" in check.fix
