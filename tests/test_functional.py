"""Functional requests: one request on the component's functional id, every ECU's answer within P2 (P2*
after 0x78), keyed by component name where the response id is configured, else by CAN id.

The simulated vehicle answers on 0x7DF with engine and camera (configured) and an ECU the agent does
not know at 0x7E1/0x7E9; on 0x18DB33F1 with gateway and an unknown ECU at 0x18DAF120. Multi-frame
answers are also checked against ECUs built directly on can-isotp in this file (CanIsotpEcu), so the
collector is not only checked against our own simulator. The one stand-in: a bound kernel ISO-TP
socket (no CAN in this kernel) is played by a can-isotp stack; tests/test_vcan.py runs the real one.
"""

from __future__ import annotations

import dataclasses
import json
import time
import types
import uuid

import can
import isotp
import pytest
from conftest import DATA
from mqtt_support import VALIDATORS

from agent.config.model import Addressing, IsoTpConfig
from agent.devtools.sim.config import SimDid, SimEcu, fault_from_dict, load_sim_config
from agent.devtools.sim.simulator import Simulator
from agent.system.local import LocalSession
from agent.wire.command import FUNCTIONAL, Status
from agent.wire.parse import InvalidCommandError, parse_command

VIN = "TEST0VEHICLE00001"
STRANGERS = (
    SimEcu(name="stranger", addressing=Addressing("normal_11bit", 0x7E1, 0x7E9, functional_id=0x7DF),
           isotp=IsoTpConfig(padding=0x55), dids=(SimDid(0xF190, b"STRANGER000000011"),)),
    SimEcu(name="stranger29", isotp=IsoTpConfig(),
           addressing=Addressing("normal_fixed_29bit", target_address=0x20, source_address=0xF1,
                                 functional_id=0x18DB33F1),
           dids=(SimDid(0xF190, b"STRANGER000000029"),)),
)


@pytest.fixture
def vehicle_sim(vehicle):
    config = load_sim_config(DATA / "vehicle-sim.yaml")
    simulator = Simulator(dataclasses.replace(config, ecus=config.ecus + STRANGERS), bus=vehicle.bus)
    assert simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture
def agent(vehicle, vehicle_sim):
    with LocalSession(vehicle) as session:
        yield session


def _run(agent, component, command, params=None):
    """Submits the command with "addressing": "functional" and waits for its result."""
    command_id, _ = agent.submit(component, command, params, addressing=FUNCTIONAL)
    return agent.wait(command_id, 10)


def test_read_vin_from_every_ecu(agent, vehicle_sim):
    result = _run(agent, "engine", "read_data", {"data": "vin"})
    assert result.status is Status.COMPLETED, result.outcome
    assert result.outcome.result == {"responses": {
        "engine": {"values": {"vin": VIN}},
        "camera": {"values": {"vin": VIN}},
        "0x7E9": {"values": {"vin": "STRANGER000000011"}},  # not configured: keyed by its CAN id
    }}
    assert vehicle_sim.ecu("body").received[0x22] == 0  # body has no functional id: it never heard it


def test_29bit_functional_request(agent):
    result = _run(agent, "gateway", "read_data", {"data": "vin"})
    assert result.outcome.result == {"responses": {
        "gateway": {"values": {"vin": VIN}}, "0x18DAF120": {"values": {"vin": "STRANGER000000029"}}}}


def test_tester_present_and_suppressed_tester_present(agent, vehicle_sim):
    result = _run(agent, "engine", "tester_present")
    assert result.outcome.result == {"responses": {"engine": {}, "camera": {}, "0x7E9": {}}}
    result = _run(agent, "engine", "raw", {"request": "3E80"})
    assert result.status is Status.COMPLETED and result.outcome.result == {"responses": {}}
    assert vehicle_sim.ecu("stranger").received[0x3E] == 2


def test_raw_read_with_answers_and_refusals(agent, vehicle_sim):
    vehicle_sim.ecu("camera").set_faults([fault_from_dict({"service": 0x22, "nrc": 0x22})])
    result = _run(agent, "engine", "raw", {"request": "22F40D"})
    # engine has the DID; the stranger does not and stays silent (no NRC 0x31 to a functional
    # request); camera refuses with a code ISO 14229 lets through
    assert result.outcome.result == {"responses": {
        "engine": {"response": "62f40df6"},
        "camera": {"error": {"code": "negative_response", "nrc": "0x22", "nrc_name": "ConditionsNotCorrect",
                             "message": "ECU refused service 0x22: NRC 0x22 ConditionsNotCorrect"}},
    }}


def test_response_pending_extends_that_ecus_wait_to_p2_star(agent, vehicle_sim):
    # 10 x 0x78 at 20 ms spacing: past P2 (150 ms), within P2* (1000 ms)
    vehicle_sim.ecu("stranger").set_faults([fault_from_dict({"service": 0x22, "pending": 10})])
    result = _run(agent, "engine", "read_data", {"data": "vin"})
    assert result.outcome.result["responses"]["0x7E9"] == {"values": {"vin": "STRANGER000000011"}}
    assert result.duration_ms >= 200


def test_nobody_answers_is_a_timeout(agent):
    result = _run(agent, "engine", "raw", {"request": "221234"})  # everyone silent (NRC 0x31 suppressed)
    assert result.status is Status.TIMEOUT and "no ECU answered functional request 0x22 within P2" in (
        result.outcome.error.message)


def test_physical_requests_still_work_after_functional_ones(agent):
    _run(agent, "engine", "read_data", {"data": "vin"})
    assert agent.run("engine", "read_data", {"data": "vin"}).outcome.result == {"values": {"vin": VIN}}
    assert agent.run("camera", "read_data", {"data": "vin"}).outcome.result == {"values": {"vin": VIN}}


@pytest.mark.parametrize(("component", "command", "params", "field", "message"), [
    ("engine", "write_data", {"data": "idle_mode", "value": "eco"}, "addressing",
     "functional addressing is for read_data, tester_present, obd and raw reads, not write_data"),
    ("body", "read_data", {"data": "vin"}, "addressing", "body has no addressing.functional_id"),
    ("engine", "raw", {"request": "1101"}, "params.request", "service 0x11 is not a read"),
    ("engine", "raw", {"request": "22F190F40CF40D0100"}, "params.request", "at most 7 bytes"),
    ("engine", "read_data", {"data": ["vin", "engine_speed", "oil_temp", "idle_mode"]}, "params.data",
     "at most 3 DIDs"),
])
def test_what_cannot_go_out_functionally(vehicle, component, command, params, field, message):
    body = {"id": "f", "component": component, "command": command, "params": params, "addressing": "functional"}
    with pytest.raises(InvalidCommandError) as info:
        parse_command(body, vehicle, 0)
    problems = dict(info.value.problems)
    assert message in problems[field]


def test_addressing_field_is_validated(vehicle):
    body = {"id": "f", "component": "engine", "command": "tester_present", "addressing": "broadcast"}
    with pytest.raises(InvalidCommandError) as info:
        parse_command(body, vehicle, 0)
    assert dict(info.value.problems) == {"addressing": "expected physical or functional, got string 'broadcast'"}
    body["addressing"] = "physical"
    assert parse_command(body, vehicle, 0).addressing == "physical"
    del body["addressing"]
    assert parse_command(body, vehicle, 0).addressing == "physical"


def test_functional_command_over_mqtt_matches_the_schemas(service, backend):
    """The Command with `addressing` and the Response with `responses` against docs/asyncapi.yaml
    (the backend fixture validates everything the agent published when the test ends)."""
    body = {"id": f"f-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data",
            "params": {"data": "vin"}, "addressing": "functional"}
    assert not list(VALIDATORS["Command"].iter_errors(body))
    backend.send(body)
    final = backend.final(body["id"])
    assert final["status"] == "completed", final
    assert final["result"]["responses"]["engine"] == {"values": {"vin": VIN}}
    assert final["result"]["responses"]["camera"] == {"values": {"vin": VIN}}
    assert not list(VALIDATORS["Response"].iter_errors(final))
    broken = json.loads(json.dumps(final))
    broken["result"]["responses"]["engine"] = {"values": {"vin": VIN}, "surprise": 1}
    assert list(VALIDATORS["Response"].iter_errors(broken))  # the schema does describe the result


class ScriptedFunctionalLink:
    """(delay_s, responder, hex) answers replayed on the wall clock after the request goes out."""

    def __init__(self, *script):
        self.script = sorted(script, key=lambda item: item[0])
        self.opened = self.closed = 0

    def open(self, timeout):
        self.opened += 1

    def close(self):
        self.closed += 1

    def send(self, payload, timeout):
        self.sent_at = time.monotonic()

    def lost(self):
        return {}

    def recv(self, timeout, limit):
        if not self.script or self.sent_at + self.script[0][0] > time.monotonic() + timeout:
            time.sleep(timeout)
            return None
        delay, key, data = self.script.pop(0)
        time.sleep(max(0.0, self.sent_at + delay - time.monotonic()))
        return key, bytes.fromhex(data)


def test_collect_keeps_first_final_answers_and_discards_garbage():
    from agent.uds.functional_exchange import collect_answers as collect
    from agent.uds.transaction import Timing

    link = ScriptedFunctionalLink(
        (0.0, "a", "62f190aa"), (0.01, "a", "62f190bb"),  # a second answer from a: its first one stands
        (0.02, "b", "62f18cff"),  # not an echo of the request: discarded
        (0.03, "b", "7f2278"), (0.2, "b", "62f190cc"),  # 0x78: b gets P2* for its final answer
        (0.04, "c", ""), (0.05, "c", "7f"),  # empty and truncated: not answers
        (0.06, "d", "7f2231"),
        (0.5, "e", "62f190dd"),  # after P2: too late
    )
    answers = collect(link, bytes.fromhex("22f190"), Timing(0.1, 1.0, 0), time.monotonic() + 5).answers
    assert answers == {"a": bytes.fromhex("62f190aa"), "b": bytes.fromhex("62f190cc"), "d": bytes.fromhex("7f2231")}
    assert link.opened == link.closed == 1


class BabblingFunctionalLink(ScriptedFunctionalLink):
    """A responder that never falls silent (a babbling ECU, or a bus busier than the agent can read):
    every `recv` has an answer ready at once, as the real link's has while its queue refills faster
    than the worker empties it (seen on the virtual bus: a 1 s command ran 4 s). Time is its own
    `clock`, moved 10 ms by each answer, so that collect() and this link agree on when the deadline
    passed (on the real clock a call could start just before it and be counted just after)."""

    def __init__(self):
        super().__init__()
        self.clock = 1000.0
        self.deadline = None
        self.calls_after_deadline = 0

    def recv(self, timeout, limit):
        if self.clock >= self.deadline:
            self.calls_after_deadline += 1
            assert self.calls_after_deadline < 1000, "still collecting long after the command's deadline"
        self.clock += 0.01
        return "a", bytes.fromhex("62f190aa")


def test_a_babbling_responder_cannot_hold_a_collection_past_the_deadline(monkeypatch):
    from agent.uds import functional_exchange
    from agent.uds.functional_exchange import collect_answers as collect
    from agent.uds.transaction import Timing

    link = BabblingFunctionalLink()
    monkeypatch.setattr(functional_exchange, "time",
                        types.SimpleNamespace(monotonic=lambda: link.clock, sleep=time.sleep))
    link.deadline = link.clock + 0.3
    collected = collect(link, bytes.fromhex("22f190"), Timing(0.1, 1.0, 0), link.deadline)
    assert collected.answers == {"a": bytes.fromhex("62f190aa")}
    assert link.calls_after_deadline == 0
    assert link.opened == link.closed == 1

def test_obd_functionally_each_answering_ecu_gets_its_own_result(agent):
    # engine answers OBD-II; camera and the stranger refuse with NRC 0x11, which stays silent functionally
    result = _run(agent, "engine", "obd", {"pids": ["vehicle_speed", "coolant_temperature"], "dtcs": "stored"})
    assert result.status is Status.COMPLETED, result.outcome
    responses = result.outcome.result["responses"]
    assert set(responses) == {"engine"}
    assert responses["engine"]["values"]["vehicle_speed"] == {"pid": "0x0D", "value": 50, "unit": "km/h"}
    assert [d["code"] for d in responses["engine"]["dtcs"]["stored"]] == ["P0301", "U0100"]
    response = {"id": "o", "status": "completed", "final": True, "seq": 2, "command": "obd",
                "result": json.loads(json.dumps(result.outcome.result))}
    assert not list(VALIDATORS["Response"].iter_errors(response))


def test_obd_supported_walk_is_physical_only(vehicle):
    body = {"id": "f", "component": "engine", "command": "obd", "params": {"supported": True},
            "addressing": "functional"}
    with pytest.raises(InvalidCommandError) as info:
        parse_command(body, vehicle, 0)
    assert "physical only" in dict(info.value.problems)["params.supported"]


# ---- multi-frame answers to functional requests ------------------------------------------------

CAL_IDS = ["ISOTP-ECU-CAL-01", "ISOTP-ECU-CAL-2"]


def _calibration_answer(ids):
    return bytes([0x49, 0x04, len(ids)]) + b"".join(i.encode().ljust(16, b"\0") for i in ids)


class CanIsotpEcu:
    """An ECU built directly on can-isotp (its NotifierBasedCanStack), not on our simulator, on the test's
    virtual channel: it hears single frames on the functional id and answers physically on its response
    id from `answers` (request -> response bytes), segmenting and waiting for flow control the way
    can-isotp does. `stmin_s` makes it send consecutive frames that far apart whatever our FC says."""

    def __init__(self, channel, request_id, response_id, answers, stmin_s=None, functional_ids=((0x7DF, False),)):
        self.answers = answers  # request -> whole answer (can-isotp segments it), or -> callable(bus)
        self.functional_ids = functional_ids
        self.heard = []
        self.seen = []  # every frame this ECU's bus received
        self.bus = can.Bus(interface="virtual", channel=channel)
        self.notifier = can.Notifier(self.bus, [], timeout=0.1)
        params = {"tx_padding": 0x55, "blocking_send": False}
        if stmin_s is not None:
            params["override_receiver_stmin"] = stmin_s
        self.stack = isotp.NotifierBasedCanStack(
            self.bus, self.notifier, params=params,
            address=isotp.Address(isotp.AddressingMode.Normal_11bits, txid=response_id, rxid=request_id))
        self.notifier.add_listener(self._on_frame)
        self.stack.start()

    def _on_frame(self, msg):
        self.seen.append(msg)
        if (msg.arbitration_id, msg.is_extended_id) not in self.functional_ids or msg.data[0] >> 4 != 0:
            return
        request = bytes(msg.data[1:1 + (msg.data[0] & 0x0F)])
        self.heard.append(request)
        answer = self.answers.get(request)
        if callable(answer):
            answer(self.bus)  # frames written by hand, e.g. a first frame and nothing after it
        elif answer is not None:
            self.stack.send(answer)

    def close(self):
        self.stack.stop()
        self.notifier.stop()
        self.bus.shutdown()


@pytest.fixture
def isotp_ecus(vehicle):
    ecus = []

    def make(*args, **kwargs):
        ecus.append(CanIsotpEcu(vehicle.bus.channel, *args, **kwargs))
        return ecus[-1]

    yield make
    for ecu in ecus:
        ecu.close()


def test_obd_pids_then_multi_frame_calibration_ids(agent):
    """The reported defect: the command's second request (0x09 0x04) gets a multi-frame answer."""
    for _ in range(3):  # and again: each functional command starts from a clean collector
        result = _run(agent, "engine", "obd", {"pids": ["vehicle_speed"], "info": ["calibration_ids"]})
        assert result.status is Status.COMPLETED, result.outcome
        assert result.outcome.result == {"responses": {"engine": {
            "values": {"vehicle_speed": {"pid": "0x0D", "value": 50, "unit": "km/h"}},
            "info": {"calibration_ids": ["TEST-CAL-1", "TEST-CAL-2"]}}}}
    assert agent.runtime.owner.taps == ()  # every collection let go of the bus when it ended


def test_multi_frame_functional_reads_one_after_another(agent):
    for _ in range(3):
        result = _run(agent, "engine", "read_data", {"data": "vin"})
        assert result.outcome.result["responses"]["engine"] == {"values": {"vin": VIN}}, result.outcome
        assert result.outcome.result["responses"]["0x7E9"] == {"values": {"vin": "STRANGER000000011"}}


def test_multi_frame_answer_from_an_ecu_built_on_can_isotp(agent, isotp_ecus):
    ecu = isotp_ecus(0x7E2, 0x7EA, {bytes.fromhex("010d"): bytes.fromhex("410d28"),
                                     bytes.fromhex("0904"): _calibration_answer(CAL_IDS)})
    for _ in range(2):
        result = _run(agent, "engine", "obd", {"pids": ["vehicle_speed"], "info": ["calibration_ids"]})
        assert result.status is Status.COMPLETED, result.outcome
        assert result.outcome.result["responses"]["0x7EA"] == {
            "values": {"vehicle_speed": {"pid": "0x0D", "value": 40, "unit": "km/h"}},
            "info": {"calibration_ids": CAL_IDS}}
        assert result.outcome.result["responses"]["engine"]["info"] == {"calibration_ids": ["TEST-CAL-1", "TEST-CAL-2"]}
    assert ecu.heard == [bytes.fromhex("010d"), bytes.fromhex("0904")] * 2


def test_answers_under_way_when_p2_ends_are_received_to_their_end(vehicle, isotp_ecus):
    """Two ECUs start their 100-byte answers at once (within P2, 150 ms) and send a consecutive frame
    every 30 ms: both end well after P2, and both count."""
    slow = bytes.fromhex("62f190") + bytes(range(97))  # a first frame and 14 consecutive frames
    for request_id in (0x7E2, 0x7E3):
        isotp_ecus(request_id, request_id + 8, {bytes.fromhex("22f190"): slow}, stmin_s=0.03)
    with LocalSession(vehicle) as agent:  # no simulator: only the two can-isotp ECUs answer
        result = _run(agent, "engine", "raw", {"request": "22F190"})
    assert result.status is Status.COMPLETED, result.outcome
    assert result.outcome.result == {"responses": {"0x7EA": {"response": slow.hex()},
                                                   "0x7EB": {"response": slow.hex()}}}
    assert result.duration_ms >= 14 * 30


def test_a_tapped_bound_method_is_untapped_and_never_tapped_twice():
    from agent.bus.owner import BusOwner
    from agent.config.model import BusConfig

    owner = BusOwner(BusConfig(interface="virtual", channel="never-opened"))
    frames = []
    owner.tap(frames.append)
    owner.tap(frames.append)  # `frames.append` is a new object each time, equal to the last one
    assert len(owner.taps) == 1
    owner.untap(frames.append)
    assert owner.taps == ()


@pytest.mark.parametrize("kernel_bound", [False, True])
def test_flow_control_comes_from_one_stack_only(vehicle, isotp_ecus, kernel_bound):
    """With kernel ISO-TP, a bound CAN_ISOTP socket of a configured ECU answers that ECU's first frames
    with flow control itself, and the functional collector only listens (can-isotp's listen_mode); an
    unbound one leaves the flow control to the collector. Either way the ECU gets exactly one FC.
    This kernel has no CAN: the bound kernel socket is played by a can-isotp stack with the tester's
    address on the virtual bus (the one stand-in here; tests/test_vcan.py runs the real thing)."""
    from agent.bus.functional import FunctionalLink, known_responders
    from agent.bus.owner import BusOwner
    from agent.uds.functional_exchange import collect_answers as collect
    from agent.uds.transaction import Timing

    engine = next(e for e in vehicle.ecus if e.name == "engine")
    answer = bytes.fromhex("62f190") + VIN.encode()
    ecu = isotp_ecus(0x7E0, 0x7E8, {bytes.fromhex("22f190"): answer})
    owner = BusOwner(vehicle.bus)
    assert owner.start(5)
    kernel = None
    if kernel_bound:
        kernel_bus = can.Bus(interface="virtual", channel=vehicle.bus.channel)
        kernel_notifier = can.Notifier(kernel_bus, [], timeout=0.1)
        kernel = isotp.NotifierBasedCanStack(kernel_bus, kernel_notifier, params={"tx_padding": 0xCC},
                                             address=isotp.Address(isotp.AddressingMode.Normal_11bits,
                                                                   txid=0x7E0, rxid=0x7E8))
        kernel.start()
    try:
        link = FunctionalLink(owner, engine, known_responders([engine], lambda name: kernel_bound))
        for _ in range(2):
            assert collect(link, bytes.fromhex("22f190"), Timing(0.15, 1.0, 0), time.monotonic() + 5).answers == {
                "engine": answer}
    finally:
        owner.stop()
        if kernel is not None:
            kernel.stop()
            kernel_notifier.stop()
            kernel_bus.shutdown()
    flow_controls = [m for m in ecu.seen if m.arbitration_id == 0x7E0 and m.data[0] >> 4 == 3]
    assert len(flow_controls) == 2  # one per answer


def test_an_answer_that_breaks_off_is_that_ecus_error_and_the_others_stand(agent, isotp_ecus):
    """An ECU sends the first frame of its VIN and then nothing: N_Cr (1 s) gives up on it. Its entry
    is a timeout error; the simulated ECUs' answers are the result as usual (completed)."""
    def first_frame_only(bus):
        bus.send(can.Message(arbitration_id=0x7EB, data=bytes.fromhex("1014") + b"b\xf1\x90ABC", is_extended_id=False))

    isotp_ecus(0x7E3, 0x7EB, {bytes.fromhex("22f190"): first_frame_only})
    result = _run(agent, "engine", "read_data", {"data": "vin"})
    assert result.status is Status.COMPLETED, result.outcome
    responses = result.outcome.result["responses"]
    assert responses["engine"] == {"values": {"vin": VIN}} and responses["0x7E9"] == {
        "values": {"vin": "STRANGER000000011"}}
    assert responses["0x7EB"]["error"]["code"] == "timeout"
    assert "broke off under way: ConsecutiveFrameTimeoutError" in responses["0x7EB"]["error"]["message"]
    assert set(responses["0x7EB"]) == {"error"}


def test_an_answer_still_under_way_at_the_deadline_costs_only_that_ecu(agent, isotp_ecus):
    """A 100-byte answer at one consecutive frame per 100 ms needs 1.4 s; the command has 1 s. That
    ECU's entry is a timeout error, every other ECU's answer stands."""
    slow = bytes.fromhex("62f190") + bytes(range(97))
    isotp_ecus(0x7E3, 0x7EB, {bytes.fromhex("22f190"): slow}, stmin_s=0.1)
    command_id, _ = agent.submit("engine", "raw", {"request": "22F190"}, addressing=FUNCTIONAL, timeout_ms=1000)
    result = agent.wait(command_id, 10)
    assert result.status is Status.COMPLETED, result.outcome
    responses = result.outcome.result["responses"]
    assert responses["engine"] == {"response": (b"b\xf1\x90" + VIN.encode()).hex()}
    assert responses["0x7EB"]["error"] == {
        "code": "timeout", "message": "answer to 0x22 broke off under way: answer not complete by the command deadline"}


def test_garbage_frames_from_one_responder_cost_nobody_anything(agent, isotp_ecus):
    """Empty and malformed frames, a stray flow control and consecutive frame, a first frame too short
    to be one: all discarded by that responder's state machine; its later single frame is its answer."""
    garbage = ["", "ff", "1000", "300000", "21414243", "1005620000", "3f", "0362f190"]

    def junk_then_answer(bus):
        for data in garbage:
            bus.send(can.Message(arbitration_id=0x7EB, data=bytes.fromhex(data), is_extended_id=False))

    isotp_ecus(0x7E3, 0x7EB, {bytes.fromhex("22f190"): junk_then_answer})
    result = _run(agent, "engine", "raw", {"request": "22F190"})
    assert result.status is Status.COMPLETED, result.outcome
    responses = result.outcome.result["responses"]
    assert responses["0x7EB"] == {"response": "62f190"}
    assert responses["engine"] == {"response": (b"b\xf1\x90" + VIN.encode()).hex()}


def test_one_functional_collection_at_a_time(vehicle):
    """Two at once would both send flow control to every multi-frame answer: a second collection
    waits for the first to end, within its own deadline."""
    from agent.bus.functional import FunctionalLink, known_responders
    from agent.bus.owner import BusOwner
    from agent.errors import TransportTimeoutError

    ecus = {e.name: e for e in vehicle.ecus}
    owner = BusOwner(vehicle.bus)  # not started: the lock needs no bus
    known = known_responders(list(vehicle.ecus), lambda name: False)
    engine, gateway = FunctionalLink(owner, ecus["engine"], known), FunctionalLink(owner, ecus["gateway"], known)
    engine.open(1)
    started = time.monotonic()
    with pytest.raises(TransportTimeoutError, match="another functional request was still collecting"):
        gateway.open(0.1)
    assert time.monotonic() - started >= 0.1
    gateway.close()  # a close after a failed open lets go of nothing it does not hold
    assert owner.collecting.locked()
    engine.close()
    gateway.open(0.1)
    gateway.close()
    assert not owner.collecting.locked() and owner.taps == ()


def test_concurrent_functional_commands_flow_control_each_answer_once(vehicle, isotp_ecus):
    """Functional commands on engine (0x7DF) and gateway (0x18DB33F1) at once. Each collector hears
    every configured ECU's response id, so an ECU that answers both (here one on engine's ids, built on
    can-isotp, taking 0.3 s per answer) would get two flow controls per answer from two collections at
    once; one after the other it gets exactly one per answer."""
    ecu = isotp_ecus(0x7E0, 0x7E8, {bytes.fromhex("22f190"): b"b\xf1\x90" + VIN.encode()}, stmin_s=0.15,
                     functional_ids=((0x7DF, False), (0x18DB33F1, True)))
    with LocalSession(vehicle) as agent:
        ids = [agent.submit(name, "read_data", {"data": "vin"}, addressing=FUNCTIONAL)[0]
               for name in ("engine", "gateway")]
        results = [agent.wait(command_id, 10) for command_id in ids]
    for result in results:
        assert result.status is Status.COMPLETED, result.outcome
        assert result.outcome.result == {"responses": {"engine": {"values": {"vin": VIN}}}}
    assert len(ecu.heard) == 2
    flow_controls = [m for m in ecu.seen if m.arbitration_id == 0x7E0 and m.data[0] >> 4 == 3]
    assert len(flow_controls) == 2


# ---- a hostile responder: what it says is its own entry, never more, never less ----------------------

def _single_frame(can_id, hex_payload):
    """A handler for CanIsotpEcu that answers with one hand-written single frame."""
    def send(bus):
        payload = bytes.fromhex(hex_payload)
        bus.send(can.Message(arbitration_id=can_id, data=bytes([len(payload)]) + payload, is_extended_id=False))
    return send


def test_a_truncated_refusal_is_that_ecus_invalid_answer_not_an_nrc_it_never_sent(agent, isotp_ecus):
    """0x7EB answers `7F 22` (no NRC byte). Physically that is an invalid response; functionally its entry
    used to read NRC 0x10 GeneralReject, a refusal this ECU never sent. Every other ECU's answer stands."""
    isotp_ecus(0x7E3, 0x7EB, {bytes.fromhex("22f190"): _single_frame(0x7EB, "7f22")})
    for command, params in (("raw", {"request": "22F190"}), ("read_data", {"data": "vin"})):
        result = _run(agent, "engine", command, params)
        assert result.status is Status.COMPLETED, result.outcome
        responses = result.outcome.result["responses"]
        assert responses["0x7EB"] == {"error": {
            "code": "internal", "message": "invalid response from ECU: truncated negative response 7f22"}}
        assert "engine" in responses and "0x7E9" in responses and "error" not in responses["engine"]


def test_response_pending_then_silence_is_that_ecus_timeout_not_a_missing_entry(agent, isotp_ecus):
    """0x7EB answers NRC 0x78 (response pending) and then nothing. It did answer: leaving it out of the
    result would read as "this ECU did not hear the request"; its entry is a timeout error instead."""
    isotp_ecus(0x7E3, 0x7EB, {bytes.fromhex("22f190"): _single_frame(0x7EB, "7f2278")})
    result = _run(agent, "engine", "raw", {"request": "22F190"})
    assert result.status is Status.COMPLETED, result.outcome
    responses = result.outcome.result["responses"]
    assert responses["0x7EB"]["error"]["code"] == "timeout"
    assert "NRC 0x78" in responses["0x7EB"]["error"]["message"]
    assert responses["engine"] == {"response": (b"b\xf1\x90" + VIN.encode()).hex()}


def test_only_a_pending_answer_is_a_completed_result_with_that_ecus_timeout(vehicle, isotp_ecus):
    """The only responder says 0x78 and then nothing: not "no ECU answered", but its own timeout entry."""
    isotp_ecus(0x7E3, 0x7EB, {bytes.fromhex("22f190"): _single_frame(0x7EB, "7f2278")})
    with LocalSession(vehicle) as agent:
        command_id, _ = agent.submit("engine", "read_data", {"data": "vin"}, addressing=FUNCTIONAL, timeout_ms=2000)
        result = agent.wait(command_id, 10)
    assert result.status is Status.COMPLETED, result.outcome
    assert list(result.outcome.result["responses"]) == ["0x7EB"]
    assert result.outcome.result["responses"]["0x7EB"]["error"]["code"] == "timeout"


def test_each_answer_is_decoded_once_physically_and_functionally(agent, monkeypatch):
    """A DID's codec may be costly (scaled, enumerated, a script's): the check that accepts a read's
    answer decodes it, and that decoding is the result, not a second one."""
    from agent.wire import codecs

    decoded: list[int] = []
    real = codecs.UdsoncanCodec.decode

    def counting(self, string_bin):
        decoded.append(self.spec.id)
        return real(self, string_bin)

    monkeypatch.setattr(codecs.UdsoncanCodec, "decode", counting)
    assert agent.run("engine", "read_data", {"data": "vin"}).outcome.result == {"values": {"vin": VIN}}
    assert decoded == [0xF190]
    decoded.clear()
    result = _run(agent, "engine", "read_data", {"data": "vin"})
    assert set(result.outcome.result["responses"]) == {"engine", "camera", "0x7E9"}
    assert decoded == [0xF190] * 3  # three answers, one decoding each
