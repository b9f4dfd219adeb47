"""Command validation against the config: typed params, and errors naming the bad field."""

import pytest

from agent.wire import command as c
from agent.wire.parse import InvalidCommandError, UnknownComponentError, parse_command

NOW = 1_700_000_000.0


def parse(vehicle, **fields):
    body = {"id": "c-1", "component": "engine", "command": "read_data", "params": {"data": "vin"}}
    body.update(fields)
    body = {k: v for k, v in body.items() if v is not None}
    return parse_command(body, vehicle, NOW)


def problems(vehicle, **fields):
    with pytest.raises(InvalidCommandError) as info:
        parse(vehicle, **fields)
    return dict(info.value.problems), info.value.command_id


def test_read_data_by_name_hex_and_list(vehicle):
    command = parse(vehicle, params={"data": ["vin", "0xF40C", "0x1234"]})
    dids = command.params.dids
    assert [d.name for d in dids] == ["vin", "engine_speed", "0x1234"]
    assert dids[2].codec == "raw" and dids[2].length is None
    assert command.received_at == NOW and command.timeout_ms is None


@pytest.mark.parametrize(("command", "params", "expected"), [
    ("read_faults", {}, c.ReadFaults(0xFF, False, False)),
    ("read_faults", {"status_mask": "0x08", "snapshots": True}, c.ReadFaults(0x08, True, False)),
    ("clear_faults", {}, c.ClearFaults(0xFFFFFF)),
    ("clear_faults", {"group": "P0301"}, c.ClearFaults(0x030100)),
    ("clear_faults", {"group": "0x000100"}, c.ClearFaults(0x000100)),
    ("set_session", {"session": "extended"}, c.SetSession(3, "extended")),
    ("set_session", {"session": "0x60"}, c.SetSession(0x60, "0x60")),
    ("reset", {"type": "key_off_on"}, c.Reset(2)),
    ("security_access", {"level": 1}, c.SecurityAccess(1)),
    ("operation", {"routine": "self_test", "action": "start"}, c.Operation(0x0203, 1, b"")),
    ("operation", {"routine": "0xFF00", "action": "results", "data": "0102"}, c.Operation(0xFF00, 3, b"\x01\x02")),
    ("tester_present", {}, c.TesterPresent()),
    ("raw", {"request": "22 F1 90"}, c.Raw(bytes.fromhex("22F190"))),
])
def test_params(vehicle, command, params, expected):
    assert parse(vehicle, command=command, params=params).params == expected


def test_write_data_encodes_value(vehicle):
    params = parse(vehicle, command="write_data", params={"data": "idle_mode", "value": "high"}).params
    assert params.did.id == 0x0100 and params.payload == b"\x02"


def test_io_control_adjust_encodes_value(vehicle):
    params = parse(vehicle, command="io_control",
                   params={"data": "engine_speed", "control": "adjust", "value": 1000}).params
    assert (params.control, params.payload) == (3, bytes.fromhex("0FA0"))
    freeze = parse(vehicle, command="io_control", params={"data": "engine_speed", "control": "freeze"}).params
    assert (freeze.control, freeze.payload) == (2, b"")


def test_top_level_errors_name_fields(vehicle):
    found, command_id = problems(vehicle, id="c-2", timeout_ms=0, expires_at="tomorrow", extra=True,
                                 reply_to="a/+/b", command="fly")
    assert command_id == "c-2"
    assert found["timeout_ms"] == "0 is not a positive integer"
    assert "not an RFC 3339 timestamp" in found["expires_at"]
    assert found["extra"] == "unknown key"
    assert "wildcard" in found["reply_to"]
    assert found["command"].startswith("expected one of read_data")


def test_bad_id_is_reported_without_an_id(vehicle):
    found, command_id = problems(vehicle, id="has space")
    assert command_id is None and "id" in found
    with pytest.raises(InvalidCommandError) as info:
        parse_command(["not", "an", "object"], vehicle, NOW)
    assert info.value.command_id is None and "expected a mapping" in str(info.value)


@pytest.mark.parametrize(("command", "params", "path", "text"), [
    ("read_data", {"data": ["vin", "nope"]}, "params.data[1]", "engine has no DID named 'nope'"),
    ("read_data", {"data": 5}, "params.data", "expected a DID name"),
    ("read_data", {"data": []}, "params.data", "at least one DID"),
    ("read_data", {}, "params.data", "required field is missing"),
    ("read_data", {"data": "vin", "colour": 1}, "params.colour", "unknown key"),
    ("write_data", {"data": "idle_mode", "value": "turbo"}, "params.value", "not a valid value for idle_mode"),
    ("write_data", {"data": "idle_mode"}, "params.value", "required field is missing"),
    ("read_faults", {"status_mask": 300}, "params.status_mask", "not a status mask byte"),
    ("read_faults", {"snapshots": "yes"}, "params.snapshots", "expected true or false"),
    ("clear_faults", {"group": "X999"}, "params.group", "expected a DTC code like P0301"),
    ("set_session", {"session": "sporty"}, "params.session", "expected one of default, programming"),
    ("reset", {"type": 1}, "params.type", "expected one of hard"),
    ("security_access", {"level": 3}, "params.level", "no key algorithm for level 3"),
    ("operation", {"routine": "warp", "action": "start"}, "params.routine", "no routine named 'warp'"),
    ("operation", {"routine": "self_test", "action": "go"}, "params.action", "expected one of start, stop"),
    ("io_control", {"data": "engine_speed", "control": "adjust"}, "params.value", "required when control is adjust"),
    ("io_control", {"data": "engine_speed", "control": "freeze", "value": 1}, "params.value", "only used with"),
    ("raw", {"request": "zz"}, "params.request", "not a hex string"),
    ("raw", {"request": ""}, "params.request", "at least the service id"),
])
def test_param_errors(vehicle, command, params, path, text):
    found, _ = problems(vehicle, command=command, params=params)
    assert path in found, found
    assert text in found[path]


def test_unknown_component(vehicle):
    with pytest.raises(UnknownComponentError) as info:
        parse(vehicle, component="warp_drive")
    assert info.value.command_id == "c-1"


def test_timeout_capped_and_expiry_parsed(vehicle):
    command = parse(vehicle, timeout_ms=10**7, expires_at="2026-11-28T10:00:01.5Z")
    assert command.timeout_ms == vehicle.max_command_timeout_ms
    assert command.expires_at == 1795860001.5
    assert parse(vehicle, expires_at="2026-11-28T12:00:01+02:00").expires_at == 1795860001.0


def test_progress_is_a_strict_boolean_defaulting_to_false(vehicle):
    assert parse(vehicle).progress is False
    assert parse(vehicle, progress=True).progress is True
    assert parse(vehicle, progress=False).progress is False
    for bad, shown in (("true", "string 'true'"), (1, "int 1"), (0, "int 0"), ([], "a list"), ({}, "a mapping")):
        found, command_id = problems(vehicle, progress=bad)
        assert command_id == "c-1" and found == {"progress": f"expected true or false, got {shown}"}
