"""Policy per command, per identifier and per service inside `raw`: the refusal names the rule, and
nothing of a refused command reaches the bus."""

import dataclasses

import pytest

from agent.policy.admission import Admission, refusal_reason
from agent.system.local import LocalSession
from agent.wire.command import ErrorCode, Status
from agent.wire.parse import parse_command


def engine_with(vehicle, **changes):
    ecu = dataclasses.replace(vehicle.ecu("engine"), **changes)
    return dataclasses.replace(vehicle, ecus=tuple(ecu if e.name == "engine" else e for e in vehicle.ecus))


def reason(config, command, params):
    parsed = parse_command({"id": "p", "component": "engine", "command": command, "params": params}, config, 0)
    return refusal_reason(config.ecu("engine"), parsed)


# ---- per identifier ---------------------------------------------------------------------------------

def test_write_only_to_writable_dids(vehicle):
    assert reason(vehicle, "write_data", {"data": "idle_mode", "value": "eco"}) is None
    assert reason(vehicle, "write_data", {"data": "vin", "value": "X"}) == (
        "DID vin (0xF190) is not writable on engine (config: dids[].writable)")
    assert reason(vehicle, "write_data", {"data": "0x1234", "value": "aabb"}) == (
        "DID 0x1234 is not declared for engine, so it is not writable (config: dids[].writable)")
    # opting in to undeclared ids does not make anything writable
    assert reason(engine_with(vehicle, allow_undeclared_ids=True), "write_data",
                  {"data": "0x1234", "value": "aabb"}) is not None


def test_operation_and_io_control_only_on_declared_ids_unless_opted_in(vehicle):
    assert reason(vehicle, "operation", {"routine": "self_test", "action": "start"}) is None
    assert reason(vehicle, "operation", {"routine": "0xFF00", "action": "start"}) == (
        "routine 0xFF00 is not declared for engine (config: routines, or allow_undeclared_ids)")
    assert reason(vehicle, "io_control", {"data": "engine_speed", "control": "freeze"}) is None
    assert reason(vehicle, "io_control", {"data": "0x1234", "control": "freeze"}) == (
        "DID 0x1234 is not declared for engine (config: dids, or allow_undeclared_ids)")
    opted_in = engine_with(vehicle, allow_undeclared_ids=True)
    assert reason(opted_in, "operation", {"routine": "0xFF00", "action": "start"}) is None
    assert reason(opted_in, "io_control", {"data": "0x1234", "control": "freeze"}) is None


# ---- raw carries the policy of the service inside it -----------------------------------------------

@pytest.mark.parametrize(("request_hex", "rule"), [
    ("1101", "raw service 0x11 needs reset enabled for engine too (config: allow)"),
    ("14FFFFFF", "raw service 0x14 needs clear_faults enabled for engine too (config: allow)"),
    ("1003", "raw service 0x10 needs set_session enabled for engine too (config: allow)"),
    ("2701", "raw service 0x27 needs security_access enabled for engine too (config: allow)"),
    ("2EF19041", "raw service 0x2E needs write_data enabled for engine too (config: allow)"),
    ("31010203", "raw service 0x31 needs operation enabled for engine too (config: allow)"),
    ("2FF40C02", "raw service 0x2F needs io_control enabled for engine too (config: allow)"),
    ("2803", "raw service 0x28 is not enabled for engine (config: raw_services)"),
    ("3101", "raw service 0x31 needs operation enabled for engine too (config: allow)"),
    ("3D1220000410AA", "raw service 0x3D is not enabled for engine (config: raw_services)"),
    ("85", "raw service 0x85 is not enabled for engine (config: raw_services)"),
    ("2E", "raw service 0x2E needs write_data enabled for engine too (config: allow)"),
    ("19020F", "raw service 0x19 is not enabled for engine (config: raw_services)"),
])
def test_raw_needs_the_command_of_its_service(vehicle, request_hex, rule):
    read_only = engine_with(vehicle, allow=frozenset({"read_data", "raw"}), raw_services=frozenset({0x22}))
    assert reason(read_only, "raw", {"request": request_hex}) == rule
    assert reason(read_only, "raw", {"request": "22F190"}) is None


def test_raw_of_an_allowed_command_keeps_its_identifier_rules(vehicle):
    assert reason(vehicle, "raw", {"request": "2E010001"}) is None  # idle_mode is writable
    assert reason(vehicle, "raw", {"request": "2EF19041"}) == (
        "DID vin (0xF190) is not writable on engine (config: dids[].writable)")
    assert reason(vehicle, "raw", {"request": "2E"}) == (
        "raw service 0x2E without a DID cannot be checked against engine's DIDs")
    assert reason(vehicle, "raw", {"request": "3101FF00"}) == (
        "routine 0xFF00 is not declared for engine (config: routines, or allow_undeclared_ids)")
    assert reason(vehicle, "raw", {"request": "31"}) == (
        "raw service 0x31 without a routine id cannot be checked against engine's routines")
    assert reason(vehicle, "raw", {"request": "2F123403"}) == (
        "DID 0x1234 is not declared for engine (config: dids, or allow_undeclared_ids)")
    assert reason(vehicle, "raw", {"request": "1101"}) is None
    assert reason(vehicle, "raw", {"request": "3E00"}) is None  # listed in raw_services


def test_admission_kinds():
    denied = Admission.denied("the rule")
    assert denied is not Admission.QUEUED and denied.kind == Admission.NOT_PERMITTED.kind
    outcome = denied.refusal("engine", "raw")
    assert (outcome.status, outcome.error.code, outcome.error.message) == (
        Status.REJECTED, ErrorCode.NOT_PERMITTED, "the rule")
    assert Admission.NOT_PERMITTED.refusal("body", "reset").error.message == (
        "reset is not enabled for body (config: allow)")


# ---- end to end: the refusal is a result, and the ECU never hears of it ----------------------------

@pytest.mark.parametrize(("config_change", "command", "params", "service"), [
    ({}, "write_data", {"data": "vin", "value": "WVWZZZ1JZXW000001"}, 0x2E),
    ({}, "io_control", {"data": "0x1234", "control": "freeze"}, 0x2F),
    ({}, "operation", {"routine": "0xFF00", "action": "start"}, 0x31),
    ({"allow": frozenset({"read_data", "raw"}), "raw_services": frozenset({0x22})}, "raw", {"request": "1101"}, 0x11),
    ({"allow": frozenset({"read_data", "raw"}), "raw_services": frozenset({0x22})}, "raw",
     {"request": "14FFFFFF"}, 0x14),
])
def test_refused_commands_never_reach_the_bus(vehicle, sim, config_change, command, params, service):
    with LocalSession(engine_with(vehicle, **config_change)) as agent:
        command_id, admission = agent.submit("engine", command, params)
        result = agent.wait(command_id, 5)
        assert admission.kind == "not_permitted"
        assert (result.status, result.outcome.error.code) == (Status.REJECTED, ErrorCode.NOT_PERMITTED)
        assert "(config: " in result.outcome.error.message  # it names the rule
        assert agent.run("engine", "read_data", {"data": "oil_temp"}).status is Status.COMPLETED
    ecu = sim.ecu("engine")
    assert ecu.received[service] == 0 and ecu.received[0x22] == 1


def test_opted_in_undeclared_ids_reach_the_ecu(vehicle, sim):
    with LocalSession(engine_with(vehicle, allow_undeclared_ids=True)) as agent:
        result = agent.run("engine", "operation", {"routine": "0xFF00", "action": "start"})
    assert result.status is Status.FAILED and result.outcome.error.as_dict()["nrc"] == "0x31"  # the ECU's answer
    assert sim.ecu("engine").received[0x31] == 1
