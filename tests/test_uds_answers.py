"""Every answer is checked against its request (echoes), stale answers are discarded, SPRMIB is honoured,
and session/security state follows raw exchanges exactly as it follows the named commands.

Byte-exact, over the scripted link of uds_support (the integration tests run the same cases over real
ISO-TP against the simulator and against an ECU built on can-isotp in the test).
"""

import dataclasses
import logging
import time

import pytest
from uds_support import ScriptedLink, run

from agent.uds.executor import Executor
from agent.uds.transaction import Timing, answers, echo_prefix, suppresses_positive, transact
from agent.wire import command as c
from agent.wire.command import ErrorCode, Status

VIN = "62f190" + b"TEST0VEHICLE00001".hex()


def engine(vehicle, **changes):
    return dataclasses.replace(vehicle.ecu("engine"), **changes)


# ---- a late answer never becomes another request's result -------------------------------------------

def test_late_vin_is_not_the_answer_to_raw_22f18c(vehicle):
    sent, outcome = run(vehicle, "raw", {"request": "22F18C"}, VIN, "7f2231")
    assert sent == ["22f18c"]
    assert outcome.status is Status.FAILED and dict(outcome.error.details)["nrc"] == "0x31"


def test_late_vin_before_the_real_answer_of_a_read(vehicle):
    _, outcome = run(vehicle, "read_data", {"data": "0xF18C"}, VIN, "62f18c3132333435")
    assert outcome.status is Status.COMPLETED, outcome
    assert outcome.result == {"values": {"0xF18C": {"raw": "3132333435"}}}


def test_6703_is_not_the_answer_to_2701(vehicle):
    seed = "11223344"
    sent, outcome = run(vehicle, "security_access", {"level": 1}, "6703", "6701" + seed, "6702")
    key = bytes(b ^ (0x5A + 1) for b in bytes.fromhex(seed)).hex()
    assert sent == ["2701", "2702" + key]
    assert outcome.result == {"level": 1, "unlocked": True}


def test_stale_answer_is_logged_at_debug(vehicle, caplog):
    with caplog.at_level(logging.DEBUG, logger="agent.uds.transaction"):
        run(vehicle, "raw", {"request": "22F18C"}, VIN, "7f2231")
    stale = [r for r in caplog.records if "not for request" in r.getMessage()]
    assert len(stale) == 1 and stale[0].levelno == logging.DEBUG and "62f190" in stale[0].getMessage()


@pytest.mark.parametrize(("command", "params", "wrong", "right"), [
    ("set_session", {"session": "extended"}, "50020032 01f4", "50030032 01f4"),
    ("reset", {"type": "hard"}, "5103", "5101"),
    ("tester_present", {}, "7e01", "7e00"),
    ("write_data", {"data": "idle_mode", "value": "eco"}, "6e0101", "6e0100"),
    ("operation", {"routine": "self_test", "action": "start"}, "710102040001", "710102030001"),
    ("operation", {"routine": "self_test", "action": "start"}, "710202030001", "710102030001"),
    ("io_control", {"data": "engine_speed", "control": "freeze"}, "6ff40d020bb8", "6ff40c020bb8"),
    ("clear_faults", {}, "7f2231", "54"),  # a negative answer for another service is stale too
])
def test_each_echo_is_checked(vehicle, command, params, wrong, right):
    wrong, right = wrong.replace(" ", ""), right.replace(" ", "")
    _, alone = run(vehicle, command, params, wrong)
    assert alone.status is Status.TIMEOUT, alone  # the wrong echo was discarded, nothing else came
    _, outcome = run(vehicle, command, params, wrong, right)
    assert outcome.status is Status.COMPLETED, outcome


def test_snapshot_answer_for_another_dtc_is_discarded(vehicle):
    _, outcome = run(vehicle, "read_faults", {"snapshots": True}, "5902ff0301002f",
                     "5904c10087090101f40c0c80",  # another DTC's snapshot: stale
                     "59040301002f0101f40c0c80")
    assert outcome.status is Status.COMPLETED
    assert outcome.result["faults"][0]["snapshots"] == [{"record": 1, "values": {"engine_speed": 800.0}}]


def test_read_data_answer_must_carry_every_did_asked_for(vehicle):
    _, outcome = run(vehicle, "read_data", {"data": ["engine_speed", "oil_temp"]}, "62f40c0bb8")
    assert outcome.status is Status.FAILED and "asked for 0xF40C, 0xF40D" in outcome.error.message


def test_stale_answers_do_not_extend_p2():
    """A stream of stale answers must not hold the request open past P2."""

    class Chatty:
        def send(self, payload, timeout):
            pass

        def recv(self, timeout, limit=None):
            time.sleep(min(timeout, 0.01))
            return bytes.fromhex("62f190aa")

        def flush(self):
            pass

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="within P2"):
        transact(Chatty(), bytes.fromhex("22f18c"), Timing(0.15, 1.0, 0), time.monotonic() + 5)
    assert time.monotonic() - started < 1.0


def test_link_is_flushed_before_every_request(vehicle):
    link = ScriptedLink("7f3e21", "7e00")
    Executor(vehicle.ecu("engine"), link).execute(c.TesterPresent(), time.monotonic() + 2)
    assert link.flushes == len(link.sent) == 2


def test_echo_table():
    assert echo_prefix(bytes.fromhex("22f190f40c")) == bytes.fromhex("62f190")
    assert echo_prefix(bytes.fromhex("1083")) == bytes.fromhex("5003")
    assert echo_prefix(bytes.fromhex("310102030a")) == bytes.fromhex("71010203")
    assert echo_prefix(bytes.fromhex("19040301 00ff".replace(" ", ""))) == bytes.fromhex("5904030100")
    assert echo_prefix(bytes.fromhex("190208")) == bytes.fromhex("5902")
    assert echo_prefix(bytes.fromhex("3d1220000410")) == bytes.fromhex("7d12200004")
    assert echo_prefix(bytes.fromhex("14ffffff")) == bytes.fromhex("54")
    assert echo_prefix(bytes.fromhex("0100")) == bytes.fromhex("4100")
    assert answers(bytes.fromhex("2701"), bytes.fromhex("7f2735"))
    assert not answers(bytes.fromhex("2701"), bytes.fromhex("7f2235"))
    assert not answers(bytes.fromhex("2701"), b"")
    assert suppresses_positive(bytes.fromhex("3e80")) and suppresses_positive(bytes.fromhex("1083"))
    assert not suppresses_positive(bytes.fromhex("1982ff"))  # ReadDTCInformation has no SPRMIB
    assert not suppresses_positive(bytes.fromhex("22f190")) and not suppresses_positive(bytes.fromhex("3e"))


# ---- suppressPosRspMsgIndicationBit ---------------------------------------------------------------

def test_sprmib_waits_p2_for_a_negative_answer_then_completes(vehicle):
    started = time.monotonic()
    sent, outcome = run(vehicle, "raw", {"request": "3E80"})
    assert sent == ["3e80"] and outcome.status is Status.COMPLETED
    assert outcome.result == {"response": "", "suppressed": True}
    assert time.monotonic() - started >= 0.15  # it waited P2 for a possible negative response


def test_sprmib_negative_answer_is_a_failure(vehicle):
    _, outcome = run(vehicle, "raw", {"request": "3E80"}, "7f3e12")
    assert outcome.status is Status.FAILED and dict(outcome.error.details)["nrc"] == "0x12"


def test_sprmib_after_pending_the_final_answer_is_owed(vehicle):
    executor = Executor(vehicle.ecu("engine"), ScriptedLink())
    _, outcome = run(vehicle, "raw", {"request": "1083"}, "7f1078", "5003003201f4", executor=executor)
    assert outcome.result == {"response": "5003003201f4"} and executor.session == 3
    _, outcome = run(vehicle, "raw", {"request": "1083"}, "7f1078")
    assert outcome.status is Status.TIMEOUT and "P2*" in outcome.error.message


def test_keepalive_does_not_wait():
    link = ScriptedLink()
    started = time.monotonic()
    transact(link, bytes.fromhex("3e80"), Timing(1.0, 5.0, 0), time.monotonic() + 5, wait_negative=False)
    assert link.sent == [bytes.fromhex("3e80")] and time.monotonic() - started < 0.5


# ---- keepalives check the session the ECU reports (DID 0xF186) -----------------------------------------

def in_extended(vehicle, link):
    executor = Executor(vehicle.ecu("engine"), link)
    run(vehicle, "raw", {"request": "1003"}, "5003003201f4", executor=executor)
    executor.link = link
    return executor


def test_a_keepalive_that_finds_the_ecu_back_in_the_default_session_follows_it(vehicle, caplog):
    """An ECU that reset on its own (power, watchdog) answers 0x3E in any session; only asking tells."""
    link = ScriptedLink("62f18603", "62f18601")
    executor = in_extended(vehicle, link)
    executor.keepalive()
    assert executor.session == 3
    executor.keepalive()
    assert [s.hex() for s in link.sent] == ["22f186", "22f186"]
    assert executor.session == 1 and executor.security_level == 0
    assert "reports session 0x01" in caplog.text


def test_a_keepalive_that_reads_an_odd_session_keeps_the_one_the_agent_entered(vehicle):
    """An OEM's own 0xF186 format must not invent a session; only a fall back to the default is followed."""
    link = ScriptedLink("62f186ff00", "62f186")
    executor = in_extended(vehicle, link)
    executor.keepalive()
    executor.keepalive()
    # a short answer tells nothing: TesterPresent keeps the session for this round
    assert executor.session == 3 and [s.hex() for s in link.sent] == ["22f186", "22f186", "3e80"]


def test_an_ecu_without_did_f186_is_kept_alive_with_tester_present_from_then_on(vehicle):
    link = ScriptedLink("7f2231")
    executor = in_extended(vehicle, link)
    executor.keepalive()
    executor.keepalive()
    assert [s.hex() for s in link.sent] == ["22f186", "3e80", "3e80"]
    assert executor.session == 3


def test_an_ecu_that_does_not_answer_its_keepalive_is_taken_to_have_left_the_session(vehicle, caplog):
    """Off or reset, it is in its default session when it comes back; collection waits for nothing."""
    link = ScriptedLink(None, "62f18603", None, None)
    executor = in_extended(vehicle, link)
    executor.keepalive()
    assert executor.session == 3  # one lost answer (a frame lost to an error) does not end a session
    executor.keepalive()
    executor.keepalive()
    assert executor.session == 3  # an answer in between: the count starts again
    executor.keepalive()
    assert executor.session == 1
    assert "did not answer" in caplog.text


# ---- session and security state follow raw exchanges ------------------------------------------------

def test_raw_session_change_sets_session_and_timing(vehicle):
    executor = Executor(vehicle.ecu("engine"), ScriptedLink())
    run(vehicle, "raw", {"request": "1003"}, "50030064 01f4".replace(" ", ""), executor=executor)
    assert executor.session == 3
    assert executor.timing.p2 == pytest.approx(0.15)  # config 150 ms is above the announced 100 + 50 ms
    assert executor.timing.p2_star == pytest.approx(5.05)
    run(vehicle, "raw", {"request": "1083"}, executor=executor)  # suppressed: no NRC within P2 means done
    assert executor.session == 3


def test_raw_reset_and_raw_security_follow_state(vehicle):
    executor = Executor(vehicle.ecu("engine"), ScriptedLink())
    run(vehicle, "raw", {"request": "1003"}, "5003003201f4", executor=executor)
    run(vehicle, "raw", {"request": "2701"}, "670111223344", executor=executor)
    assert executor.security_level == 0  # a seed is not an unlock
    run(vehicle, "raw", {"request": "270201020304"}, "6702", executor=executor)
    assert executor.security_level == 1
    run(vehicle, "raw", {"request": "2701"}, "670100000000", executor=executor)
    assert executor.security_level == 1  # zero seed: still unlocked
    _, refused = run(vehicle, "raw", {"request": "270201020304"}, "7f2735", executor=executor)
    assert refused.status is Status.FAILED and executor.security_level == 1  # a refused key changes nothing
    run(vehicle, "raw", {"request": "1101"}, "5101", executor=executor)
    assert (executor.session, executor.security_level) == (1, 0)


def test_named_session_change_relocks(vehicle):
    executor = Executor(vehicle.ecu("engine"), ScriptedLink())
    run(vehicle, "security_access", {"level": 1}, "670100000000", executor=executor)
    assert executor.security_level == 1
    run(vehicle, "set_session", {"session": "extended"}, "5003003201f4", executor=executor)
    assert (executor.session, executor.security_level) == (3, 0)


# ---- ISO 14229:2006 session responses ----------------------------------------------------------------

def test_2006_session_response_with_uds_standard_2006(vehicle):
    executor = Executor(engine(vehicle, uds_standard=2006), ScriptedLink())
    _, outcome = run(vehicle, "set_session", {"session": "extended"}, "5003", executor=executor)
    assert outcome.status is Status.COMPLETED
    assert outcome.result == {"session": "extended", "p2_ms": 150, "p2_star_ms": 1000}  # the configured waits
    assert executor.session == 3
    # 2006: bytes after the echo are the manufacturer's, never read as timing
    _, outcome = run(vehicle, "set_session", {"session": "extended"}, "5003ffffffff", executor=executor)
    assert outcome.result["p2_ms"] == 150 and executor.timing.p2 == pytest.approx(0.15)


def test_2006_answer_to_a_2013_config_fails_but_the_session_is_kept(vehicle):
    executor = Executor(vehicle.ecu("engine"), ScriptedLink())
    _, outcome = run(vehicle, "set_session", {"session": "extended"}, "5003", executor=executor)
    assert outcome.status is Status.FAILED and outcome.error.code is ErrorCode.INTERNAL
    assert "uds_standard: 2006" in outcome.error.message
    assert executor.session == 3  # the ECU switched: the worker keeps it alive with TesterPresent


def test_raw_session_without_timing_still_sets_the_session(vehicle):
    executor = Executor(vehicle.ecu("engine"), ScriptedLink())
    _, outcome = run(vehicle, "raw", {"request": "1003"}, "5003", executor=executor)
    assert outcome.result == {"response": "5003"} and executor.session == 3

