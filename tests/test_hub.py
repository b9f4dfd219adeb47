"""The socketcand hub: python-can's client protocol details, and agent and simulator as two processes."""

import json
import signal
import socket
import subprocess
import sys
import time
import uuid

import can
import pytest
import yaml
from conftest import ROOT

from agent.devtools.hub import Hub, frame_text, parse_send
from agent.devtools.local_broker import free_port


def test_frame_formats():
    assert frame_text(can.Message(arbitration_id=0x7E8, data=b"\x10\x14", is_extended_id=False,
                                  timestamp=1.5)) == "< frame 7E8 1.500000 1014 >"
    assert frame_text(can.Message(arbitration_id=0x18DAF128, data=b"", is_extended_id=True,
                                  timestamp=2.0)) == "< frame 18DAF128 2.000000  >"
    msg = parse_send("< send 7E0 3 2 10 3 >")
    assert (msg.arbitration_id, bytes(msg.data), msg.is_extended_id) == (0x7E0, b"\x02\x10\x03", False)
    assert parse_send("< send 18DA28F1 1 3e >").is_extended_id
    assert parse_send("< send 7E0 4 1 2 >") is None  # length and data disagree
    assert parse_send("< send 7E0 9 0 0 0 0 0 0 0 0 0 >") is None  # no FD here


@pytest.fixture
def hub(channel):
    running = Hub(lambda: can.Bus(interface="virtual", channel=channel), "127.0.0.1", 0)
    running.start()
    yield running
    running.stop()


def read_until(conn, text, timeout=5):
    conn.settimeout(timeout)
    data = b""
    while text.encode() not in data:
        data += conn.recv(4096)
    return data.decode()


def test_handshake_separate_writes_and_no_frame_before_it_ends(hub, channel):
    bus = can.Bus(interface="virtual", channel=channel)
    try:
        with socket.create_connection(("127.0.0.1", hub.port)) as conn:
            conn.settimeout(5)
            assert conn.recv(256) == b"< hi >"  # alone, as python-can's client reads it
            bus.send(can.Message(arbitration_id=0x111, data=b"\x01", is_extended_id=False))
            conn.sendall(b"< open vcan0 >")
            assert conn.recv(256) == b"< ok >"  # the frame above was not relayed mid-handshake
            conn.sendall(b"< rawmode >")
            assert conn.recv(256) == b"< ok >"
            time.sleep(0.3)
            bus.send(can.Message(arbitration_id=0x7E8, data=b"\x02\x50\x03", is_extended_id=False))
            assert "< frame 7E8 " in read_until(conn, "7E8")
            conn.sendall(b"< send 7E0 2 3e 0 >")
            received = bus.recv(5)
            assert (received.arbitration_id, bytes(received.data)) == (0x7E0, b"\x3e\x00")
    finally:
        bus.shutdown()


def test_python_can_client_talks_through_the_hub(hub, channel):
    bus = can.Bus(interface="virtual", channel=channel)
    client = can.Bus(interface="socketcand", channel="sim", host="127.0.0.1", port=hub.port)
    try:
        time.sleep(0.3)
        client.send(can.Message(arbitration_id=0x18DA28F1, data=b"\x02\x10\x03", is_extended_id=True))
        received = bus.recv(5)
        assert received.is_extended_id and received.arbitration_id == 0x18DA28F1
        bus.send(can.Message(arbitration_id=0x18DAF128, data=b"\x06\x50\x03", is_extended_id=True))
        echoed = client.recv(5)
        assert echoed.arbitration_id == 0x18DAF128 and bytes(echoed.data) == b"\x06\x50\x03"
    finally:
        client.shutdown()
        bus.shutdown()


@pytest.fixture
def simulator_with_hub(tmp_path):
    port = free_port()
    log = tmp_path / "sim.log"
    sim_config = str(ROOT / "config/sim/demo-vehicle.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "-c", sim_config,
                             "--hub", f"127.0.0.1:{port}", "--log-format", "json"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 20
    while '"simulating"' not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    config = yaml.safe_load((ROOT / "config/hub.yaml").read_text())
    config["bus"]["options"]["port"] = port
    config["vehicle"] = f"VH{uuid.uuid4().hex[:10].upper()}"
    config["state_dir"] = str(tmp_path / "state")
    config["metrics"] = {"listen": "127.0.0.1:0"}
    (tmp_path / "hub.yaml").write_text(yaml.safe_dump(config))
    yield tmp_path / "hub.yaml", config["vehicle"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def test_uds_in_another_process_through_the_hub(simulator_with_hub):
    config, _ = simulator_with_hub
    result = subprocess.run([sys.executable, "-m", "agent", "uds", "-c", str(config), "engine", "read_data",
                             "data=vin"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["result"] == {"values": {"vin": "WVWZZZ1JZXW000001"}}
    faults = subprocess.run([sys.executable, "-m", "agent", "uds", "-c", str(config), "abs", "read_faults"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert json.loads(faults.stdout)["result"]["faults"][0]["code"] == "C0035"  # 29-bit normal-fixed ids


def test_agent_daemon_through_the_hub_and_a_broker(simulator_with_hub, broker):
    from mqtt_support import AgentProcess

    from agent.config.model import MqttConfig
    from agent.fleet.caller import Caller

    config, vehicle = simulator_with_hub
    agent = AgentProcess(config, broker.url, config.parent / "state").start()
    try:
        with Caller(MqttConfig(broker=broker.url), vehicle) as backend:
            backend.subscribe(f"{backend.topics.base}/#")
            backend.wait_status("online", 10)
            backend.send({"id": "hub-1", "component": "engine", "command": "read_data",
                          "params": {"data": ["vin", "engine_speed"]}})
            assert backend.final("hub-1")["result"] == {"values": {"vin": "WVWZZZ1JZXW000001", "engine_speed": 750.0}}
    finally:
        assert agent.terminate() == 0
