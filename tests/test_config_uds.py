"""Config for UDS done right: what start-up would refuse is refused by check-config (with a path, exit 78),
response-id collisions in every addressing mode, per-ECU UDS standard, raw policy keys, ISO-TP parameters."""

import copy
import itertools
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from agent.config import parse_config
from agent.config.model import ADDRESSING_MODES
from agent.core.runtime import Runtime
from agent.errors import ConfigError

MINIMAL = {
    "vehicle": "VIN1",
    "bus": {"interface": "virtual", "channel": "x"},
    "ecus": [{"name": "engine", "addressing": {"mode": "normal_11bit", "request_id": 0x7E0, "response_id": 0x7E8}}],
}


def with_ecu(**ecu):
    data = copy.deepcopy(MINIMAL)
    data["ecus"][0].update(ecu)
    return data


def problems_of(data):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return dict(info.value.problems)


def test_mixed_29bit_needs_target_and_source():
    data = with_ecu(addressing={"mode": "mixed_29bit", "request_id": 0x18CE10F1, "response_id": 0x18CEF110,
                                "address_extension": 1})
    assert problems_of(data) == {"ecus[0].addressing.target_address": "required field is missing",
                                 "ecus[0].addressing.source_address": "required field is missing"}


FIELDS = {"request_id": 0x700, "response_id": 0x708, "target_address": 0x10, "source_address": 0xF1,
          "address_extension": 0x22, "functional_id": 0x7DF}


@pytest.mark.parametrize("mode", ADDRESSING_MODES)
def test_what_parses_also_starts(mode):
    """Every combination of addressing fields either fails check-config or builds its can-isotp link."""
    wide = mode.endswith("29bit")
    for present in itertools.product((False, True), repeat=len(FIELDS)):
        addressing = {"mode": mode}
        for (key, value), given in zip(FIELDS.items(), present, strict=True):
            if given:
                addressing[key] = value | (0x18DA0000 if wide and key.endswith("_id") else 0)
        try:
            config = parse_config(with_ecu(addressing=addressing))
        except ConfigError:
            continue
        Runtime(config, sink=lambda result: None)  # builds the ISO-TP links exactly as start-up does


@pytest.mark.parametrize("isotp", [
    {"padding": 0xCC, "block_size": 8, "st_min": 0xF1},
    {"fd": True, "data_length": 64, "padding": 0xAA, "max_pdu": 70000},
    {"fd": True, "data_length": 12},
    {"wftmax": 0}, {"wftmax": 255},
])
def test_isotp_parameters_that_parse_also_start(isotp):
    data = with_ecu(isotp=isotp)
    data["bus"]["fd"] = True
    Runtime(parse_config(data), sink=lambda result: None)


@pytest.mark.parametrize(("first", "second"), [
    ({"mode": "extended_11bit", "request_id": 0x6F1, "response_id": 0x640, "target_address": 0x40,
      "source_address": 0xF1},
     {"mode": "extended_11bit", "request_id": 0x6F1, "response_id": 0x640, "target_address": 0x41,
      "source_address": 0xF1}),
    ({"mode": "mixed_11bit", "request_id": 0x700, "response_id": 0x708, "address_extension": 1},
     {"mode": "mixed_11bit", "request_id": 0x701, "response_id": 0x708, "address_extension": 2}),
    ({"mode": "normal_fixed_29bit", "target_address": 0x10, "source_address": 0xF1},
     {"mode": "normal_fixed_29bit", "target_address": 0x10, "source_address": 0xF1}),
    ({"mode": "normal_fixed_29bit", "target_address": 0x10, "source_address": 0xF1},
     {"mode": "normal_29bit", "request_id": 0x18DA10F2, "response_id": 0x18DAF110}),
])
def test_response_id_collisions_in_every_mode(first, second):
    data = copy.deepcopy(MINIMAL)
    data["ecus"] = [{"name": "a", "addressing": first}, {"name": "b", "addressing": second}]
    problems = problems_of(data)
    assert list(problems.values()) == ["already used by ecus[0]"]
    assert next(iter(problems)).startswith("ecus[1].addressing")


def test_distinct_response_ids_pass():
    data = copy.deepcopy(MINIMAL)
    data["ecus"].append({"name": "body", "addressing": {
        "mode": "extended_11bit", "request_id": 0x6F1, "response_id": 0x641, "target_address": 0x40,
        "source_address": 0xF1}})
    assert len(parse_config(data).ecus) == 2


def test_uds_standard():
    assert parse_config(MINIMAL).ecus[0].uds_standard == 2013
    assert parse_config(with_ecu(uds_standard=2006)).ecus[0].uds_standard == 2006
    assert problems_of(with_ecu(uds_standard=2010)) == {
        "ecus[0].uds_standard": "expected one of 2006, 2013, 2020, got 2010"}


def test_raw_services_and_undeclared_ids():
    ecu = parse_config(with_ecu(raw_services=["0x22", 0x19, "0x85"], allow_undeclared_ids=True)).ecus[0]
    assert ecu.raw_services == {0x22, 0x19, 0x85} and ecu.allow_undeclared_ids is True
    assert parse_config(MINIMAL).ecus[0].raw_services == frozenset()
    assert parse_config(MINIMAL).ecus[0].allow_undeclared_ids is False
    problems = problems_of(with_ecu(raw_services=["0x10", "0x62", "0x2E"], allow_undeclared_ids="yes"))
    assert problems["ecus[0].raw_services[0]"] == "0x10 has its own command: allow set_session to send it with raw"
    assert problems["ecus[0].raw_services[1]"] == "0x62 is not a request service id"
    assert problems["ecus[0].raw_services[2]"] == "0x2E has its own command: allow write_data to send it with raw"
    assert "ecus[0].allow_undeclared_ids" in problems


def test_wftmax_and_bitrate_switch():
    assert parse_config(MINIMAL).ecus[0].isotp.wftmax == 5
    assert parse_config(with_ecu(isotp={"wftmax": 0})).ecus[0].isotp.wftmax == 0
    assert "ecus[0].isotp.wftmax" in problems_of(with_ecu(isotp={"wftmax": 256}))
    data = with_ecu(isotp={"fd": True, "data_length": 64})
    data["bus"].update(fd=True)
    assert parse_config(data).ecus[0].isotp.bitrate_switch is False  # no data bitrate: no switch
    data["bus"].update(data_bitrate=2_000_000)
    assert parse_config(data).ecus[0].isotp.bitrate_switch is True
    data["ecus"][0]["isotp"] = {}
    assert parse_config(data).ecus[0].isotp.bitrate_switch is False  # classic frames never switch


def test_functional_id_needs_normal_addressing():
    data = with_ecu(addressing={"mode": "extended_11bit", "request_id": 0x6F1, "response_id": 0x640,
                                "target_address": 0x40, "source_address": 0xF1, "functional_id": 0x7DF})
    assert problems_of(data) == {
        "ecus[0].addressing.functional_id": "functional requests are supported with normal addressing modes only"}


def test_check_config_reports_what_start_up_would_refuse(tmp_path):
    data = with_ecu(addressing={"mode": "mixed_29bit", "request_id": 0x18CE10F1, "response_id": 0x18CEF110,
                                "address_extension": 1})
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "agent", "check-config", "-c", str(path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 78, result.stdout
    assert "ecus[0].addressing.target_address: required field is missing" in result.stderr
    assert "Traceback" not in result.stderr
