"""The simulator answers OBD-II: moving PID values, bitmaps, 0x09 info, DTC lists, functional requests."""

import uuid

import can
import pytest
from conftest import DATA, ROOT

from agent.bus.owner import wait_until
from agent.config.model import BusConfig
from agent.config.reader import Node, Problems
from agent.devtools.sim.config import load_sim_config
from agent.devtools.sim.obd import parse_obd
from agent.devtools.sim.server import UdsServer
from agent.devtools.sim.simulator import Simulator
from agent.wire import obd


def demo_engine():
    config = load_sim_config(ROOT / "config/sim/demo-vehicle.yaml")
    return UdsServer(next(e for e in config.ecus if e.name == "engine"))


def ask(server, hex_request, now=0.0):
    return server.handle(bytes.fromhex(hex_request), now)


def test_moving_values_move_and_stay_in_range():
    server = demo_engine()
    speeds = {obd.decode_pid(0x0C, ask(server, "010C", now)[2:]) for now in (0.0, 2.5, 5.0, 7.5, 10.0, 12.5)}
    assert len(speeds) > 3 and min(speeds) >= 750 and max(speeds) <= 3200
    assert obd.decode_pid(0x0C, ask(server, "010C", 10.0)[2:]) == 3200  # the top of the 20 s triangle
    assert obd.decode_pid(0x46, ask(server, "0146", 3.0)[2:]) == 18  # a fixed value


def test_bitmaps_follow_the_configured_pids():
    server = demo_engine()
    supported = obd.supported_from_bitmap(0x00, ask(server, "0100")[2:])
    assert {0x01, 0x04, 0x05, 0x0C, 0x0D, 0x20} <= set(supported)
    walk = [*supported]
    for base in (0x20, 0x40, 0x60, 0x80, 0xA0):
        walk += obd.supported_from_bitmap(base, ask(server, f"01{base:02X}")[2:])
    assert 0xA6 in walk and 0x51 in walk and 0x42 in walk
    assert ask(server, "01C0") == bytes.fromhex("7F0131")  # nothing beyond 0xA6
    multi = obd.split_pid_response(ask(server, "010C0D05"), [0x0C, 0x0D, 0x05])
    assert set(multi) == {0x0C, 0x0D, 0x05}
    assert ask(server, "01" + "0C" * 7) == bytes.fromhex("7F0113")


def test_info_and_dtcs_from_the_uds_state():
    server = demo_engine()
    assert obd.decode_info("vin", ask(server, "0902")) == "WVWZZZ1JZXW000001"  # from DID 0xF190
    assert obd.decode_info("calibration_ids", ask(server, "0904")) == ["ENG-CAL-0042"]
    assert obd.decode_info("supported_info", ask(server, "0900")) == [0x02, 0x04, 0x06, 0x0A]
    assert ask(server, "0908") == bytes.fromhex("7F0931")
    stored = [obd.dtc_entry(d)["code"] for d in obd.decode_dtcs(0x03, ask(server, "03"))]
    assert stored == ["P0301", "P0420", "U0100"]  # the confirmed ones
    assert [obd.dtc_entry(d)["code"] for d in obd.decode_dtcs(0x07, ask(server, "07"))] == ["P0301"]
    assert ask(server, "14FFFFFF") == b"\x54"  # a UDS clear empties the OBD lists too
    assert obd.decode_dtcs(0x03, ask(server, "03")) == [] and ask(server, "0101")[2] == 0x00  # MIL off


def problems_of(data):
    problems = Problems()
    parse_obd(Node(data, "ecus[0].obd", problems))
    return dict(problems.items)


def test_obd_config_errors_have_paths():
    found = problems_of({"pids": [{"pid": "warp"}, {"pid": "engine_speed", "hex": "01"},
                                  {"pid": "fuel_type", "value": 1}, {"pid": 0x00, "hex": "00000000"},
                                  {"pid": "vehicle_speed"}],
                         "stored": ["P0301-1A"], "cvns": ["1234"], "vin": "X" * 18, "color": "red"})
    assert "no OBD-II PID named 'warp'" in found["ecus[0].obd.pids[0].pid"]
    assert "2 bytes" in found["ecus[0].obd.pids[1]"]
    assert "not a linear value" in found["ecus[0].obd.pids[2]"]
    assert "bitmaps" in found["ecus[0].obd.pids[3]"]
    assert "give value" in found["ecus[0].obd.pids[4]"]
    assert "failure type" in found["ecus[0].obd.stored[0]"]
    assert "4 bytes" in found["ecus[0].obd.cvns[0]"]
    assert "ecus[0].obd.vin" in found and found["ecus[0].obd.color"] == "unknown key"


@pytest.fixture
def tester():
    channel = f"test-{uuid.uuid4().hex[:10]}"
    simulator = Simulator(load_sim_config(DATA / "discover-sim.yaml"),
                          bus=BusConfig(interface="virtual", channel=channel))
    assert simulator.start()
    bus = can.Bus(interface="virtual", channel=channel)
    yield bus, simulator
    bus.shutdown()
    simulator.stop()


def collect(bus, until, timeout=5.0):
    frames = []

    def more():
        msg = bus.recv(0.05)
        if msg is not None:
            frames.append(msg)
        return until(frames)

    assert wait_until(more, timeout, step=0), frames
    return frames


def test_functional_requests_are_answered_by_every_obd_ecu_and_unsupported_pids_stay_silent(tester):
    bus, _ = tester
    bus.send(can.Message(arbitration_id=0x7DF, is_extended_id=False, data=bytes.fromhex("02019D5555555555")))
    bus.send(can.Message(arbitration_id=0x7DF, is_extended_id=False, data=bytes.fromhex("0201005555555555")))
    frames = collect(bus, lambda fs: {f.arbitration_id for f in fs} >= {0x7E8, 0x7E9})
    assert all(f.data[1:3] == b"\x41\x00" for f in frames)  # no answer (and no NRC) to the unsupported 0x9D
    bus.send(can.Message(arbitration_id=0x18DB33F1, is_extended_id=True, data=bytes.fromhex("0201005555555555")))
    frames = collect(bus, lambda fs: any(f.arbitration_id == 0x18DAF110 for f in fs))
    answer = next(f for f in frames if f.arbitration_id == 0x18DAF110)
    assert answer.is_extended_id and answer.data[:3] == bytes.fromhex("064100")


def test_ecus_at_unusual_ids_answer_physically(tester):
    bus, simulator = tester
    bus.send(can.Message(arbitration_id=0x7A3, is_extended_id=False, data=bytes.fromhex("023E00")))
    frames = collect(bus, lambda fs: any(f.arbitration_id == 0x7AB for f in fs))
    assert next(f for f in frames if f.arbitration_id == 0x7AB).data[:3] == bytes.fromhex("027E00")
    bus.send(can.Message(arbitration_id=0x18DA4BF1, is_extended_id=True, data=bytes.fromhex("023E00")))
    frames = collect(bus, lambda fs: any(f.arbitration_id == 0x18DAF14B for f in fs))
    assert simulator.ecu("seat").server.executed[0x3E] == 1
