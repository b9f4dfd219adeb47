"""`sovd-edge discover` against simulated vehicles on python-can's virtual bus: the config it prints
validates, and the agent then reads every found ECU's VIN with it. Discovery runs in-process (the
virtual bus does not cross processes); the simulator and the bus are the real ones."""

import dataclasses
import json
import uuid

import can
import pytest
import yaml
from conftest import DATA, ROOT

from agent.cli import main
from agent.cli.discover import progress_line
from agent.config.model import BusConfig
from agent.config.parse import parse_config
from agent.devtools.sim.config import load_sim_config
from agent.devtools.sim.simulator import Simulator
from agent.discover import probe
from agent.discover.frames import padding_of, read_single_frame, single_frame
from agent.discover.run import Options, discover
from agent.discover.tap import ALLOWED_SERVICES, BusTap, ForbiddenRequestError, check_outgoing
from agent.system.local import LocalSession
from agent.wire.command import Status

FAST = ["--listen", "0.3", "--rate", "2000", "--scan-wait-ms", "10", "--p2-ms", "1000", "--obd-wait-ms", "500"]


@pytest.fixture
def channel():
    return f"disc-{uuid.uuid4().hex[:10]}"


def simulate(path, channel):
    simulator = Simulator(load_sim_config(path), bus=BusConfig(interface="virtual", channel=channel, fd=True))
    assert simulator.start()
    return simulator


class Observer:
    """A second bus connection that records every frame anyone sends (to check what discovery sent)."""

    def __init__(self, channel):
        self.bus = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
        self.frames = []
        self.notifier = can.Notifier(self.bus, [self.frames.append], timeout=0.05)

    def close(self):
        self.notifier.stop()
        self.bus.shutdown()

    def requests(self):
        """The service ids of every request frame on the bus (single or first frames below 0x40)."""
        services = set()
        for msg in self.frames:
            data = bytes(msg.data)
            if data and data[0] >> 4 == 0:
                sid = data[1] if data[0] else data[2]
            elif data and data[0] >> 4 == 1:
                sid = data[2] if (data[0] & 0x0F or data[1]) else data[6]
            else:
                continue
            if sid < 0x40:
                services.add(sid)
        return services


def discovered(capsys, *args):
    code = main(["discover", *args])
    out = capsys.readouterr().out
    return code, out


def read_every_vin(config_text, channel):
    config = parse_config(yaml.safe_load(config_text))
    assert config.bus.channel == channel
    vins = {}
    with LocalSession(config) as session:
        for ecu in config.ecus:
            result = session.run(ecu.name, "read_data", {"data": "vin"})
            assert result.status is Status.COMPLETED, (ecu.name, result.outcome)
            vins[ecu.name] = result.outcome.result["values"]["vin"]
    return config, vins


def test_discover_finds_ecus_at_unusual_ids_and_the_agent_reads_each_vin(capsys, channel):
    simulator = simulate(DATA / "discover-sim.yaml", channel)
    observer = Observer(channel)
    try:
        code, out = discovered(capsys, "--interface", "virtual", "--channel", channel, "--fd", "--scan", *FAST)
        assert code == 0, out
        config, vins = read_every_vin(out, channel)
    finally:
        observer.close()
        simulator.stop()
    ecus = {e.name: e for e in config.ecus}
    assert set(ecus) == {"engine", "ecu_7e1", "hybrid_ctrl", "body_ctrl", "ecu_710", "ecu_18da4bf1"}
    assert set(vins.values()) == {"DISC0VEHICLE00001"} and config.vehicle == "DISC0VEHICLE00001"
    assert (ecus["body_ctrl"].addressing.request_id, ecus["body_ctrl"].addressing.response_id) == (0x7A3, 0x7AB)
    assert (ecus["ecu_710"].addressing.request_id, ecus["ecu_710"].addressing.response_id) == (0x710, 0x77A)
    assert ecus["ecu_18da4bf1"].addressing.mode == "normal_fixed_29bit"
    assert ecus["ecu_18da4bf1"].addressing.target_address == 0x4B
    assert ecus["hybrid_ctrl"].addressing.functional_id == 0x18DB33F1
    assert ecus["engine"].addressing.functional_id == 0x7DF and ecus["engine"].isotp.padding == 0xCC
    assert ecus["engine"].did_by_name("serial_number").length == 6
    assert "found by OBD-II functional request on 0x7DF, TesterPresent scan (11-bit)" in out
    assert "0xF197 (NRC 0x22 ConditionsNotCorrect)" in out  # the seat's refusal is noted, not fatal
    assert observer.requests() <= ALLOWED_SERVICES and {0x01, 0x09, 0x22, 0x3E} == observer.requests()
    answer_ids = {0x7E8, 0x7E9, 0x7AB, 0x77A}
    assert not any(m.arbitration_id in answer_ids and bytes(m.data)[:3] == bytes.fromhex("023E00")
                   for m in observer.frames)  # never a probe on an id an ECU answers on


def test_discover_on_the_demo_vehicle_and_check_config_accepts_it(capsys, channel, tmp_path):
    demo = parse_config(yaml.safe_load((ROOT / "config/demo.yaml").read_text()), source=ROOT / "config/demo.yaml")
    simulator = simulate(ROOT / "config/sim/demo-vehicle.yaml", channel)
    try:
        code, out = discovered(capsys, "--interface", "virtual", "--channel", channel, "--fd", "--scan",
                               "--scan-11bit", "0x700-0x7F7", *FAST)
        assert code == 0, out
        config, vins = read_every_vin(out, channel)
    finally:
        simulator.stop()
    assert len(config.ecus) == len(demo.ecus) == 3
    assert set(vins.values()) == {demo.vehicle}
    adas = next(e for e in config.ecus if e.addressing.request_id == 0x740)
    assert adas.isotp.fd  # it answered in CAN FD frames (too short to show its padding)
    (tmp_path / "found.yaml").write_text(out)
    assert main(["check-config", "-c", str(tmp_path / "found.yaml")]) == 0


def test_without_scan_only_obd_ecus_are_found_and_json_carries_everything(capsys, channel):
    simulator = simulate(DATA / "discover-sim.yaml", channel)
    try:
        code, out = discovered(capsys, "--interface", "virtual", "--channel", channel, "--json", *FAST)
    finally:
        simulator.stop()
    assert code == 0
    report = json.loads(out)
    assert {e["name"] for e in report["ecus"]} == {"engine", "ecu_7e1", "hybrid_ctrl"}
    engine = next(e for e in report["ecus"] if e["name"] == "engine")
    assert engine["obd"]["vin"] == "DISC0VEHICLE00001" and engine["obd"]["pids"] == ["monitor_status", "engine_speed"]
    assert engine["identification"]["serial_number"] == "E-0042"
    assert "0xF187" in engine["refused"]
    parse_config(report["config"])


def test_listening_reports_traffic_and_the_scan_never_sends_on_a_talking_id(channel):
    simulator = simulate(DATA / "discover-sim.yaml", channel)
    chatter = can.Bus(interface="virtual", channel=channel)
    task = chatter.send_periodic(can.Message(arbitration_id=0x7B0, data=b"\x01\x02", is_extended_id=False), 0.01)
    try:
        with BusTap(BusConfig(interface="virtual", channel=channel, fd=True)) as tap:
            report = discover(tap, Options(listen_s=0.5, scan=True, scan_11bit=tuple(range(0x7A0, 0x7C0)),
                                           scan_29bit=(0x4B,), rate=2000, scan_wait_s=0.01, p2_s=1.0))
            sent_ids = {m.arbitration_id for m in tap.sent}
    finally:
        task.stop()
        chatter.shutdown()
        simulator.stop()
    assert report.traffic.alive and report.traffic.errors_rising is None  # virtual: no controller counters
    ((can_id, extended, frames, rate),) = report.traffic.ids
    assert (can_id, extended) == (0x7B0, False) and frames > 5 and rate > 10
    assert 0x7B0 not in sent_ids and 0x7A3 in sent_ids
    assert {e.name for e in report.ecus} >= {"body_ctrl", "ecu_18da4bf1"}


def test_nothing_found_exits_1_with_an_empty_config(capsys, channel):
    code, out = discovered(capsys, "--interface", "virtual", "--channel", channel, "--listen", "0.1",
                           "--obd-wait-ms", "50")
    assert code == 1 and "ecus: []" in out and "No ECU answered" in out


def test_cli_errors(capsys, tmp_path):
    assert main(["discover"]) == 2
    assert "give -c CONFIG or --interface and --channel" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("vehicle: [\n")
    assert main(["discover", "-c", str(bad)]) == 78
    assert main(["discover", "--interface", "nonexistent_iface", "--channel", "x", "--listen", "0"]) == 69
    for bad in (["--scan-11bit", "0x800-0x7FF"], ["--scan-11bit", "zz"], ["--padding", "0x100"], ["--padding", "x"]):
        with pytest.raises(SystemExit):
            main(["discover", "--interface", "virtual", "--channel", "x", *bad])


def test_only_allowed_services_leave_the_tap():
    for allowed in ("0201000000000000", "0322F190", "023E00", "0209020000", "300000", "000322F190"):
        check_outgoing(bytes.fromhex(allowed))
    for forbidden in ("021003", "0411010000", "04143FFFFF", "062EF19001", "1014220000", "2100", "", "0231010203",
                      "000210030000"):
        with pytest.raises(ForbiddenRequestError):
            check_outgoing(bytes.fromhex(forbidden))
    check_outgoing(bytes.fromhex("40023E00"), prefix_size=1)  # extended addressing: the address byte first
    with pytest.raises(ForbiddenRequestError):
        check_outgoing(bytes.fromhex("40021003"), prefix_size=1)


def test_single_frames():
    assert single_frame(b"\x3e\x00") == bytes.fromhex("023E00CCCCCCCCCC")
    assert single_frame(b"\x3e\x00", b"\x40", None) == bytes.fromhex("40023E00")
    assert read_single_frame(bytes.fromhex("027E00AAAAAAAAAA")) == b"\x7e\x00"
    fd_frame = bytes.fromhex("0014" + "62F190" + "41" * 17 + "AA" * 42)  # CAN FD: length in the second byte
    assert read_single_frame(fd_frame) == bytes.fromhex("62F190") + b"A" * 17
    assert read_single_frame(bytes.fromhex("1014620000000000")) is None  # a first frame
    assert read_single_frame(bytes.fromhex("0562")) is None  # shorter than it says
    assert padding_of(bytes.fromhex("027E00AAAAAAAAAA")) == 0xAA and padding_of(bytes.fromhex("027E00")) is None
    with pytest.raises(ValueError):
        single_frame(b"\x22" * 8)


def test_tester_present_in_every_addressing_mode_of_the_test_vehicle(vehicle, sim):
    with BusTap(vehicle.bus) as tap:
        answers = {ecu.name: probe.tester_present(tap, ecu.addressing, ecu.isotp.padding, 2.0) for ecu in vehicle.ecus}
        unknown = dataclasses.replace(vehicle.ecu("engine").addressing, request_id=0x7C0, response_id=0x7C8)
        assert probe.tester_present(tap, unknown, None, 0.05) is None
    assert answers == dict.fromkeys(["engine", "body", "gateway", "camera"], b"\x7e\x00")


def test_progress_line():
    assert progress_line(0, 10, 0, width=10) == "\rscan [..........] 0/10, 0 answered"
    assert progress_line(5, 10, 2, width=10) == "\rscan [#####.....] 5/10, 2 answered"


def test_a_terminal_sees_the_scan_progress_and_a_pipe_does_not(channel):
    """The real CLI in a subprocess with stderr on a pseudo-terminal (its virtual bus is empty: the progress
    of a scan that finds nothing)."""
    import os
    import pty
    import subprocess
    import sys

    args = [sys.executable, "-m", "agent", "discover", "--interface", "virtual", "--channel", channel, "--scan",
            "--scan-11bit", "0x700-0x70F", "--scan-29bit", "0x00-0x0F", "--rate", "1000", "--scan-wait-ms", "1",
            "--listen", "0", "--obd-wait-ms", "10"]
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=follower, cwd=ROOT, timeout=60)
        os.set_blocking(leader, False)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
        os.close(follower)
    assert proc.returncode == 1 and b"ecus: []" in proc.stdout
    assert shown.count(b"16/16, 0 answered") == 2  # 16 11-bit ids, then 16 29-bit addresses
    piped = subprocess.run(args, capture_output=True, cwd=ROOT, timeout=60)
    assert b"scan [" not in piped.stderr
