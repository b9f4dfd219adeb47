"""The agent against a hostile or buggy ECU, frame by frame: wrong echoes, truncated and overlong answers,
NRC 0x78 without end, late answers in every phase of ISO-TP followed at once by the next command, two
answers to one request, broken first frames and sequence numbers, FC.WAIT / overflow / absurd STmin, a
second tester on the same ids, FD frames on a classic link, floods.

The ECU is a raw python-can bus on the test's virtual channel that the test drives itself (`Rogue`): it
waits for the agent's request frame and sends exactly the frames the case needs, so nothing here depends
on timing. The agent is the real one (LocalSession: bus owner, userspace ISO-TP on can-isotp, udsoncan).
Every case must end as a clear result of its own command, and the next command must get its own answer.
"""

from __future__ import annotations

import dataclasses
import time

import can
import pytest

from agent.system.local import LocalSession
from agent.wire.command import ErrorCode, Status

REQUEST_ID, RESPONSE_ID = 0x7E0, 0x7E8  # the test vehicle's engine
FOUR_DIDS = {"data": ["oil_temp", "engine_speed", "idle_mode", "vin"]}  # a 9-byte request: first frame + one CF
VIN = b"TEST0VEHICLE00001"


class Rogue:
    """The engine ECU, played frame by frame on a raw bus of the test's virtual channel."""

    def __init__(self, channel: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel, fd=True)

    def request(self, timeout: float = 10.0) -> bytes:
        """The next frame the agent sends to the engine (its request, a consecutive or a flow control frame)."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            msg = self.bus.recv(left)
            if msg is not None and msg.arbitration_id == REQUEST_ID and not msg.is_extended_id:
                return bytes(msg.data)
        raise AssertionError("the agent sent nothing to the engine")

    def send(self, data: str, can_id: int = RESPONSE_ID, fd: bool = False, pad: bool = True) -> None:
        payload = bytes.fromhex(data.replace(" ", ""))
        if pad and not fd:
            payload = payload.ljust(8, b"\xcc")
        self.bus.send(can.Message(arbitration_id=can_id, data=payload, is_extended_id=False, is_fd=fd))

    def close(self) -> None:
        self.bus.shutdown()


def with_engine_isotp(vehicle, **changes):
    engine = vehicle.ecu("engine")
    return dataclasses.replace(vehicle, ecus=tuple(
        dataclasses.replace(e, isotp=dataclasses.replace(engine.isotp, **changes)) if e.name == "engine" else e
        for e in vehicle.ecus))


@pytest.fixture
def rogue(vehicle):
    ecu = Rogue(vehicle.bus.channel)
    yield ecu
    ecu.close()


@pytest.fixture
def agent(vehicle, rogue):
    with LocalSession(vehicle) as session:
        yield session


def oil_temp_answered(agent, rogue, answer: str = "04 62F40D 0A") -> None:
    """The next command, answered properly: it must get its own answer, whatever came before."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
    assert rogue.request()[:4] == bytes.fromhex("0322F40D")
    rogue.send(answer)
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED, result.outcome
    assert result.outcome.result == {"values": {"oil_temp": 10}}


# ---- ISO-TP flow control --------------------------------------------------------------------------------

def test_fc_wait_with_wftmax_0_abandons_the_request_it_reports_as_not_sent(vehicle, rogue):
    """wftmax 0: one FC.WAIT aborts the send. can-isotp only reports it and would go on sending on a later
    CTS: the ECU would get the whole request and run it while the command says it was never sent."""
    with LocalSession(with_engine_isotp(vehicle, wftmax=0)) as agent:
        command_id, _ = agent.submit("engine", "read_data", FOUR_DIDS)
        assert rogue.request()[0] >> 4 == 1  # the first frame
        rogue.send("31 00 00")  # FC.WAIT
        rogue.send("30 00 00")  # then "continue to send"
        result = agent.wait(command_id)
        assert result.status is Status.TIMEOUT
        assert "UnsupportedWaitFrameError" in result.outcome.error.message
        frames = []
        while (msg := rogue.bus.recv(0)) is not None:  # everything the agent sent after the first frame
            frames.append(bytes(msg.data))
        assert not [f for f in frames if f[0] >> 4 == 2], "a consecutive frame went out after the abort"
        oil_temp_answered(agent, rogue)


def answer(rogue, payload: bytes) -> None:
    """Sends `payload` as the ECU would: a single frame, or a first frame, the agent's FC, consecutive frames."""
    if len(payload) <= 7:
        rogue.send(bytes([len(payload)]).hex() + payload.hex())
        return
    rogue.send(f"{0x1000 | len(payload):04X}" + payload[:6].hex())
    flow_control = rogue.request()
    assert flow_control[0] == 0x30, flow_control.hex()
    rest = payload[6:]
    for seq, start in enumerate(range(0, len(rest), 7), start=1):
        rogue.send(f"{0x20 | seq & 0xF:02X}" + rest[start:start + 7].hex())


# ---- a late answer is never the next command's result ---------------------------------------------------

def test_a_late_answer_to_a_read_of_fewer_dids_does_not_fail_the_next_read(agent, rogue):
    """The late VIN of a timed-out read echoes the first DID of the next read (VIN and oil temperature):
    it is that read's stale answer, not its invalid one; the real answer comes right after it."""
    timed_out = agent.run("engine", "read_data", {"data": "vin"}, timeout_ms=300)  # the ECU stays silent
    assert timed_out.status is Status.TIMEOUT
    assert rogue.request()[:4] == bytes.fromhex("0322F190")
    command_id, _ = agent.submit("engine", "read_data", {"data": ["vin", "oil_temp"]})
    assert rogue.request()[:6] == bytes.fromhex("0522F190F40D")
    answer(rogue, b"\x62\xf1\x90" + VIN)  # the late answer to the first read
    answer(rogue, b"\x62\xf1\x90" + VIN + b"\xf4\x0d\x0a")
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED, result.outcome
    assert result.outcome.result == {"values": {"vin": VIN.decode(), "oil_temp": 10}}


@pytest.mark.parametrize(("frame", "why"), [
    ("03 62F40D", "incomplete"),  # truncated: no value
    ("05 62F40D 0A0B", "incomplete"),  # overlong: a byte past the value is no DID
    ("06 62F40D 0A F40C 01", "0xf40c"),  # a DID that was not asked for
])
def test_a_positive_answer_that_does_not_fit_the_read_is_an_invalid_response(agent, rogue, frame, why):
    """Waited out as a possibly stale answer, then the command's error: never a value, never a timeout."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
    rogue.request()
    rogue.send(frame)
    result = agent.wait(command_id)
    assert (result.status, result.outcome.error.code) == (Status.FAILED, ErrorCode.INTERNAL), result.outcome
    assert "invalid response from ECU" in result.outcome.error.message and why in result.outcome.error.message.lower()
    oil_temp_answered(agent, rogue)
