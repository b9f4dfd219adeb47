"""Config validation: shipped files are valid; every error is reported at once with its path."""

import copy
import subprocess
import sys

import pytest
import yaml
from conftest import DATA, ROOT

from agent.config import load_config, parse_config
from agent.errors import ConfigError

MINIMAL = {
    "vehicle": "VIN1",
    "bus": {"interface": "virtual", "channel": "x"},
    "ecus": [{"name": "engine", "addressing": {"mode": "normal_11bit", "request_id": 0x7E0, "response_id": 0x7E8}}],
}


def problems_of(data):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return dict(info.value.problems)


@pytest.mark.parametrize("path", ["config/agent.example.yaml", "config/demo.yaml", "tests/data/vehicle.yaml"])
def test_shipped_configs_are_valid(path):
    config = load_config(ROOT / path)
    assert config.ecus


def test_example_is_a_pi_on_can0_and_demo_is_virtual_with_sim():
    example = load_config(ROOT / "config/agent.example.yaml")
    assert (example.bus.interface, example.bus.channel) == ("socketcan", "can0")
    demo = load_config(ROOT / "config/demo.yaml")
    assert demo.bus.interface == "virtual" and demo.simulate
    assert {"engine", "abs"} <= {e.name for e in demo.ecus}
    assert demo.ecu("engine").did_by_name("vin").length == 17


def test_minimal_defaults():
    config = parse_config(MINIMAL)
    engine = config.ecu("engine")
    assert engine.allow == {"read_data", "read_faults", "tester_present", "obd"}
    assert config.mqtt.prefix == "sovd" and config.mqtt.protocol == "5"
    assert config.mqtt.session_expiry_s == 7 * 24 * 3600
    assert engine.isotp.padding is None and engine.isotp.data_length == 8


def test_every_error_reported_with_its_path():
    data = copy.deepcopy(MINIMAL)
    data["vehicle"] = "bad/vehicle"
    data["surprise"] = 1
    data["bus"]["bitrate"] = "fast"
    data["ecus"].append({
        "name": "abs",
        "addressing": {"mode": "normal_11bit", "request_id": 0x800, "response_id": "0x7E8", "colour": "red"},
        "isotp": {"data_length": 64},
        "dids": [{"name": "vin", "id": 0x1F190, "codec": "ascii"}, {"name": "x", "id": 1, "codec": "float"}],
        "security": [{"level": 2, "algorithm": "nowhere.module:fn"}],
        "allow": ["read_data", "fly"],
    })
    problems = problems_of(data)
    assert problems["vehicle"] == "'bad/vehicle' is not a vehicle id without / + # or spaces"
    assert problems["surprise"] == "unknown key"
    assert problems["bus.bitrate"].startswith("expected an integer")
    assert problems["ecus[1].addressing.request_id"] == "2048 is not an 11-bit CAN id"
    assert problems["ecus[1].addressing.colour"] == "unknown key"
    assert problems["ecus[1].addressing.response_id"] == "already used by ecus[0]"
    assert problems["ecus[1].isotp.data_length"] == "lengths above 8 need fd: true"
    assert problems["ecus[1].dids[0].id"] == "127376 is not a 16-bit DID"
    assert problems["ecus[1].dids[0].length"] == "required field is missing"
    assert problems["ecus[1].dids[1].codec"].startswith("expected one of ascii, unsigned")
    assert "is not odd" in problems["ecus[1].security[0].level"]
    assert "cannot be loaded" in problems["ecus[1].security[0].algorithm"]
    assert problems["ecus[1].allow[1]"].startswith("expected one of read_data")


def test_hex_strings_and_29bit_ids():
    data = copy.deepcopy(MINIMAL)
    data["ecus"][0]["addressing"] = {"mode": "normal_29bit", "request_id": "0x18DA10F1", "response_id": "0x18DAF110"}
    assert parse_config(data).ecus[0].addressing.request_id == 0x18DA10F1
    data["ecus"][0]["addressing"]["request_id"] = "0x20000000"
    assert problems_of(data) == {"ecus[0].addressing.request_id": "0x20000000 is not a 29-bit CAN id"}


@pytest.mark.parametrize(("mode", "missing"), [
    ("extended_11bit", "target_address"),
    ("normal_fixed_29bit", "source_address"),
    ("mixed_11bit", "address_extension"),
])
def test_addressing_modes_need_their_fields(mode, missing):
    data = copy.deepcopy(MINIMAL)
    data["ecus"][0]["addressing"] = {"mode": mode, "request_id": 0x700, "response_id": 0x708,
                                     "target_address": 1, "source_address": 2, "address_extension": 3}
    del data["ecus"][0]["addressing"][missing]
    if mode == "normal_fixed_29bit":
        del data["ecus"][0]["addressing"]["request_id"], data["ecus"][0]["addressing"]["response_id"]
    assert problems_of(data) == {f"ecus[0].addressing.{missing}": "required field is missing"}


def test_fd_ecu_needs_fd_bus():
    data = copy.deepcopy(MINIMAL)
    data["ecus"][0]["isotp"] = {"fd": True, "data_length": 64}
    assert problems_of(data) == {"ecus[0].isotp.fd": "this ECU uses CAN FD but bus.fd is false"}
    data["bus"]["fd"] = True
    assert parse_config(data).ecus[0].isotp.data_length == 64


def test_clear_text_password_refused():
    data = copy.deepcopy(MINIMAL)
    data["mqtt"] = {"password": "hunter2", "broker": "http://x"}
    problems = problems_of(data)
    assert "clear-text passwords are not accepted" in problems["mqtt.password"]
    assert problems["mqtt.broker"] == "'http://x' is not mqtt://HOST:PORT or mqtts://HOST:PORT"


def test_enum_and_codec_options():
    data = copy.deepcopy(MINIMAL)
    data["ecus"][0]["dids"] = [
        {"name": "gear", "id": 1, "codec": "enum", "length": 1},
        {"name": "vin", "id": 2, "codec": "ascii", "length": 17, "scale": 2},
        {"name": "vin", "id": 2, "codec": "raw"},
    ]
    problems = problems_of(data)
    assert problems["ecus[0].dids[0].values"] == "an enum DID needs a values table"
    assert "only apply to unsigned and signed" in problems["ecus[0].dids[1]"]
    assert problems["ecus[0].dids[2].name"] == "duplicate DID name 'vin'"
    assert problems["ecus[0].dids[2].id"] == "duplicate DID id 0x0002"


def test_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vehicle: x\nbus: [unclosed\n")
    with pytest.raises(ConfigError, match="line 3, column 1: not valid YAML"):
        load_config(bad)


def test_check_config_cli_exit_codes(tmp_path):
    good = subprocess.run([sys.executable, "-m", "agent", "check-config", "-c", str(DATA / "vehicle.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    assert "OK" in good.stdout and "4 ECUs" in good.stdout
    data = copy.deepcopy(MINIMAL)
    data["ecus"][0]["addressing"]["request_id"] = 0x800
    data["ecus"][0]["timing"] = {"p2_ms": 0}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "agent", "check-config", "-c", str(bad)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 78
    assert "ecus[0].addressing.request_id: 2048 is not an 11-bit CAN id" in result.stderr
    assert "ecus[0].timing.p2_ms: 0 is out of range 1..600000" in result.stderr


def test_flow_control_defaults_and_receive_maximum_within_what_can_wait():
    config = parse_config(MINIMAL)
    assert (config.mqtt.receive_maximum, config.mqtt.max_waiting_commands) == (32, 1000)
    assert config.mqtt.max_payload_bytes == 256 * 1024  # docs/protocol.md says 256 KiB
    data = {**MINIMAL, "mqtt": {"receive_maximum": 50, "max_waiting_commands": 10}}
    assert "must not exceed max_waiting_commands (10)" in problems_of(data)["mqtt.receive_maximum"]
    zero = problems_of({**MINIMAL, "mqtt": {"receive_maximum": 0}})
    assert zero["mqtt.receive_maximum"] == "0 is out of range 1..65535"
