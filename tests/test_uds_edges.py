"""UDS at its edges, end to end over ISO-TP on the virtual bus: late and wrong answers, SPRMIB, state after
raw 0x10/0x11, ISO 14229:2006 ECUs, FC.WAIT, one DTC's snapshot refused.

The simulator plays the ECU (with the behaviour injected per test), and once an ECU built directly on
can-isotp in the test plays it, so the agent is not only checked against its own twin.
"""

from __future__ import annotations

import dataclasses
import threading

import can
import isotp
import pytest
from conftest import DATA

from agent.bus.owner import wait_until
from agent.config.transport import isotp_address
from agent.devtools.sim.config import fault_from_dict, load_sim_config
from agent.devtools.sim.simulator import Simulator
from agent.system.local import LocalSession
from agent.wire.command import ErrorCode, Status

VIN = b"TEST0VEHICLE00001"


def completed(session, component, command, params=None, **kw):
    result = session.run(component, command, params, **kw)
    assert result.status is Status.COMPLETED, result.outcome
    return result.outcome.result


def replace_ecu(config, name, **changes):
    return dataclasses.replace(config, ecus=tuple(
        dataclasses.replace(e, **changes) if e.name == name else e for e in config.ecus))


def engine_timing(vehicle, **timing):
    return replace_ecu(vehicle, "engine", timing=dataclasses.replace(vehicle.ecu("engine").timing, **timing))


@pytest.fixture
def custom_sim(vehicle):
    """Starts the test vehicle's simulator with the engine ECU changed; stopped at the end."""
    started = []

    def start(**engine_changes):
        config = load_sim_config(DATA / "vehicle-sim.yaml")
        simulator = Simulator(replace_ecu(config, "engine", **engine_changes), bus=vehicle.bus)
        assert simulator.start()
        started.append(simulator)
        return simulator

    yield start
    for simulator in started:
        simulator.stop()


# ---- a late answer is never another command's result ------------------------------------------------

def test_late_answer_from_the_simulator_is_discarded(vehicle, sim):
    """The VIN read times out (P2 1 s); its answer comes 0.3 s into the next request's P2."""
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "delay_ms": 1300})])
    with LocalSession(engine_timing(vehicle, p2_ms=1000)) as agent:
        assert agent.run("engine", "read_data", {"data": "vin"}).status is Status.TIMEOUT
        raw = agent.run("engine", "raw", {"request": "22F18C"})
        assert raw.status is Status.FAILED, raw.outcome  # not `completed` with the VIN
        assert raw.outcome.error.as_dict()["nrc"] == "0x31"
        assert completed(agent, "engine", "read_data", {"data": "oil_temp"}) == {"values": {"oil_temp": -10}}


class CanIsotpEcu:
    """An engine ECU on can-isotp's own threaded stack and its own virtual bus, scripted per request."""

    def __init__(self, vehicle, script, **params) -> None:
        self.bus = can.Bus(interface="virtual", channel=vehicle.bus.channel, fd=True)
        self.stack = isotp.CanStack(self.bus, address=isotp_address(vehicle.ecu("engine").addressing, server=True),
                                    params={"blocking_send": True, "tx_padding": 0xCC, "tx_data_min_length": 8,
                                            **params})
        self.script = script
        self.requests: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="can-isotp-engine", daemon=True)

    def __enter__(self):
        self.stack.start()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self.stack.stop()
        self.bus.shutdown()

    def _run(self):
        while not self._stop.is_set():
            request = self.stack.recv(block=True, timeout=0.05)
            if request is not None:
                self.requests.append(bytes(request).hex())
                for answer in self.script.get(bytes(request).hex(), []):
                    self.stack.send(bytes.fromhex(answer), send_timeout=5)


def test_late_answer_from_a_can_isotp_ecu(vehicle):
    """Deterministic: this ECU sends the VIN late exactly when the next request arrives, then its answer."""
    script = {
        "22f190": [],  # silent: the read times out
        "22f18c": ["62f190" + VIN.hex(), "7f2231"],  # the late VIN first, then the real answer
        "2701": ["6703", "670111223344"],  # a wrong echo, then the real seed
        "2702" + bytes(b ^ 0x5B for b in bytes.fromhex("11223344")).hex(): ["6702"],
    }
    with CanIsotpEcu(vehicle, script) as ecu, LocalSession(vehicle) as agent:
        assert agent.run("engine", "read_data", {"data": "vin"}).status is Status.TIMEOUT
        raw = agent.run("engine", "raw", {"request": "22F18C"})
        assert (raw.status, raw.outcome.error.as_dict().get("nrc")) == (Status.FAILED, "0x31")
        assert completed(agent, "engine", "security_access", {"level": 1}) == {"level": 1, "unlocked": True}
    assert ecu.requests[:3] == ["22f190", "22f18c", "2701"]


def test_wrong_echo_from_the_simulator_is_not_an_answer(agent, sim):
    ecu = sim.ecu("engine")
    completed(agent, "engine", "set_session", {"session": "extended"})
    ecu.set_faults([fault_from_dict({"service": 0x27, "match": "01", "reply": "6703"})])
    result = agent.run("engine", "security_access", {"level": 1})
    assert result.status is Status.TIMEOUT, result.outcome
    assert ecu.received[0x27] == 1  # no key was computed from a seed that was never given


# ---- SPRMIB, and state that follows raw session / reset requests ---------------------------------------

def test_raw_tester_present_with_sprmib_completes(agent, sim):
    assert completed(agent, "engine", "raw", {"request": "3E80"}) == {"response": "", "suppressed": True}
    assert sim.ecu("engine").received[0x3E] == 1


def test_raw_session_change_is_kept_alive_and_raw_reset_ends_it(agent, sim):
    ecu = sim.ecu("engine")
    worker = agent.runtime.workers["engine"]
    assert completed(agent, "engine", "raw", {"request": "1083"}) == {"response": "", "suppressed": True}
    assert worker.executor.session == 3 and ecu.server.session == 3
    # S3 keepalives every 300 ms; the simulated ECU drops the session after 1 s without them
    assert wait_until(lambda: ecu.server.reads[0xF186] >= 5, 10)  # each reads the session it holds (0xF186)
    assert ecu.server.session == 3
    completed(agent, "engine", "write_data", {"data": "idle_mode", "value": "high"})  # needs the extended session
    assert completed(agent, "engine", "raw", {"request": "1101"}) == {"response": "5101"}
    assert worker.executor.session == 1 and ecu.server.session == 1
    keepalives = ecu.server.reads[0xF186]
    assert completed(agent, "engine", "raw", {"request": "22F40D"}) == {"response": "62f40df6"}
    assert ecu.server.reads[0xF186] == keepalives  # default session: no more keepalives


def test_an_ecu_that_reset_on_its_own_is_noticed_and_collection_goes_on(agent, sim):
    """Before, the worker kept believing in the extended session: keepalives for ever, no more readings."""
    ecu = sim.ecu("engine")
    worker = agent.runtime.workers["engine"]
    completed(agent, "engine", "set_session", {"session": "extended"})
    assert worker.executor.session == 3
    ecu.server.restart()  # what a power cycle or a watchdog reset does to its state
    assert wait_until(lambda: worker.executor.session == 1, 10)
    keepalives = ecu.server.reads[0xF186]
    assert completed(agent, "engine", "raw", {"request": "22F40D"}) == {"response": "62f40df6"}
    assert ecu.server.reads[0xF186] == keepalives  # default session: no more keepalives



def test_a_keepalive_that_raises_does_not_end_the_worker(agent, sim, caplog):
    """The keepalive/probe step was the one step of the worker's loop without a guard: a bug there ended
    the thread (revived by the main loop each second, with no metric). Now it is logged, once until a
    keepalive works again, and the worker goes on."""
    import logging

    worker = agent.runtime.workers["engine"]
    completed(agent, "engine", "set_session", {"session": "extended"})
    keepalive, calls = worker.executor.keepalive, []

    def broken():
        calls.append(1)
        raise KeyError("a bug in a keepalive")

    with caplog.at_level(logging.ERROR):
        worker.executor.keepalive = broken
        assert wait_until(lambda: len(calls) >= 3, 10)  # every 300 ms (S3): the worker lives on
        worker.executor.keepalive = keepalive
    assert worker.alive
    assert len([r for r in caplog.records if "keepalive or probe" in r.getMessage()]) == 1
    assert completed(agent, "engine", "raw", {"request": "22F40D"}) == {"response": "62f40df6"}

# ---- ISO 14229:2006 ECUs ---------------------------------------------------------------------------------

def test_2006_ecu_with_uds_standard_2006(vehicle, custom_sim):
    sim = custom_sim(uds_standard=2006)
    with LocalSession(replace_ecu(vehicle, "engine", uds_standard=2006)) as agent:
        assert completed(agent, "engine", "set_session", {"session": "extended"}) == {
            "session": "extended", "p2_ms": 150, "p2_star_ms": 1000}
        assert wait_until(lambda: sim.ecu("engine").server.reads[0xF186] >= 5, 10)
        completed(agent, "engine", "write_data", {"data": "idle_mode", "value": "high"})


def test_2006_ecu_configured_2013_fails_but_its_session_is_kept_alive(vehicle, custom_sim):
    sim = custom_sim(uds_standard=2006)
    ecu = sim.ecu("engine")
    with LocalSession(vehicle) as agent:
        result = agent.run("engine", "set_session", {"session": "extended"})
        assert (result.status, result.outcome.error.code) == (Status.FAILED, ErrorCode.INTERNAL)
        assert "uds_standard: 2006" in result.outcome.error.message
        assert wait_until(lambda: ecu.server.reads[0xF186] >= 5, 10)  # longer than the ECU's S3 (1 s)
        assert ecu.server.session == 3
        completed(agent, "engine", "write_data", {"data": "idle_mode", "value": "high"})


# ---- FC.WAIT ---------------------------------------------------------------------------------------------

FOUR_DIDS = {"data": ["vin", "engine_speed", "oil_temp", "idle_mode"]}  # a 9-byte, multi-frame request


def test_fc_wait_frames_are_waited_out(vehicle, custom_sim):
    sim = custom_sim(fc_wait_frames=3)
    spy = can.Bus(interface="virtual", channel=vehicle.bus.channel, fd=True)
    try:
        with LocalSession(vehicle) as agent:
            assert completed(agent, "engine", "read_data", FOUR_DIDS)["values"]["vin"] == VIN.decode()
        frames = []
        while (msg := spy.recv(0.05)) is not None:
            frames.append(msg)
    finally:
        spy.shutdown()
    waits = [m for m in frames if m.arbitration_id == 0x7E8 and m.data[0] == 0x31]
    assert len(waits) == 3
    assert sim.ecu("engine").server.executed[0x22] == 1


def test_more_fc_wait_frames_than_wftmax_abort(vehicle, custom_sim):
    custom_sim(fc_wait_frames=3)
    config = replace_ecu(vehicle, "engine", isotp=dataclasses.replace(vehicle.ecu("engine").isotp, wftmax=2))
    with LocalSession(config) as agent:
        result = agent.run("engine", "read_data", FOUR_DIDS)
    assert result.status is Status.TIMEOUT
    assert "MaximumWaitFrameReachedError" in result.outcome.error.message  # not a silent P2 timeout


# ---- read_faults returns what it could read -----------------------------------------------------------

def test_one_dtc_snapshot_refused_the_rest_is_read(agent, sim):
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x19, "match": "04C10087", "nrc": 0x31})])
    result = agent.run("engine", "read_faults", {"snapshots": True, "extended": True})
    assert result.status is Status.COMPLETED, result.outcome
    p0301, u0100 = result.outcome.result["faults"]
    assert p0301["snapshots"] == [{"record": 1, "values": {"engine_speed": 800.0}}]
    assert "snapshots_error" not in p0301
    assert "snapshots" not in u0100
    assert u0100["snapshots_error"] == {"code": "negative_response", "nrc": "0x31", "nrc_name": "RequestOutOfRange",
                                        "message": "ECU refused service 0x19: NRC 0x31 RequestOutOfRange"}
    assert u0100["extended_data"] == ""  # its extended data was read: the simulator has none for it
    assert u0100["status"]["confirmed"] is True


def test_no_request_goes_out_after_the_commands_deadline(agent, sim):
    """62 stored DTCs, snapshots asked for, and an ECU that never answers a snapshot request: each waits
    out P2 (150 ms), so a 1 s command has room for at most 7 of them. The rest used to go out anyway,
    back to back after the deadline (each answered by the ECU into the next command's exchange); now
    each of those DTCs gets its timeout error without a request on the bus."""
    ecu = sim.ecu("engine")
    for n in range(60):
        ecu.set_dtc(0x100000 + n, 0x09)
    ecu.set_faults([fault_from_dict({"service": 0x19, "match": "04", "no_answer": True})])
    command_id, _ = agent.submit("engine", "read_faults", {"snapshots": True}, timeout_ms=1000)
    result = agent.wait(command_id, 20)
    assert result.status is Status.COMPLETED, result.outcome
    faults = result.outcome.result["faults"]
    assert len(faults) == 62 and all(f["snapshots_error"]["code"] == "timeout" for f in faults)
    assert wait_until(lambda: ecu.received[0x19] >= 2, 2)
    assert ecu.received[0x19] <= 1 + 1000 // 150 + 1  # the DTC list, then what fits before the deadline


def test_a_long_request_to_an_ecu_with_a_slow_flow_control_gets_the_whole_command_deadline(vehicle):
    """ISO 15765-2 lets a receiver ask for up to 127 ms between consecutive frames. An 81-byte request is
    11 consecutive frames: 1.4 s at STmin 127 ms. That is longer than P2* (1 s), which only bounds the
    wait for an answer, and well within the command's 3 s; the send used to be cut off at P2* (an
    `ISO-TP send timed out` timeout before the ECU had heard the request)."""
    request = "22" + "F40C" * 40
    with CanIsotpEcu(vehicle, {request.lower(): ["7f2231"]}, stmin=127) as ecu, LocalSession(vehicle) as agent:
        result = agent.run("engine", "raw", {"request": request})
    assert ecu.requests == [request.lower()]
    assert (result.status, result.outcome.error.as_dict().get("nrc")) == (Status.FAILED, "0x31"), result.outcome


@pytest.mark.parametrize("reply", ["410D", "410D280D28", "410D280528FF"])
def test_a_malformed_obd_answer_is_an_invalid_response_not_an_agent_failure(agent, sim, caplog, reply):
    """The ECU echoes PID 0x0D but its answer cannot be split (truncated, a PID twice, bytes left over).
    That is the ECU's invalid answer, as for every UDS service; it used to leave the executor as an
    unexpected exception: an ERROR with a traceback (an agent bug, one per command), and a result message
    naming a Python class."""
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x01, "reply": reply})])
    result = agent.run("engine", "obd", {"pids": ["vehicle_speed", "coolant_temperature"]})
    assert result.status is Status.FAILED, result.outcome
    assert result.outcome.error.code is ErrorCode.INTERNAL
    assert result.outcome.error.message.startswith("invalid response from ECU: "), result.outcome
    assert not [r for r in caplog.records if r.name == "agent.uds.executor" and r.exc_info]
