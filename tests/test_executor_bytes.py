"""Command -> exact UDS request bytes, and response bytes -> result, per command.

The link here is a scripted stand-in for ISO-TP (it records requests and replays canned
responses) so the bytes can be checked exactly; the integration tests run the same executor
over real ISO-TP on a virtual CAN bus against the simulator.
"""

import pytest
from uds_support import ScriptedLink, run

from agent.wire import command as c
from agent.wire.command import ErrorCode, Status
from agent.wire.dtc import status_dict


@pytest.mark.parametrize(("command", "params", "responses", "requests", "result"), [
    ("read_data", {"data": "vin"}, ["62f190" + b"TEST0VEHICLE00001".hex()], ["22f190"],
     {"values": {"vin": "TEST0VEHICLE00001"}}),
    ("read_data", {"data": ["engine_speed", "oil_temp"]}, ["62f40c0bb8f40df6"], ["22f40cf40d"],
     {"values": {"engine_speed": 750.0, "oil_temp": -10}}),
    ("read_data", {"data": ["0x1234", "oil_temp"]}, ["62f40d01", "621234aabbcc"], ["22f40d", "221234"],
     {"values": {"0x1234": {"raw": "aabbcc"}, "oil_temp": 1}}),
    ("write_data", {"data": "idle_mode", "value": "eco"}, ["6e0100"], ["2e010001"], {}),
    ("read_faults", {"status_mask": "0x08"}, ["5902ff0301002fc1008709"], ["190208"],
     {"faults": [
         {"code": "P0301", "failure_type": "0x00", "dtc": "0x030100", "status": status_dict(0x2F)},
         {"code": "U0100", "failure_type": "0x87", "dtc": "0xC10087", "status": status_dict(0x09)},
     ]}),
    ("clear_faults", {}, ["54"], ["14ffffff"], {}),
    ("set_session", {"session": "extended"}, ["50030032 01f4"], ["1003"],
     {"session": "extended", "p2_ms": 50, "p2_star_ms": 5000}),
    ("reset", {"type": "soft"}, ["5103"], ["1103"], {}),
    ("operation", {"routine": "self_test", "action": "start", "data": "aa"}, ["710102030001"], ["31010203aa"],
     {"status_record": "0001"}),
    ("io_control", {"data": "engine_speed", "control": "adjust", "value": 1000}, ["6ff40c030fa0"], ["2ff40c030fa0"],
     {"values": {"engine_speed": 1000.0}}),
    ("io_control", {"data": "engine_speed", "control": "return_control"}, ["6ff40c000bb8"], ["2ff40c00"],
     {"values": {"engine_speed": 750.0}}),
    ("tester_present", {}, ["7e00"], ["3e00"], {}),
    ("raw", {"request": "1901ff"}, ["5901ff000003"], ["1901ff"], {"response": "5901ff000003"}),
])
def test_request_and_result_bytes(vehicle, command, params, responses, requests, result):
    sent, outcome = run(vehicle, command, params, *[r.replace(" ", "") for r in responses])
    assert sent == requests
    assert outcome.status is Status.COMPLETED, outcome
    assert outcome.result == result


def test_read_faults_with_snapshots_and_extended(vehicle):
    sent, outcome = run(vehicle, "read_faults", {"snapshots": True, "extended": True},
                        "5902ff0301002f", "59040301002f0101f40c0c80", "59060301002f0105")
    assert sent == ["1902ff", "19040301 00ff".replace(" ", ""), "1906030100ff"]
    fault = outcome.result["faults"][0]
    assert fault["snapshots"] == [{"record": 1, "values": {"engine_speed": 800.0}}]
    assert fault["extended_data"] == "0105"


def test_one_dtcs_snapshots_are_one_request_and_a_refusal_stays_in_the_result(vehicle):
    """Collection's part of a fault watch with snapshots: 0x19 0x04 for one DTC, nothing else."""
    import time

    from agent.uds.executor import Executor

    link = ScriptedLink("59040301002f0101f40c0c80", "7f1931")
    executor = Executor(vehicle.ecu("engine"), link)
    first = executor.execute(c.ReadFaultSnapshot(0x030100), time.monotonic() + 2)
    refused = executor.execute(c.ReadFaultSnapshot(0x030100), time.monotonic() + 2)
    assert [s.hex() for s in link.sent] == ["1904030100ff", "1904030100ff"]
    assert first.result == {"snapshots": [{"record": 1, "values": {"engine_speed": 800.0}}]}
    assert refused.status is Status.COMPLETED and refused.result["snapshots_error"]["nrc"] == "0x31"


def test_security_access_seed_key(vehicle):
    sent, outcome = run(vehicle, "security_access", {"level": 1}, "670111223344", "6702")
    key = bytes(b ^ (0x5A + 1) for b in bytes.fromhex("11223344")).hex()
    assert sent == ["2701", "2702" + key]
    assert outcome.result == {"level": 1, "unlocked": True}


def test_security_access_zero_seed_means_unlocked(vehicle):
    sent, outcome = run(vehicle, "security_access", {"level": 1}, "670100000000")
    assert sent == ["2701"] and outcome.result == {"level": 1, "unlocked": True}


def test_negative_response_is_a_result(vehicle):
    _, outcome = run(vehicle, "read_data", {"data": "vin"}, "7f2231")
    assert outcome.status is Status.FAILED
    assert outcome.error.code is ErrorCode.NEGATIVE_RESPONSE
    assert dict(outcome.error.details) == {"nrc": "0x31", "nrc_name": "RequestOutOfRange", "service": "0x22"}


def test_pending_then_answer_and_busy_then_answer(vehicle):
    sent, outcome = run(vehicle, "tester_present", {}, "7f3e78", "7f3e78", "7e00")
    assert sent == ["3e00"] and outcome.status is Status.COMPLETED
    sent, outcome = run(vehicle, "tester_present", {}, "7f3e21", "7f3e21", "7e00")
    assert sent == ["3e00", "3e00", "3e00"] and outcome.status is Status.COMPLETED


def test_busy_retries_are_bounded(vehicle):
    sent, outcome = run(vehicle, "tester_present", {}, *["7f3e21"] * 10)
    assert len(sent) == 4  # first try + busy_retries (3) from the test vehicle
    assert dict(outcome.error.details)["nrc"] == "0x21"


def test_no_answer_is_a_timeout(vehicle):
    _, outcome = run(vehicle, "tester_present", {})
    assert outcome.status is Status.TIMEOUT and "P2" in outcome.error.message


def test_wrong_or_garbled_answers(vehicle):
    # an answer for another DID is not this request's answer: discarded, and nothing else came
    _, outcome = run(vehicle, "read_data", {"data": "vin"}, "62f191" + "00" * 17)
    assert outcome.status is Status.TIMEOUT
    # the right echo with a truncated value is this request's answer, and it is broken
    _, outcome = run(vehicle, "read_data", {"data": "vin"}, "62f190414243")
    assert outcome.status is Status.FAILED and outcome.error.code is ErrorCode.INTERNAL
    # a response to another service is ignored; the right one still counts
    _, outcome = run(vehicle, "tester_present", {}, "5003", "7e00")
    assert outcome.status is Status.COMPLETED


def test_every_command_type_has_a_handler(vehicle):
    from agent.uds.executor import Executor

    handled = set(Executor(vehicle.ecu("engine"), ScriptedLink())._handlers)
    assert handled == set(c.Params.__args__)
