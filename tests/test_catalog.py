"""The command catalog: `key=value` words read as each command's params want them, and the catalog
checked against the validators in wire/parse.py, so the CLI, `sovd-edge commands` and the docs'
tables (all made from it) describe what the agent really accepts. Pure."""

import pytest
from conftest import ROOT

from agent.config import load_config
from agent.wire import command as c
from agent.wire.catalog import CATALOG, params_from_words
from agent.wire.parse import InvalidCommandError, parse_command

DEMO = load_config(ROOT / "config/demo.yaml")
NOW = 1_700_000_000.0


def parse(vehicle, command, params, component="engine"):
    body = {"id": "w-1", "component": component, "command": command, "params": params}
    return parse_command(body, vehicle, NOW)


def words(vehicle, command, *tokens):
    return params_from_words(command, list(tokens), vehicle.ecu("engine"))


@pytest.mark.parametrize(("command", "tokens", "params"), [
    # hex, ids and numbers-looking text reach the command exactly as typed
    ("raw", ["request=3E80"], {"request": "3E80"}),
    ("raw", ["request=1e3"], {"request": "1e3"}),
    ("read_data", ["data=F190"], {"data": "F190"}),
    ("read_data", ["data=0x7E0"], {"data": "0x7E0"}),
    ("read_data", ["data=1e3"], {"data": "1e3"}),
    ("read_data", ["data=vin,engine_speed"], {"data": ["vin", "engine_speed"]}),
    ("read_data", ['data=["vin","0xF190"]'], {"data": ["vin", "0xF190"]}),
    ("clear_faults", ["group=0301"], {"group": "0301"}),
    ("operation", ["routine=0203", "action=start", "data=0010"], {"routine": "0203", "action": "start",
                                                                  "data": "0010"}),
    # numbers where the command wants numbers, booleans where it wants booleans
    ("security_access", ["level=1"], {"level": 1}),
    ("read_faults", ["status_mask=0x08", "snapshots=true", "extended=False"],
     {"status_mask": "0x08", "snapshots": True, "extended": False}),
    # a DID value follows the DID's codec: numeric (1e3 is a thousand), enum label, text
    ("io_control", ["data=engine_speed", "control=adjust", "value=1e3"],
     {"data": "engine_speed", "control": "adjust", "value": 1000.0}),
    ("io_control", ["value=1e3", "control=adjust", "data=engine_speed"],
     {"data": "engine_speed", "control": "adjust", "value": 1000.0}),
    ("io_control", ["data=0xF40C", "control=adjust", "value=750"], {"data": "0xF40C", "control": "adjust",
                                                                    "value": 750}),
    ("write_data", ["data=idle_mode", "value=high"], {"data": "idle_mode", "value": "high"}),
    ("write_data", ["data=idle_mode", "value=2"], {"data": "idle_mode", "value": 2}),
    ("write_data", ["data=vin", "value=1e3"], {"data": "vin", "value": "1e3"}),
    # key:=JSON takes JSON as written; one JSON object is the whole params
    ("security_access", ["level:=3"], {"level": 3}),
    ("read_data", ['{"data": ["vin"]}'], {"data": ["vin"]}),
])
def test_words_become_params_as_the_command_reads_them(vehicle, command, tokens, params):
    assert words(vehicle, command, *tokens) == params


def test_the_issue_examples_reach_the_ecu_as_meant(vehicle):
    assert parse(vehicle, "raw", words(vehicle, "raw", "request=3E80")).params == c.Raw(b"\x3e\x80")
    adjust = parse(vehicle, "io_control", words(vehicle, "io_control", "data=engine_speed", "control=adjust",
                                                "value=1e3")).params
    assert adjust.payload == bytes.fromhex("0FA0")  # 1000 rpm at 0.25 rpm per bit
    read = parse(vehicle, "read_data", words(vehicle, "read_data", "data=0xF190,engine_speed")).params
    assert [d.name for d in read.dids] == ["vin", "engine_speed"]


@pytest.mark.parametrize(("tokens", "message"), [
    (["novalue"], "params: expected key=value, key:=JSON or one JSON object, got 'novalue'"),
    (['{"data": "vin" "x"}'], "params: not valid JSON (Expecting ',' delimiter at column 16): "),
    (["[1]"], "params: expected key=value"),
    (['{"a": 1'], "params: not valid JSON"),
    (["data:=[vin]"], "params.data: not valid JSON (Expecting value at column 2): [vin]"),
    (["data=[vin,engine_speed]"], "params.data: not valid JSON"),
])
def test_unreadable_words_name_the_params(vehicle, tokens, message):
    with pytest.raises(ValueError) as info:
        params_from_words("read_data", tokens, vehicle.ecu("engine"))
    assert str(info.value).startswith(message)


def test_data_that_is_neither_id_nor_name_says_both(vehicle):
    for value in ("0xZZ", "0x10000"):
        with pytest.raises(InvalidCommandError) as info:
            parse(vehicle, "read_data", {"data": value})
        message = dict(info.value.problems)["params.data"]
        assert message.startswith(f"'{value}' is neither a DID id (0x0000..0xFFFF) nor a DID name (known: vin,")
    with pytest.raises(InvalidCommandError) as info:
        parse(vehicle, "read_data", {"data": "F190"})
    assert dict(info.value.problems)["params.data"].endswith("; a DID id is written 0xF190")


def test_an_unknown_param_lists_what_the_command_takes(vehicle):
    with pytest.raises(InvalidCommandError) as info:
        parse(vehicle, "operation", {"routine": "self_test", "acton": "start"})
    problems = dict(info.value.problems)
    assert problems["params.acton"] == "unknown key (operation takes routine, action, data)"
    assert problems["params.action"] == "required field is missing"


@pytest.mark.parametrize("name", list(CATALOG))
def test_catalog_names_exactly_the_params_the_validator_reads(name):
    """Every catalogued param is read by the validator (none is refused as unknown), and the validator
    reads nothing the catalog does not list: the catalog cannot drift from parse.py."""
    from agent.config.reader import Node, Problems
    from agent.wire.parse import parse_params

    spec = CATALOG[name]
    sample = {"data": "vin", "value": "x", "control": "adjust"}
    params = {p.name: sample.get(p.name, "x") for p in spec.params}
    problems = Problems()
    node = Node(params, "params", problems)
    parse_params(name, node, DEMO.ecu("engine"))
    assert not [p for p, m in problems.items if m.startswith("unknown key")], problems.items
    assert node._taken <= {p.name for p in spec.params}


@pytest.mark.parametrize("name", list(CATALOG))
def test_every_example_is_a_valid_command_on_the_demo_vehicle(name):
    spec = CATALOG[name]
    component, command, *tokens = spec.example.split()
    assert command == name
    ecu = DEMO.ecu(component)
    params = params_from_words(command, tokens, ecu)
    body = {"id": "ex-1", "component": component, "command": command, "params": params}
    parse_command(body, DEMO, NOW)  # raises if the example were invalid
    assert (spec.needs != "") == (name in ("write_data", "security_access"))
