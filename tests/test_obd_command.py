"""The `obd` command: params validated with field paths, exact request bytes, decoded results, fault texts."""

import dataclasses
import time

import pytest

from agent.config.parse import parse_config
from agent.errors import ConfigError
from agent.uds.executor import Executor
from agent.wire import command as c
from agent.wire.command import ErrorCode, Status
from agent.wire.parse import InvalidCommandError, parse_command


class ScriptedLink:
    """Stand-in for ISO-TP that records requests and replays canned responses (exact bytes)."""

    def __init__(self, *responses):
        self.responses = list(responses)
        self.sent = []

    def send(self, payload, timeout):
        self.sent.append(bytes(payload))

    def recv(self, timeout, limit=None):
        return bytes.fromhex(self.responses.pop(0)) if self.responses else None

    def flush(self):
        pass


def parse(vehicle, params, component="engine"):
    return parse_command({"id": "o-1", "component": component, "command": "obd", "params": params}, vehicle, 0)


def problems(vehicle, params):
    with pytest.raises(InvalidCommandError) as info:
        parse(vehicle, params)
    return dict(info.value.problems)


def run(ecu, params, *responses):
    link = ScriptedLink(*responses)
    outcome = Executor(ecu, link).execute(params, time.monotonic() + 2)
    return [s.hex() for s in link.sent], outcome


def test_params(vehicle):
    command = parse(vehicle, {"pids": ["engine_speed", "0x0d", "0x9D"][:2], "supported": True,
                              "info": ["vin", "calibration_ids"], "dtcs": "stored"})
    assert command.params == c.Obd(pids=(0x0C, 0x0D), supported=True, info=("vin", "calibration_ids"),
                                   dtcs=("stored",))
    assert parse(vehicle, {"pids": "0x9D"}).params.pids == (0x9D,)


@pytest.mark.parametrize(("params", "field", "says"), [
    ({}, "params", "at least one of pids, supported, info, dtcs"),
    ({"pids": []}, "params", "at least one"),
    ({"pids": ["engine_speed"] * 2}, "params.pids", "twice"),
    ({"pids": [f"0x{p:02X}" for p in (4, 5, 6, 7, 0x0C, 0x0D, 0x11)]}, "params.pids", "at most 6"),
    ({"pids": ["engine_speed", "0x9D"]}, "params.pids", "must be asked alone"),
    ({"pids": ["warp_speed"]}, "params.pids[0]", "no OBD-II PID named 'warp_speed'"),
    ({"pids": "0x1FF"}, "params.pids", "not a PID"),
    ({"pids": [12]}, "params.pids[0]", "expected a PID name"),
    ({"supported": "yes"}, "params.supported", "true or false"),
    ({"info": ["vin", "horoscope"]}, "params.info[1]", "one of supported_info, vin"),
    ({"dtcs": "all"}, "params.dtcs", "one of stored, pending, permanent"),
    ({"pids": "engine_speed", "mode": 1}, "params.mode", "unknown key"),
])
def test_invalid_params_name_the_field(vehicle, params, field, says):
    found = problems(vehicle, params)
    assert field in found and says in found[field], found


def test_pids_request_and_values_with_units(vehicle):
    params = c.Obd(pids=(0x0C, 0x0D, 0x05, 0x11))
    sent, outcome = run(vehicle.ecu("engine"), params, "410C1AF80D32057B")
    assert sent == ["010c0d0511"]
    assert outcome.status is Status.COMPLETED
    assert outcome.result == {
        "values": {"engine_speed": {"pid": "0x0C", "value": 1726.0, "unit": "rpm"},
                   "vehicle_speed": {"pid": "0x0D", "value": 50, "unit": "km/h"},
                   "coolant_temperature": {"pid": "0x05", "value": 83, "unit": "degC"}},
        "unsupported": ["0x11"],
    }


def test_supported_walk_stops_where_the_bitmap_says(vehicle):
    sent, outcome = run(vehicle.ecu("engine"), c.Obd(supported=True),
                        "4100" "BE1FA813", "4120" "80000001", "4140" "40000000")
    assert sent == ["0100", "0120", "0140"]
    supported = outcome.result["supported"]
    assert supported[:3] == ["monitor_status", "fuel_system_status", "engine_load"]
    assert "0x13" in supported and "distance_with_mil" in supported and "control_module_voltage" in supported
    assert not any(name.startswith("pids_supported") for name in supported)


def test_info_and_dtc_lists(vehicle):
    vin = b"1G1JC5444R7252367"
    sent, outcome = run(vehicle.ecu("engine"), c.Obd(info=("vin",), dtcs=("stored", "pending")),
                        "490201" + vin.hex(), "430203010420", "4700")
    assert sent == ["0902", "03", "07"]
    assert outcome.result == {"info": {"vin": vin.decode()},
                              "dtcs": {"stored": [{"code": "P0301", "dtc": "0x0301"},
                                                  {"code": "P0420", "dtc": "0x0420"}], "pending": []}}


@pytest.mark.parametrize(("responses", "status", "code"), [
    (["7F0112"], Status.FAILED, ErrorCode.NEGATIVE_RESPONSE),
    (["410C1A"], Status.FAILED, ErrorCode.INTERNAL),  # truncated
    (["41050A"], Status.TIMEOUT, ErrorCode.TIMEOUT),  # another PID's answer: not this request's, discarded
    ([], Status.TIMEOUT, ErrorCode.TIMEOUT),
])
def test_bad_answers_are_results(vehicle, responses, status, code):
    _, outcome = run(vehicle.ecu("engine"), c.Obd(pids=(0x0C,)), *responses)
    assert outcome.status is status and outcome.error.code is code


# ---- fault texts: a component's `dtcs:` table ------------------------------------------------------

def with_texts(vehicle, texts):
    engine = vehicle.ecu("engine")
    return dataclasses.replace(engine, dtc_texts=texts)


def test_fault_texts_in_read_faults_and_obd(vehicle):
    engine = with_texts(vehicle, (("0xC10087", "Lost communication with ECM (missing message)"),
                                  ("P0301", "Cylinder 1 misfire detected"), ("P0420", "Catalyst efficiency")))
    _, outcome = run(engine, c.ReadFaults(0xFF), "5902ff0301002fc1008709c1000009")
    assert [f.get("text") for f in outcome.result["faults"]] == [
        "Cylinder 1 misfire detected", "Lost communication with ECM (missing message)", None]
    _, outcome = run(engine, c.Obd(dtcs=("stored",)), "430203010420")
    assert [f["text"] for f in outcome.result["dtcs"]["stored"]] == ["Cylinder 1 misfire detected",
                                                                       "Catalyst efficiency"]


def test_the_most_specific_text_wins(vehicle):
    engine = with_texts(vehicle, (("P0301", "misfire"), ("P0301-1A", "misfire: circuit low")))
    _, outcome = run(engine, c.ReadFaults(0xFF), "5902ff03011a2f0301002f")
    assert [f["text"] for f in outcome.result["faults"]] == ["misfire: circuit low", "misfire"]


def ecu_yaml(dtcs):
    return {"vehicle": "V1", "bus": {"interface": "virtual", "channel": "x"},
            "ecus": [{"name": "engine", "addressing": {"request_id": 0x7E0, "response_id": 0x7E8}, "dtcs": dtcs}]}


def test_dtcs_config_keys_are_normalised_and_checked():
    config = parse_config(ecu_yaml({"p0301": "misfire", "P0301-1a": "low", 0xC10087: "lost ECM", "0x000100": "x"}))
    assert dict(config.ecus[0].dtc_texts) == {"P0301": "misfire", "P0301-1A": "low", "0xC10087": "lost ECM",
                                              "0x000100": "x"}
    with pytest.raises(ConfigError) as info:
        parse_config(ecu_yaml({"X0301": "bad code", "P0420": 7, "0x1000000": "too big", "P0301": "a",
                               "p0301": "twice"}))
    found = dict(info.value.problems)
    assert "X0301 is not a DTC code" in found["ecus[0].dtcs.X0301"].replace("string 'X0301'", "X0301")
    assert "expected a string" in found["ecus[0].dtcs.P0420"]
    assert "ecus[0].dtcs.0x1000000" in found and "twice" in found["ecus[0].dtcs.p0301"]


def test_results_match_the_published_schema(vehicle):
    """Every result shape above, as a Response, validates against docs/asyncapi.yaml (and a wrong one does not)."""
    from mqtt_support import VALIDATORS

    from agent.wire.command import Outcome, Result
    from agent.wire.messages import response_message

    engine = with_texts(vehicle, (("P0301", "misfire"),))
    outcomes = [
        run(engine, c.Obd(pids=(0x0C, 0x0D, 0x05, 0x11, 0x01, 0x03)), "410C1AF80D32057B01830765040302 00")[1],
        run(engine, c.Obd(pids=(0x9D,)), "419D0102")[1],
        run(engine, c.Obd(supported=True), "4100BE1FA813", "412080000001", "414040000000")[1],
        run(engine, c.Obd(info=("vin", "calibration_ids", "cvns", "ecu_name", "supported_info"),
                          dtcs=("stored", "pending", "permanent")),
            "490201" + b"1G1JC5444R7252367".hex(), "490401" + b"CAL-1".ljust(16, b"\0").hex(), "4906011791BC0A",
            "490A01" + b"ECM-EngineControl".ljust(20, b"\0").hex(), "490054400000", "430203010420", "4700",
            "4A00")[1],
    ]
    for outcome in outcomes:
        assert outcome.status is Status.COMPLETED, outcome
        message = response_message(Result("o-1", "engine", "obd", outcome, 1.0, 1.0, 1.1), seq=2)
        errors = [e.message for e in VALIDATORS["Response"].iter_errors(message)]
        assert not errors, (message, errors)
    wrong = response_message(Result("o-1", "engine", "obd", Outcome.completed({"values": {"x": 1}}), 1.0, 1.0, 1.1),
                             seq=2)
    assert list(VALIDATORS["Response"].iter_errors(wrong))


# ---- on the simulator, through the agent and through a real broker ----------------------------------

def test_obd_through_the_agent_on_the_simulator(agent):
    result = agent.run("engine", "obd", {"pids": ["engine_speed", "vehicle_speed", "coolant_temperature"],
                                         "supported": True, "info": ["vin", "calibration_ids"],
                                         "dtcs": ["stored", "pending"]})
    assert result.status is Status.COMPLETED, result.outcome
    values = result.outcome.result["values"]
    assert 800 <= values["engine_speed"]["value"] <= 3000 and values["engine_speed"]["unit"] == "rpm"
    assert values["vehicle_speed"] == {"pid": "0x0D", "value": 50, "unit": "km/h"}
    assert values["coolant_temperature"]["value"] == 83
    assert result.outcome.result["supported"] == ["monitor_status", "coolant_temperature", "engine_speed",
                                                  "vehicle_speed"]
    assert result.outcome.result["info"] == {"vin": "TEST0VEHICLE00001",
                                             "calibration_ids": ["TEST-CAL-1", "TEST-CAL-2"]}  # multi-frame
    assert [d["code"] for d in result.outcome.result["dtcs"]["stored"]] == ["P0301", "U0100"]
    assert [d["code"] for d in result.outcome.result["dtcs"]["pending"]] == ["P0301"]
    refused = agent.run("engine", "obd", {"pids": "odometer"})
    assert refused.status is Status.FAILED and refused.outcome.error.as_dict()["nrc"] == "0x31"


def test_obd_over_mqtt_is_allowed_by_default_and_matches_the_schema(service, backend):
    """`body` has the default policy: obd runs there (the backend fixture validates every message)."""
    body = {"id": "obd-1", "component": "engine", "command": "obd", "params": {"pids": ["engine_speed"]}}
    backend.send(body)
    final = backend.final("obd-1")
    assert final["status"] == "completed" and final["result"]["values"]["engine_speed"]["unit"] == "rpm"
    other = {"id": "obd-2", "component": "body", "command": "obd", "params": {"pids": "vehicle_speed"}}
    backend.send(other)
    assert backend.final("obd-2")["error"]["code"] == "negative_response"  # admitted; body has no OBD


def test_multi_pid_answer_without_the_first_pid_is_still_the_answer(vehicle):
    _, outcome = run(vehicle.ecu("engine"), c.Obd(pids=(0x0C, 0x0D)), "410D32")
    assert outcome.status is Status.COMPLETED
    assert outcome.result["unsupported"] == ["0x0C"] and "vehicle_speed" in outcome.result["values"]
