"""Every command and error path end to end: runtime -> ISO-TP -> virtual CAN bus -> simulated ECUs."""

import itertools
import time

import can
import pytest

from agent.devtools.sim.config import fault_from_dict
from agent.policy.admission import Admission
from agent.wire.command import ErrorCode, Status


def completed(session, component, command, params=None, **kw):
    result = session.run(component, command, params, **kw)
    assert result.status is Status.COMPLETED, result.outcome
    return result.outcome.result


def test_read_data_decodes_every_codec(agent):
    values = completed(agent, "engine", "read_data", {"data": ["vin", "engine_speed", "oil_temp", "idle_mode"]})
    assert values == {"values": {"vin": "TEST0VEHICLE00001", "engine_speed": 750.0, "oil_temp": -10,
                                 "idle_mode": "eco"}}


def test_unconfigured_did_by_hex_gives_raw(agent):
    assert completed(agent, "engine", "read_data", {"data": "0xF40C"}) == {"values": {"engine_speed": 750.0}}
    result = agent.run("engine", "read_data", {"data": "0x1234"})
    assert result.status is Status.FAILED
    assert result.outcome.error.as_dict()["nrc"] == "0x31"


@pytest.mark.parametrize("component", ["body", "gateway"])
def test_other_addressing_modes(agent, component):
    assert completed(agent, component, "read_data", {"data": "vin"}) == {"values": {"vin": "TEST0VEHICLE00001"}}


def test_4095_byte_did_multi_frame(agent):
    value = completed(agent, "engine", "read_data", {"data": "big_block"})["values"]["big_block"]["raw"]
    assert bytes.fromhex(value) == bytes(i & 0xFF for i in range(4095))


def test_can_fd_component_uses_fd_frames(agent, vehicle):
    spy = can.Bus(interface="virtual", channel=vehicle.bus.channel, fd=True)
    try:
        value = completed(agent, "camera", "read_data", {"data": "calibration"})["values"]["calibration"]["raw"]
        assert bytes.fromhex(value) == bytes((0x10 + i) & 0xFF for i in range(4000))
        frames = []
        while (msg := spy.recv(0.05)) is not None:
            frames.append(msg)
    finally:
        spy.shutdown()
    responses = [m for m in frames if m.arbitration_id == 0x748]
    assert responses and all(m.is_fd for m in responses)
    assert max(len(m.data) for m in responses) == 64


def test_session_security_write_and_read_back(agent, sim):
    denied = agent.run("engine", "write_data", {"data": "idle_mode", "value": "high"})
    assert denied.outcome.error.as_dict()["nrc"] == "0x7F"  # not in the default session
    assert completed(agent, "engine", "set_session", {"session": "extended"}) == {
        "session": "extended", "p2_ms": 50, "p2_star_ms": 5000}
    assert completed(agent, "engine", "security_access", {"level": 1}) == {"level": 1, "unlocked": True}
    assert sim.ecu("engine").server.unlocked == 1
    completed(agent, "engine", "write_data", {"data": "idle_mode", "value": "high"})
    assert completed(agent, "engine", "read_data", {"data": "idle_mode"}) == {"values": {"idle_mode": "high"}}


def test_faults_snapshots_extended_and_clear(agent, sim):
    faults = completed(agent, "engine", "read_faults", {"snapshots": True, "extended": True})["faults"]
    assert [f["code"] for f in faults] == ["P0301", "U0100"]
    assert faults[0]["snapshots"] == [{"record": 1, "values": {"engine_speed": 800.0}}]
    assert faults[0]["extended_data"] == "0105"
    assert faults[1]["failure_type"] == "0x87" and faults[1]["status"]["confirmed"] is True
    confirmed_only = completed(agent, "engine", "read_faults", {"status_mask": "0x08"})["faults"]
    assert [f["code"] for f in confirmed_only] == ["P0301", "U0100"]
    pending_only = completed(agent, "engine", "read_faults", {"status_mask": "0x04"})["faults"]
    assert [f["code"] for f in pending_only] == ["P0301"]
    completed(agent, "engine", "clear_faults")
    assert completed(agent, "engine", "read_faults") == {"faults": []}


def test_operation_io_control_reset_tester_present_raw(agent, sim):
    assert completed(agent, "engine", "operation", {"routine": "self_test", "action": "start"}) == {
        "status_record": "0001"}
    adjust = {"data": "engine_speed", "control": "adjust", "value": 1000}
    assert completed(agent, "engine", "io_control", adjust) == {"values": {"engine_speed": 1000.0}}
    assert completed(agent, "engine", "read_data", {"data": "engine_speed"}) == {"values": {"engine_speed": 1000.0}}
    completed(agent, "engine", "io_control", {"data": "engine_speed", "control": "return_control"})
    completed(agent, "engine", "set_session", {"session": "extended"})
    completed(agent, "engine", "reset", {"type": "hard"})
    assert sim.ecu("engine").server.resets == 1 and sim.ecu("engine").server.session == 1
    assert completed(agent, "engine", "tester_present") == {}
    assert completed(agent, "engine", "raw", {"request": "22F40D"}) == {"response": "62f40df6"}


def test_timeout_when_ecu_is_silent(agent, sim):
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "no_answer": True})])
    started = time.monotonic()
    result = agent.run("engine", "read_data", {"data": "vin"})
    assert result.status is Status.TIMEOUT
    assert "within P2 (150 ms)" in result.outcome.error.message
    assert 0.14 < time.monotonic() - started < 1.0
    assert sim.ecu("engine").received[0x22] == 1 and sim.ecu("engine").server.executed[0x22] == 0


def test_response_pending_extends_wait_to_p2_star(agent, sim):
    # 8 x 0x78 at 20 ms spacing is past P2 (150 ms) but within P2* (1000 ms) of each
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "pending": 8})])
    result = agent.run("engine", "read_data", {"data": "vin"})
    assert result.status is Status.COMPLETED
    assert result.duration_ms >= 150


def test_response_pending_forever_hits_the_command_deadline(agent, sim):
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "pending": 1000})])
    result = agent.run("engine", "read_data", {"data": "vin"}, timeout_ms=400)
    assert result.status is Status.TIMEOUT
    assert "command deadline" in result.outcome.error.message
    sim.ecu("engine").set_faults([])


def test_busy_repeat_request_is_retried(agent, sim):
    ecu = sim.ecu("engine")
    ecu.set_faults([fault_from_dict({"service": 0x22, "busy": 2})])
    assert completed(agent, "engine", "read_data", {"data": "vin"})
    assert ecu.received[0x22] == 3 and ecu.server.executed[0x22] == 1


def test_busy_forever_gives_up_after_bounded_retries(agent, sim):
    ecu = sim.ecu("engine")
    ecu.set_faults([fault_from_dict({"service": 0x22, "busy": 100})])
    result = agent.run("engine", "read_data", {"data": "vin"})
    assert result.outcome.error.as_dict()["nrc"] == "0x21"
    assert ecu.received[0x22] == 4 and ecu.server.executed[0x22] == 0


def test_injected_nrc(agent, sim):
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "nrc": 0x22})])
    result = agent.run("engine", "read_data", {"data": "vin"})
    assert result.outcome.error.as_dict() == {
        "code": "negative_response", "message": "ECU refused service 0x22: NRC 0x22 ConditionsNotCorrect",
        "nrc": "0x22", "nrc_name": "ConditionsNotCorrect", "service": "0x22"}
    assert completed(agent, "engine", "read_data", {"data": "oil_temp"})  # the fault matched F190 only


def test_one_at_a_time_in_order_per_component_parallel_across(agent, sim):
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "delay_ms": 100})])
    engine_ids = [agent.submit("engine", "read_data", {"data": "vin"})[0] for _ in range(3)]
    body_id, _ = agent.submit("body", "read_data", {"data": "vin"})
    body = agent.wait(body_id, 5)
    engine = [agent.wait(i, 5) for i in engine_ids]
    assert body.status is Status.COMPLETED and all(r.status is Status.COMPLETED for r in engine)
    assert body.finished_at < engine[0].finished_at  # body did not wait behind engine's queue
    for before, after in itertools.pairwise(engine):
        assert after.started_at >= before.finished_at  # never two at once on one ECU, in arrival order


def test_full_queue_answers_busy(agent, sim):
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "delay_ms": 100})])
    submitted = [agent.submit("engine", "read_data", {"data": "vin"}) for _ in range(7)]
    admissions = [a for _, a in submitted]
    assert Admission.BUSY in admissions  # queue_size 4 plus one in flight
    busy = agent.wait(submitted[admissions.index(Admission.BUSY)][0], 1)
    assert (busy.status, busy.outcome.error.code) == (Status.REJECTED, ErrorCode.BUSY)
    for command_id, admission in submitted:
        if admission is Admission.QUEUED:
            assert agent.wait(command_id, 5).status is Status.COMPLETED


def test_policy_refuses_disabled_commands(agent):
    result = agent.run("body", "clear_faults")
    assert (result.status, result.outcome.error.code) == (Status.REJECTED, ErrorCode.NOT_PERMITTED)


def test_expired_command_never_starts(agent, sim):
    command_id, admission = agent.submit("engine", "read_data", {"data": "vin"}, expires_at="2020-01-01T00:00:00Z")
    result = agent.wait(command_id, 5)
    assert admission is Admission.QUEUED and result.status is Status.EXPIRED and result.started_at is None
    assert sim.ecu("engine").received[0x22] == 0


def test_tester_present_keeps_non_default_session_alive(agent, sim):
    ecu = sim.ecu("engine")
    completed(agent, "engine", "set_session", {"session": "extended"})
    time.sleep(1.6)  # longer than the simulated ECU's S3 (1000 ms)
    assert ecu.server.session == 3
    assert ecu.server.reads[0xF186] >= 3  # keepalives every 300 ms: each reads the session the ECU holds
    completed(agent, "engine", "write_data", {"data": "idle_mode", "value": "normal"})  # still in extended


def test_session_lapses_without_keepalive(sim):
    """Control for the test above: the simulator does drop a session after S3 when nobody keeps it."""
    server = sim.ecu("engine").server
    server.handle(bytes([0x10, 0x03]), now=100.0)
    assert server.session == 3
    server.handle(bytes([0x3E, 0x80]), now=100.9)
    assert server.session == 3
    assert server.handle(bytes([0x2E, 0x01, 0x00, 0x01]), now=102.0) == bytes([0x7F, 0x2E, 0x7F])
