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
import logging
import struct
import threading
import time

import can
import pytest
from conftest import DATA

from agent.bus.frames import FRAME_QUEUE_SIZE
from agent.bus.functional import FunctionalLink
from agent.bus.isotp_link import IsoTpLink
from agent.bus.kernel_isotp import KernelIsoTpLink
from agent.bus.owner import BusOwner, wait_until
from agent.config.model import Addressing, BusConfig, IsoTpConfig, SecurityLevel
from agent.config.transport import isotp_address
from agent.devtools.sim.config import fault_from_dict, load_sim_config
from agent.devtools.sim.simulator import Simulator
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
        frame = self.poll(timeout)
        if frame is None:
            raise AssertionError("the agent sent nothing to the engine")
        return frame

    def command_frame(self) -> bytes:
        """The next frame the agent sends to the engine that is not a keepalive of its extended session
        (those are answered: still in session 0x03), however late the test thread is."""
        frame = self.request()
        while frame[:4] == bytes.fromhex("0322F186"):
            self.send("04 62F186 03")
            frame = self.request()
        return frame

    def poll(self, timeout: float, can_id: int = REQUEST_ID, extended: bool = False) -> bytes | None:
        """The next frame the agent sends to the engine (or on `can_id`) within `timeout` seconds, else None."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            msg = self.bus.recv(left)
            if msg is not None and msg.arbitration_id == can_id and msg.is_extended_id == extended:
                return bytes(msg.data)
        return None

    def send(self, data: str, can_id: int = RESPONSE_ID, fd: bool = False, pad: bool = True,
             extended: bool = False) -> None:
        payload = bytes.fromhex(data.replace(" ", ""))
        if pad and not fd:
            payload = payload.ljust(8, b"\xcc")
        self.bus.send(can.Message(arbitration_id=can_id, data=payload, is_extended_id=extended, is_fd=fd))

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


def patient(vehicle):
    """Every ECU with P2 1 s: the test thread playing the ECU is never late under load (cases that end in
    a timeout give the command a short `timeout_ms` instead)."""
    return dataclasses.replace(vehicle, ecus=tuple(
        dataclasses.replace(e, timing=dataclasses.replace(e.timing, p2_ms=1000, p2_star_ms=2000, request_ms=5000))
        for e in vehicle.ecus))


@pytest.fixture
def agent(vehicle, rogue):
    with LocalSession(patient(vehicle)) as session:
        yield session


def oil_temp_answered(agent, rogue, answer: str = "04 62F40D 0A") -> None:
    """The next command, answered properly: it must get its own answer, whatever came before."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
    assert rogue.command_frame()[:4] == bytes.fromhex("0322F40D")  # after any keepalive of an extended session
    rogue.send(answer)
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED, result.outcome
    assert result.outcome.result == {"values": {"oil_temp": 10}}


# ---- ISO-TP flow control --------------------------------------------------------------------------------

def test_fc_wait_with_wftmax_0_abandons_the_request_it_reports_as_not_sent(vehicle, rogue):
    """wftmax 0: one FC.WAIT aborts the send. can-isotp only reports it and would go on sending on a later
    CTS: the ECU would get the whole request and run it while the command says it was never sent."""
    with LocalSession(with_engine_isotp(patient(vehicle), wftmax=0)) as agent:
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
    assert agent.runtime.workers["engine"].executor.discarded == 1


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
    assert agent.runtime.workers["engine"].executor.discarded == 0  # it was the answer, an invalid one
    oil_temp_answered(agent, rogue)


def test_a_late_answer_cut_off_mid_transfer_is_dropped_and_the_next_command_gets_its_own(agent, rogue):
    """The VIN read's deadline passes between its consecutive frames; the rest of that answer comes in
    during the next request: it is no answer, and the next read gets its own."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "vin"}, timeout_ms=400)
    assert rogue.request()[:4] == bytes.fromhex("0322F190")
    rogue.send("1014 62F190 544553")  # first frame of the 20-byte answer
    assert rogue.request()[0] == 0x30  # the agent's flow control; then the ECU stalls
    result = agent.wait(command_id)
    assert result.status is Status.TIMEOUT and "not complete by the deadline" in result.outcome.error.message
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
    assert rogue.request()[:4] == bytes.fromhex("0322F40D")
    rogue.send("21 5430564548494" "3")  # the rest of the VIN, now an orphan
    rogue.send("22 4C453030303031")
    rogue.send("04 62F40D 0A")
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED and result.outcome.result == {"values": {"oil_temp": 10}}


def test_a_late_answer_arriving_while_the_next_request_waits_for_flow_control(agent, rogue):
    """A late single-frame answer lands between the next request's first frame and the ECU's flow control."""
    assert agent.run("engine", "read_data", {"data": "oil_temp"}, timeout_ms=300).status is Status.TIMEOUT
    assert rogue.request()[:4] == bytes.fromhex("0322F40D")
    command_id, _ = agent.submit("engine", "read_data", FOUR_DIDS)
    assert rogue.request()[:3] == bytes.fromhex("100922")
    rogue.send("04 62F40D 0A")  # the late answer to the timed-out read
    rogue.send("30 00 00")
    assert rogue.request()[0] == 0x21  # the rest of the request went out
    answer(rogue, bytes.fromhex("62 F40D 0B F40C 0FA0 0100 01 F190") + VIN)
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED, result.outcome
    assert result.outcome.result["values"]["oil_temp"] == 11  # not the 10 of the late answer


def test_two_answers_to_one_request_the_second_is_not_the_next_commands(agent, rogue):
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
    rogue.request()
    rogue.send("04 62F40D 0A")
    rogue.send("04 62F40D 63")  # the same answer twice (another value)
    assert agent.wait(command_id).outcome.result == {"values": {"oil_temp": 10}}
    command_id, _ = agent.submit("engine", "tester_present")
    assert rogue.request()[:3] == bytes.fromhex("023E00")
    rogue.send("02 7E00")
    assert agent.wait(command_id).status is Status.COMPLETED
    oil_temp_answered(agent, rogue)  # its answer, not the second 0x63 of the first read


# ---- wrong echoes, other services, NRCs -----------------------------------------------------------------

@pytest.mark.parametrize("stale", [
    "04 6EF40D 0A",  # another service's positive answer
    "04 62F40C 0A",  # another DID
    "03 7F2E31",  # a refusal of another service
    "03 7F1078",  # "pending" for another service: it does not extend this wait
])
def test_an_answer_for_something_else_is_not_this_commands(agent, rogue, stale):
    """Each is discarded (and counted: sovd_uds_answers_discarded_total); the real answer right after it
    is the result."""
    executor = agent.runtime.workers["engine"].executor
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
    rogue.request()
    rogue.send(stale)
    rogue.send("04 62F40D 0A")
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED and result.outcome.result == {"values": {"oil_temp": 10}}
    assert executor.discarded == 1


@pytest.mark.parametrize("stale", ["04 6EF40D 0A", "04 62F40C 0A", "03 7F2E31", "03 7F1078"])
def test_only_answers_for_something_else_end_in_a_timeout_at_the_deadline(agent, rogue, stale):
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"}, timeout_ms=400)
    rogue.request()
    rogue.send(stale)
    result = agent.wait(command_id)
    assert (result.status, result.outcome.error.code) == (Status.TIMEOUT, ErrorCode.TIMEOUT)
    oil_temp_answered(agent, rogue)


def test_response_pending_without_end_is_a_timeout_at_the_command_deadline(agent, rogue):
    """0x78 after 0x78, each extending the wait to P2*: the command's deadline ends it, and the worker is free."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"}, timeout_ms=500)
    rogue.request()
    pendings = 0
    while not agent.runtime.workers["engine"].idle:  # as long as the command runs, the ECU says "pending"
        rogue.send("03 7F2278")
        pendings += 1
        rogue.poll(0.05)
    result = agent.wait(command_id)
    assert result.status is Status.TIMEOUT and "before the command deadline" in result.outcome.error.message
    assert pendings > 1
    oil_temp_answered(agent, rogue)


def test_response_pending_then_silence_is_a_p2_star_timeout(vehicle, rogue):
    config = patient(vehicle)
    engine = config.ecu("engine")
    config = dataclasses.replace(config, ecus=tuple(
        dataclasses.replace(e, timing=dataclasses.replace(engine.timing, p2_star_ms=300)) if e.name == "engine"
        else e for e in config.ecus))
    with LocalSession(config) as agent:
        command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
        rogue.request()
        rogue.send("03 7F2278")
        result = agent.wait(command_id)
        assert result.status is Status.TIMEOUT and "P2*" in result.outcome.error.message
        oil_temp_answered(agent, rogue)


# ---- ISO-TP reception -----------------------------------------------------------------------------------

def test_a_first_frame_of_4095_bytes_then_nothing_is_an_answer_that_broke_off(agent, rogue):
    """N_Cr ends the reception; the result says so (as the kernel link's does), not 'no response'."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
    rogue.request()
    rogue.send("1FFF 62F40D 0A0B0C")
    assert rogue.request()[0] == 0x30  # flow control: 4095 bytes fit max_pdu
    result = agent.wait(command_id)
    assert result.status is Status.TIMEOUT
    assert "broke off" in result.outcome.error.message and "ConsecutiveFrameTimeout" in result.outcome.error.message
    oil_temp_answered(agent, rogue)


def test_a_wrong_sequence_number_breaks_the_answer_off(agent, rogue):
    command_id, _ = agent.submit("engine", "read_data", {"data": "vin"}, timeout_ms=600)
    rogue.request()
    rogue.send("1014 62F190 544553")
    assert rogue.request()[0] == 0x30
    rogue.send("22 54305645484943")  # sequence number 2 where 1 is due
    rogue.send("21 4C453030303031")  # too late to mend it
    result = agent.wait(command_id)
    assert result.status is Status.TIMEOUT
    assert "broke off" in result.outcome.error.message and "WrongSequenceNumber" in result.outcome.error.message
    oil_temp_answered(agent, rogue)


def test_an_answer_that_broke_off_then_the_whole_answer_is_the_result(agent, rogue):
    """A reception that broke off is not the end of the wait: the ECU's repeated answer within P2 counts."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "vin"})
    rogue.request()
    rogue.send("1014 62F190 544553")
    assert rogue.request()[0] == 0x30
    rogue.send("25 54305645484943")
    answer(rogue, b"\x62\xf1\x90" + VIN)
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED and result.outcome.result == {"values": {"vin": VIN.decode()}}


def test_a_first_frame_longer_than_max_pdu_is_refused_with_overflow(vehicle, rogue):
    with LocalSession(with_engine_isotp(patient(vehicle), max_pdu=64)) as agent:
        command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"}, timeout_ms=500)
        rogue.request()
        rogue.send("1FFF 62F40D 0A0B0C")
        assert rogue.request()[:1] == b"\x32"  # FC overflow: the ECU is told at once
        result = agent.wait(command_id)
        assert result.status is Status.TIMEOUT and "FrameTooLong" in result.outcome.error.message
        oil_temp_answered(agent, rogue)


# ---- ISO-TP flow control from the ECU -------------------------------------------------------------------

def test_fc_wait_forever_ends_after_wftmax_waits(agent, rogue):
    """The ECU answers every first frame with FC.WAIT, for ever: wftmax (5) of them are waited out."""
    command_id, _ = agent.submit("engine", "read_data", FOUR_DIDS)
    assert rogue.request()[0] == 0x10
    waits = 0
    while not agent.runtime.workers["engine"].idle:
        rogue.send("31 00 00")
        waits += 1
        rogue.poll(0.05)
    result = agent.wait(command_id)
    assert result.status is Status.TIMEOUT and "MaximumWaitFrameReached" in result.outcome.error.message
    assert waits > 5
    oil_temp_answered(agent, rogue)


def test_fc_overflow_ends_the_send_at_once(agent, rogue):
    command_id, _ = agent.submit("engine", "read_data", FOUR_DIDS)
    assert rogue.request()[0] == 0x10
    rogue.send("32 00 00")
    result = agent.wait(command_id)
    assert result.status is Status.TIMEOUT and "OverflowError" in result.outcome.error.message
    oil_temp_answered(agent, rogue)


@pytest.mark.parametrize("flow_control", ["30 00 7F", "30 00 FA", "30 01 F0"])  # 127 ms; reserved STmin values
def test_an_absurd_stmin_costs_the_command_its_deadline_not_the_worker(agent, rogue, flow_control):
    """A 4 KiB write at 127 ms per frame would take 75 s: the command's deadline ends it."""
    command_id, _ = agent.submit("engine", "raw", {"request": "22" + "F190" * 2000}, timeout_ms=600)
    assert rogue.request()[0] >> 4 == 1
    rogue.send(flow_control)
    while not agent.runtime.workers["engine"].idle:  # block size 1: every frame gets its flow control
        frame = rogue.poll(0.05)
        if frame is not None and flow_control.startswith("30 01"):
            assert frame[0] >> 4 == 2
            rogue.send(flow_control)
    result = agent.wait(command_id)
    assert result.status is Status.TIMEOUT and "send timed out" in result.outcome.error.message
    oil_temp_answered(agent, rogue)


def test_a_flow_control_with_a_huge_block_size_and_no_pause(agent, rogue):
    command_id, _ = agent.submit("engine", "read_data", FOUR_DIDS)
    assert rogue.request()[0] == 0x10
    rogue.send("30 FF 00")
    assert rogue.request()[0] == 0x21
    answer(rogue, bytes.fromhex("62 F40D 0B F40C 0FA0 0100 01 F190") + VIN)
    assert agent.wait(command_id).status is Status.COMPLETED


# ---- a second tester, FD frames on a classic link, padding ----------------------------------------------

def test_answers_to_a_second_tester_on_the_same_ids_are_not_ours(agent, rogue):
    """Another tester asks the engine for its VIN on the same ids; the multi-frame answer to it comes in
    while our read waits: it is discarded, and our answer is the result."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
    rogue.request()
    rogue.send("03 22F190", can_id=REQUEST_ID)  # the other tester's request (the agent does not listen there)
    answer(rogue, b"\x62\xf1\x90" + VIN)  # the ECU's answer to it: the agent takes it in, and drops it
    rogue.send("04 62F40D 0A")
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED and result.outcome.result == {"values": {"oil_temp": 10}}


@pytest.mark.parametrize(("data", "fd"), [
    ("00 04 62F40D 0A CCCCCCCCCCCC", True),  # a CAN FD single frame (escape sequence, 12 bytes) on a classic link
    ("04 62F40D 0A CCCCCC", True),  # an 8-byte frame flagged FD
    ("04 62F40D 0A", False),  # no padding although the link pads
])
def test_frames_of_another_format_are_read_leniently(agent, rogue, data, fd):
    """ISO 15765-2 receivers accept what they can decode: the value is read, never a wrong one."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
    rogue.request()
    rogue.send(data, fd=fd, pad=False)
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED and result.outcome.result == {"values": {"oil_temp": 10}}


def test_a_single_frame_without_its_escape_sequence_on_a_long_fd_frame_is_no_answer(agent, rogue):
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"}, timeout_ms=400)
    rogue.request()
    rogue.send("04 62F40D 0A CCCCCCCCCCCCCC", fd=True, pad=False)  # 12 bytes: byte 0 must be 0x00
    result = agent.wait(command_id)
    assert result.status is Status.TIMEOUT
    oil_temp_answered(agent, rogue)


# ---- functional requests --------------------------------------------------------------------------------

def test_functional_answers_duplicated_unknown_and_unconfigured(agent, rogue):
    """The engine answers twice (the first counts), an unconfigured OBD id answers (by its CAN id), an id
    that is no response id at all answers (ignored)."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"}, addressing="functional")
    assert rogue.poll(10, can_id=0x7DF)[:4] == bytes.fromhex("0322F40D")
    rogue.send("04 62F40D 0A")
    rogue.send("04 62F40D 63")  # the same ECU again
    rogue.send("04 62F40D 14", can_id=0x7E9)
    rogue.send("04 62F40D 1E", can_id=0x123)
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED, result.outcome
    assert result.outcome.result == {"responses": {"engine": {"values": {"oil_temp": 10}},
                                                   "0x7E9": {"values": {"oil_temp": 20}}}}
    assert agent.runtime.workers["engine"].executor.discarded == 1  # the engine's second answer
    oil_temp_answered(agent, rogue)  # physical requests get their own answers after it


def test_a_noisy_ecu_on_a_functional_request_is_bounded_and_costs_the_others_nothing(agent, rogue):
    """0x7E9 floods echoing answers for as long as the collection runs: it is one entry, the engine's
    answer stands, the collection ends at its deadline."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"}, addressing="functional",
                                 timeout_ms=1500)
    rogue.poll(10, can_id=0x7DF)
    rogue.send("04 62F40D 0A")
    sent = 0
    while not agent.runtime.workers["engine"].idle:
        for _ in range(50):
            rogue.send("04 62F40D 14", can_id=0x7E9)
        sent += 50
        rogue.poll(0.001)
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED, result.outcome
    assert result.outcome.result == {"responses": {"engine": {"values": {"oil_temp": 10}},
                                                   "0x7E9": {"values": {"oil_temp": 20}}}}
    assert sent > 50


def test_a_flood_on_an_idle_link_is_dropped_counted_and_logged_and_the_next_command_works(agent, rogue, caplog):
    """Memory is bounded by the link's frame queue; what does not fit is counted and logged."""
    owner = agent.runtime.owner
    with caplog.at_level(logging.WARNING, logger="agent.bus.frames"):
        for _ in range(FRAME_QUEUE_SIZE + 500):
            rogue.send("04 62F40C 0A")
        assert wait_until(lambda: owner.counters.dropped >= 500, 10), owner.counters
    assert any("frame queue full" in r.getMessage() for r in caplog.records)
    oil_temp_answered(agent, rogue)


# ---- session and security -------------------------------------------------------------------------------

def extended(agent, rogue) -> None:
    command_id, _ = agent.submit("engine", "set_session", {"session": "extended"})
    assert rogue.request()[:3] == bytes.fromhex("021003")
    rogue.send("06 5003 0032 01F4")
    assert agent.wait(command_id).status is Status.COMPLETED


def test_the_ecu_drops_out_of_the_extended_session_mid_command(agent, rogue):
    """It refuses the write as not supported in the active session (0x7F): a negative response for that
    command; the next keepalive reads the default session and the agent follows it."""
    extended(agent, rogue)
    executor = agent.runtime.workers["engine"].executor
    command_id, _ = agent.submit("engine", "write_data", {"data": "idle_mode", "value": "eco"})
    assert rogue.command_frame()[:4] == bytes.fromhex("042E0100")
    rogue.send("03 7F2E7F")
    result = agent.wait(command_id)
    assert result.status is Status.FAILED and result.outcome.error.as_dict()["nrc"] == "0x7F"
    assert executor.session == 3
    assert rogue.request()[:4] == bytes.fromhex("0322F186")  # the keepalive, once the worker is idle
    rogue.send("04 62F186 01")
    assert wait_until(lambda: executor.session == 1, 10)


def test_keepalives_never_interleave_with_a_running_command(agent, rogue):
    """A command that runs past S3 (0x78 keeps it alive) gets no keepalive between its request and its
    answer: the one worker thread does one exchange at a time; the keepalive comes after."""
    extended(agent, rogue)
    s3 = agent.config.ecu("engine").timing.s3_keepalive_ms / 1000
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
    assert rogue.command_frame()[:4] == bytes.fromhex("0322F40D")
    end = time.monotonic() + 2 * s3
    while time.monotonic() < end:  # the ECU takes twice S3 to answer, saying "pending" meanwhile
        rogue.send("03 7F2278")
        assert rogue.poll(0.05) is None, "the agent sent something while its command was waiting"
    rogue.send("04 62F40D 0A")
    assert agent.wait(command_id).outcome.result == {"values": {"oil_temp": 10}}
    assert rogue.request()[:4] == bytes.fromhex("0322F186")
    rogue.send("04 62F186 03")


def test_a_late_answer_during_a_keepalive_is_neither_the_keepalives_nor_the_next_commands(agent, rogue):
    extended(agent, rogue)
    executor = agent.runtime.workers["engine"].executor
    assert agent.run("engine", "read_data", {"data": "oil_temp"}, timeout_ms=300).status is Status.TIMEOUT
    assert rogue.command_frame()[:4] == bytes.fromhex("0322F40D")
    assert rogue.request()[:4] == bytes.fromhex("0322F186")  # the keepalive
    rogue.send("04 62F40D 0A")  # the late answer to the read
    rogue.send("04 62F186 03")
    oil_temp_answered(agent, rogue, "04 62F40D 0A")
    assert executor.session == 3


@pytest.mark.parametrize(("seed_frame", "status", "message"), [
    ("02 6701", Status.FAILED, "invalid response from ECU"),  # no seed at all
    ("06 6701 00000000", Status.COMPLETED, None),  # all zero: already unlocked, no key is sent
])
def test_security_access_with_an_empty_or_zero_seed(agent, rogue, seed_frame, status, message):
    extended(agent, rogue)
    command_id, _ = agent.submit("engine", "security_access", {"level": 1})
    assert rogue.command_frame()[:3] == bytes.fromhex("022701")
    rogue.send(seed_frame)
    result = agent.wait(command_id)
    assert result.status is status, result.outcome
    if message:
        assert message in result.outcome.error.message
    oil_temp_answered(agent, rogue)


def test_security_access_with_an_odd_length_seed_sends_the_key_for_that_seed(agent, rogue):
    extended(agent, rogue)
    command_id, _ = agent.submit("engine", "security_access", {"level": 1})
    rogue.command_frame()
    rogue.send("05 6701 112233")
    assert rogue.request()[:5] == bytes([0x05, 0x27, 0x02]) + bytes([0x11 ^ 0x5B, 0x22 ^ 0x5B])
    rogue.send("02 6702")
    assert agent.wait(command_id).outcome.result == {"level": 1, "unlocked": True}


def four_byte_key(level: int, seed: bytes, params) -> bytes:
    """An OEM-style algorithm that only takes the 4-byte seeds its ECU is specified to send."""
    (value,) = struct.unpack(">I", seed)
    return struct.pack(">I", value ^ 0xA5A5A5A5)


def test_a_seed_the_key_algorithm_cannot_take_is_the_ecus_bad_answer_not_an_agent_crash(vehicle, rogue, caplog):
    """A 3-byte seed to a 4-byte algorithm: the command fails naming the seed; no key goes out; nothing is
    logged as an internal failure of the executor."""
    config = patient(vehicle)
    config = dataclasses.replace(config, ecus=tuple(
        dataclasses.replace(e, security=(SecurityLevel(1, "test_hostile_ecu:four_byte_key"),))
        if e.name == "engine" else e for e in config.ecus))
    with LocalSession(config) as agent:
        extended(agent, rogue)
        command_id, _ = agent.submit("engine", "security_access", {"level": 1})
        rogue.command_frame()
        rogue.send("05 6701 112233")
        result = agent.wait(command_id)
        assert (result.status, result.outcome.error.code) == (Status.FAILED, ErrorCode.INTERNAL)
        assert "seed 112233" in result.outcome.error.message, result.outcome
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        oil_temp_answered(agent, rogue)  # no key went out: the next frame is the next command's


def test_a_physical_answer_during_another_components_functional_request_is_not_its_answer(agent, rogue):
    """The gateway's functional request (0x18DB33F1) collects while the engine's physical read is under
    way. The engine's multi-frame answer on 0x7E8 is its physical read's: it gets one flow control (from
    the engine's link), and the gateway's result does not say the engine answered a request it never got."""
    gateway_id, _ = agent.submit("gateway", "read_data", {"data": "vin"}, addressing="functional")
    assert rogue.poll(10, can_id=0x18DB33F1, extended=True)[:4] == bytes.fromhex("0322F190")
    engine_id, _ = agent.submit("engine", "read_data", {"data": "vin"})
    assert rogue.request()[:4] == bytes.fromhex("0322F190")
    answer(rogue, b"\x62\xf1\x90" + VIN)
    rogue.send("03 7F2231", can_id=0x18DAF110, extended=True)  # the gateway's own answer
    engine = agent.wait(engine_id)
    gateway = agent.wait(gateway_id)
    assert engine.outcome.result == {"values": {"vin": VIN.decode()}}
    assert gateway.status is Status.COMPLETED, gateway.outcome
    assert set(gateway.outcome.result["responses"]) == {"gateway"}, gateway.outcome.result
    late = []
    while (frame := rogue.poll(0.05)) is not None:
        late.append(frame)
    assert not [f for f in late if f[0] >> 4 == 3], "a second flow control for the engine's answer"


def test_a_physical_answer_is_not_taken_as_a_functional_one_when_the_collector_reads_it_late(agent, rogue,
                                                                                              monkeypatch):
    """The same, with the gateway's worker reading the engine's first frame only after the engine's own
    exchange ended (held there on an event): whether a frame belongs to a physical exchange is judged as it
    arrives, not when the collecting worker reads it. On a loaded machine the gateway read it late now and
    then, took it for an answer to its request, and sent the engine a second flow control."""
    engine_done = threading.Event()
    dispatch = FunctionalLink._dispatch

    def read_late(self, msg):
        if getattr(msg, "arbitration_id", None) == 0x7E8 and not msg.is_extended_id:
            engine_done.wait(10)
        dispatch(self, msg)

    monkeypatch.setattr(FunctionalLink, "_dispatch", read_late)
    gateway_id, _ = agent.submit("gateway", "read_data", {"data": "vin"}, addressing="functional")
    assert rogue.poll(10, can_id=0x18DB33F1, extended=True)[:4] == bytes.fromhex("0322F190")
    engine_id, _ = agent.submit("engine", "read_data", {"data": "vin"})
    assert rogue.request()[:4] == bytes.fromhex("0322F190")
    answer(rogue, b"\x62\xf1\x90" + VIN)
    engine = agent.wait(engine_id)
    engine_done.set()
    rogue.send("03 7F2231", can_id=0x18DAF110, extended=True)  # the gateway's own answer
    gateway = agent.wait(gateway_id)
    assert engine.outcome.result == {"values": {"vin": VIN.decode()}}
    assert gateway.status is Status.COMPLETED, gateway.outcome
    assert set(gateway.outcome.result["responses"]) == {"gateway"}, gateway.outcome.result
    late = []
    while (frame := rogue.poll(0.05)) is not None:
        late.append(frame)
    assert not [f for f in late if f[0] >> 4 == 3], "a second flow control for the engine's answer"


def test_absurd_session_timing_then_silence_does_not_hold_the_worker_past_the_command_budget(vehicle, rogue):
    """The ECU announces P2 65 s and P2* 655 s for the extended session, then answers no keepalive: each
    keepalive waits at most the component's command budget (request_ms), so a command submitted meanwhile
    goes out after it, not minutes later."""
    config = patient(vehicle)
    config = dataclasses.replace(config, ecus=tuple(
        dataclasses.replace(e, timing=dataclasses.replace(e.timing, request_ms=500)) if e.name == "engine" else e
        for e in config.ecus))
    with LocalSession(config) as agent:
        command_id, _ = agent.submit("engine", "set_session", {"session": "extended"})
        rogue.request()
        rogue.send("06 5003 FFFF FFFF")
        assert agent.wait(command_id).outcome.result == {"session": "extended", "p2_ms": 65535, "p2_star_ms": 655350}
        assert rogue.request()[:4] == bytes.fromhex("0322F186")  # a keepalive; the ECU is silent now
        command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
        frame = rogue.request(timeout=20)
        while frame[:4] == bytes.fromhex("0322F186"):  # at most the keepalives before it, each bounded
            frame = rogue.request(timeout=20)
        assert frame[:4] == bytes.fromhex("0322F40D")
        rogue.send("04 62F40D 0A")
        assert agent.wait(command_id).outcome.result == {"values": {"oil_temp": 10}}


# ---- neighbours -----------------------------------------------------------------------------------------

CAMERA_REQUEST, CAMERA_RESPONSE = 0x740, 0x748  # the test vehicle's CAN FD camera (64-byte frames)


def test_classic_frames_answering_an_fd_link_are_read(agent, rogue):
    command_id, _ = agent.submit("camera", "read_data", {"data": "vin"})
    request = rogue.poll(10, can_id=CAMERA_REQUEST)
    assert request is not None and request[:4] == bytes.fromhex("0322F190")
    payload = b"\x62\xf1\x90" + VIN
    rogue.send(f"{0x1000 | len(payload):04X}" + payload[:6].hex(), can_id=CAMERA_RESPONSE)
    assert rogue.poll(10, can_id=CAMERA_REQUEST)[0] == 0x30
    rogue.send("21" + payload[6:13].hex(), can_id=CAMERA_RESPONSE)
    rogue.send("22" + payload[13:].hex(), can_id=CAMERA_RESPONSE)
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED and result.outcome.result == {"values": {"vin": VIN.decode()}}


def test_a_flood_on_one_ecus_id_does_not_starve_a_neighbour(agent, rogue):
    """The engine's id carries a flood of garbage while the camera's read runs: the camera's answer,
    sent behind the flood, is read; the engine's link drops what does not fit (counted)."""
    command_id, _ = agent.submit("camera", "read_data", {"data": "vin"})
    assert rogue.poll(10, can_id=CAMERA_REQUEST) is not None
    for _ in range(FRAME_QUEUE_SIZE + 1000):
        rogue.send("21 FFFFFFFFFFFFFF")  # consecutive frames nobody asked for, on the engine's id
    single_frame = (bytes([0x00, 20, 0x62, 0xF1, 0x90]) + VIN).ljust(24, b"\xaa")  # an FD single frame, 24 bytes
    rogue.send(single_frame.hex(), can_id=CAMERA_RESPONSE, fd=True)
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED and result.outcome.result == {"values": {"vin": VIN.decode()}}
    assert wait_until(lambda: agent.runtime.owner.counters.dropped >= 1000, 10)
    oil_temp_answered(agent, rogue)


@pytest.mark.parametrize(("frame", "shown"), [
    ("02 6E01", "6e01"),  # a write's answer cut short of its DID echo
    ("04 6E0200 00", "6e020000"),  # the echo of another DID
])
def test_a_timeout_after_discarded_answers_says_what_was_discarded(agent, rogue, frame, shown):
    """The ECU did answer, with something that is not this request's answer: the timeout says so (and
    shows it), rather than that the ECU never answered."""
    command_id, _ = agent.submit("engine", "write_data", {"data": "idle_mode", "value": "eco"}, timeout_ms=400)
    assert rogue.request()[:4] == bytes.fromhex("042E0100")
    rogue.send(frame)
    result = agent.wait(command_id)
    assert result.status is Status.TIMEOUT
    assert "1 answer(s) discarded" in result.outcome.error.message and shown in result.outcome.error.message
    oil_temp_answered(agent, rogue)


# ---- the simulator's misbehaviours for the same cases (bench and field reproduction) ---------------------

def test_simulator_pending_then_silence_and_repeated_answers(vehicle):
    simulator = Simulator(load_sim_config(DATA / "vehicle-sim.yaml"), bus=vehicle.bus)
    assert simulator.start()
    try:
        engine = simulator.ecu("engine")
        with LocalSession(vehicle) as agent:
            engine.set_faults([fault_from_dict({"service": 0x22, "match": "F40D", "pending": 2, "no_answer": True})])
            result = agent.run("engine", "read_data", {"data": "oil_temp"})
            assert result.status is Status.TIMEOUT and "P2*" in result.outcome.error.message
            engine.set_faults([fault_from_dict({"service": 0x22, "match": "F40D", "repeat": 2})])
            first = agent.run("engine", "read_data", {"data": "oil_temp"})
            engine.set_faults([])
            second = agent.run("engine", "read_data", {"data": "vin"})  # not one of the repeats
            assert first.outcome.result == {"values": {"oil_temp": -10}}
            assert second.outcome.result == {"values": {"vin": VIN.decode()}}
        assert engine.server.executed[0x22] == 2  # the silent read was never run; the repeats ran once
    finally:
        simulator.stop()


def test_a_late_answer_to_a_functional_read_of_fewer_dids_does_not_cost_that_ecu_its_answer(agent, rogue):
    """As physically: the engine's late VIN (of an earlier read) echoes the first DID of a functional read of
    VIN and oil temperature; its real answer right after it is its entry."""
    command_id, _ = agent.submit("engine", "read_data", {"data": ["vin", "oil_temp"]}, addressing="functional")
    assert rogue.poll(10, can_id=0x7DF)[:6] == bytes.fromhex("0522F190F40D")
    answer(rogue, b"\x62\xf1\x90" + VIN)  # stale
    answer(rogue, b"\x62\xf1\x90" + VIN + b"\xf4\x0d\x0a")
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED, result.outcome
    assert result.outcome.result == {"responses": {"engine": {"values": {"vin": VIN.decode(), "oil_temp": 10}}}}
    assert agent.runtime.workers["engine"].executor.discarded == 1


def test_a_functional_answer_that_does_not_fit_the_read_is_that_ecus_error(agent, rogue):
    command_id, _ = agent.submit("engine", "read_data", {"data": ["vin", "oil_temp"]}, addressing="functional")
    rogue.poll(10, can_id=0x7DF)
    answer(rogue, b"\x62\xf1\x90" + VIN)  # and nothing else
    result = agent.wait(command_id)
    assert result.status is Status.COMPLETED, result.outcome
    error = result.outcome.result["responses"]["engine"]["error"]
    assert error["code"] == "internal" and "invalid response from ECU" in error["message"]
    assert agent.runtime.workers["engine"].executor.discarded == 0


# ---- a stray frame at the moment a request goes out -----------------------------------------------------

def test_a_stray_overflow_flow_control_does_not_make_a_sent_single_frame_look_unsent(channel):
    """An FC.OVERFLOW on the response id that arrives between the link's flush and its single-frame
    request (the notifier delivers it right then) concerns no transfer of ours: a single frame has no flow
    control. The request went out; the send must say so, not "send failed: OverflowError"."""
    owner = BusOwner(BusConfig(interface="virtual", channel=channel))
    assert owner.start()
    spy = Rogue(channel)
    try:
        link = IsoTpLink(owner, isotp_address(Addressing("normal_11bit", REQUEST_ID, RESPONSE_ID)),
                         IsoTpConfig(padding=0xCC), "engine")
        link.flush()
        link._on_frame(can.Message(arbitration_id=RESPONSE_ID, is_extended_id=False, data=b"\x32\x00\x00"))
        link.send(bytes.fromhex("22F40D"), timeout=1.0)
        assert spy.request()[:4] == bytes.fromhex("0322F40D")
    finally:
        spy.close()
        owner.stop()


def test_with_extended_addressing_frames_for_another_tester_are_not_ours(agent, rogue):
    """The body ECU uses extended addressing (first byte: the tester's address 0xF1). A refusal addressed
    to tester 0xF2 on the same id is not for us; the one for 0xF1 is the result."""
    command_id, _ = agent.submit("body", "read_data", {"data": "vin"})
    request = rogue.poll(10, can_id=0x6F1)
    assert request is not None and request[:5] == bytes.fromhex("400322F190")
    rogue.send("F2 03 7F2222", can_id=0x640)
    rogue.send("F1 03 7F2231", can_id=0x640)
    result = agent.wait(command_id)
    assert result.status is Status.FAILED and result.outcome.error.as_dict()["nrc"] == "0x31", result.outcome


@pytest.mark.parametrize(("first_frame", "pad"), [
    ("1FFF 62F40D 0A0B0C", True),  # 4095 bytes: more than max_pdu, the kernel answers FC.OVERFLOW and drops it
    ("1005 62F40D 0A0B0C", True),  # 5 bytes: a first frame for what fits a single frame, which ISO 15765-2 ignores
    ("1020 62F40D 0A0B", False),  # 7 bytes of a CAN frame: a first frame must fill it (the kernel drops it)
])
def test_the_kernel_link_does_not_wait_out_the_deadline_for_a_first_frame_the_kernel_drops(channel, first_frame,
                                                                                            pad):
    """The kernel link takes a first frame on the raw bus for the start of an answer and then waits for it
    to the command's deadline (P2 bounds only the first frame). One the kernel refuses starts nothing: the
    wait ends at P2 with no answer, not at the deadline with 'reception not complete'. (No CAN_ISOTP here:
    the socket is a stand-in that never delivers, as the kernel would not for these.)"""
    class SilentSocket:  # the kernel socket for these frames: it delivers nothing
        def set_opts(self, **kwargs):
            pass

        def set_fc_opts(self, **kwargs):
            pass

        def bind(self, interface, address):
            pass

        def settimeout(self, timeout):
            self.timeout = timeout

        def recv(self, size=4096):
            if not self.timeout:
                raise BlockingIOError
            time.sleep(min(self.timeout, 0.01))  # a blocking read that gets nothing (the owner's frames wake no one)
            raise TimeoutError("timed out")

        def close(self):
            pass

    owner = BusOwner(BusConfig(interface="virtual", channel=channel))
    assert owner.start()
    ecu = Rogue(channel)
    try:
        address = isotp_address(Addressing("normal_11bit", REQUEST_ID, RESPONSE_ID))
        link = KernelIsoTpLink(channel, address, IsoTpConfig(padding=0xCC, max_pdu=64), "engine", owner=owner,
                               socket_factory=SilentSocket)
        link.flush()
        frames = owner.counters.frames_rx
        ecu.send(first_frame, pad=pad)
        assert wait_until(lambda: owner.counters.frames_rx > frames, 5)
        assert link.recv(0.05, time.monotonic() + 0.5) is None
    finally:
        ecu.close()
        owner.stop()


def test_busy_for_ever_ends_after_the_configured_repeats_as_that_nrc(agent, rogue):
    """NRC 0x21 to every repetition: busy_retries (3) repeats, then the refusal is the result."""
    command_id, _ = agent.submit("engine", "read_data", {"data": "oil_temp"})
    for _ in range(1 + agent.config.ecu("engine").timing.busy_retries):
        assert rogue.request()[:4] == bytes.fromhex("0322F40D")
        rogue.send("03 7F2221")
    result = agent.wait(command_id)
    assert result.status is Status.FAILED and result.outcome.error.as_dict()["nrc"] == "0x21"
    oil_temp_answered(agent, rogue)
