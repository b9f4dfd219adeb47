"""The SocketCAN lane, on a real interface named by SOVD_TEST_CAN (vcan0): raw sockets, kernel CAN filters,
kernel ISO-TP and the userspace fallback, netlink bus state, agent and ECUs as separate processes.

Here: `sudo hw/vcan-up && SOVD_TEST_CAN=vcan0 .venv/bin/pytest -m vcan`; without CAN in the kernel,
tests/vm/run-vcan-suite runs this file and test_vcan_functional.py in a VM (as .ci/run does).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import isotp
import pytest
import yaml
from conftest import ROOT
from mqtt_support import AgentProcess, validate_published

from agent.bus.isotp_link import IsoTpLink
from agent.bus.kernel_isotp import KernelIsoTpLink, kernel_isotp_available, kernel_isotp_max_pdu
from agent.bus.owner import BusOwner
from agent.config.model import Addressing, BusConfig, IsoTpConfig, MqttConfig
from agent.config.transport import isotp_address
from agent.devtools.local_broker import free_port
from agent.fleet.caller import Caller

CAN = os.environ.get("SOVD_TEST_CAN")
pytestmark = [pytest.mark.vcan,
              pytest.mark.skipif(not CAN, reason="set SOVD_TEST_CAN=vcan0 (sudo hw/vcan-up) to run the SocketCAN lane")]


def test_kernel_has_can_raw_and_isotp():
    raw = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
    raw.bind((CAN,))
    raw.close()
    assert kernel_isotp_available()


@pytest.fixture(scope="module")
def simulator(tmp_path_factory):
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    proc = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "-c", str(ROOT / "config/sim/vcan.yaml"),
                             "--interface", "socketcan", "--channel", CAN, "--fd", "--log-format", "json"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 60
    while '"simulating"' not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    yield proc
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def _start_agent(transport, directory, broker):
    """The agent as systemd runs it, on vcan0 with `transport` ISO-TP: (process, metrics port, vehicle)."""
    config = yaml.safe_load((ROOT / "config/vcan.yaml").read_text())
    config["vehicle"] = f"VV{uuid.uuid4().hex[:10].upper()}"
    config["bus"].update(channel=CAN, isotp=transport)
    for ecu in config["ecus"]:  # generous P2: the lane may run under full emulation (tests/vm), not on an ECU
        ecu.setdefault("timing", {})["p2_ms"] = 3000
    port = free_port()
    process = AgentProcess(_write(directory / "agent.yaml", config), broker.url, directory / "state")
    process.args += ["--metrics-listen", f"127.0.0.1:{port}"]
    process.start(timeout=90)
    assert f'"transport": "{transport}"' in process.log.read_text()
    return process, port, config["vehicle"]


def _backend_of(process, port, vehicle, broker):
    """A fresh backend for one test; its teardown validates what the agent published to it."""
    backend = Caller(MqttConfig(broker=broker.url), vehicle)
    backend.connect()
    backend.subscribe(f"{backend.topics.base}/#")
    backend.wait_status("online", 30)
    yield process, backend, port
    validate_published(backend.seen, backend.topics.base)
    backend.close()
    assert process.proc.poll() is None, process.log.read_text()[-2000:]  # the test did not end the agent


@pytest.fixture(scope="module", params=["kernel", "userspace"])
def shared_agent(request, tmp_path_factory, broker, simulator):
    """One agent per ISO-TP transport: each start costs ~9 s in the emulated VM, which 16 starts made a
    third of the lane (CI is to stay under 20 minutes). A test that needs an agent of its own, alone on
    the bus, is in test_vcan_functional.py (it runs after this module's agents have stopped)."""
    process, port, vehicle = _start_agent(request.param, tmp_path_factory.mktemp(f"agent-{request.param}"), broker)
    yield process, port, vehicle
    assert process.terminate(60) == 0
    process.ensure_stopped()


@pytest.fixture
def agent(shared_agent, broker):
    yield from _backend_of(*shared_agent, broker)


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def call(backend, component, command, params=None, timeout=60):
    body = {"id": f"v-{uuid.uuid4().hex[:8]}", "component": component, "command": command}
    if params:
        body["params"] = params
    backend.send(body)
    return backend.final(body["id"], timeout=timeout)


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def metric(text, prefix):
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_commands_over_socketcan(agent):
    _, backend, _ = agent
    assert call(backend, "engine", "read_data", {"data": ["vin", "engine_speed", "coolant_temperature"]})[
        "result"] == {"values": {"vin": "VCAN0DEVVEHICLE01", "engine_speed": 750.0, "coolant_temperature": 50.0}}
    faults = call(backend, "engine", "read_faults", {"snapshots": True})["result"]["faults"]
    assert faults[0]["code"] == "P0301" and faults[0]["snapshots"][0]["values"] == {"engine_speed": 800.0}
    assert call(backend, "engine", "set_session", {"session": "extended"})["status"] == "completed"
    assert call(backend, "engine", "security_access", {"level": 1})["result"] == {"level": 1, "unlocked": True}
    assert call(backend, "engine", "operation", {"routine": "self_test", "action": "start"})["result"] == {
        "status_record": "00"}
    assert call(backend, "engine", "raw", {"request": "22F405"})["result"] == {"response": "62f4055a"}
    assert call(backend, "engine", "read_data", {"data": "0x1234"})["error"]["nrc"] == "0x31"


def test_4095_byte_did(agent):
    process, backend, _ = agent
    log = process.log.read_text()
    if '"transport": "kernel"' in log and kernel_isotp_max_pdu() < 4098:
        # a 4095-byte DID needs 4098-byte PDUs: on kernels that take only 4095 the agent says so and
        # serves this ECU with userspace ISO-TP; the FD component stays on kernel ISO-TP
        assert "ECU engine uses userspace ISO-TP: its DIDs need 4098-byte PDUs" in log
        assert '"transports": {"engine": "userspace", "adas": "kernel"}' in log
    final = call(backend, "engine", "read_data", {"data": "freeze_frame_block"})
    assert final["status"] == "completed", (final.get("error"), process.log.read_text()[-2500:])
    raw = final["result"]["values"]["freeze_frame_block"]["raw"]
    assert bytes.fromhex(raw) == bytes(i & 0xFF for i in range(4095))


def test_can_fd_component(agent):
    _, backend, _ = agent
    final = call(backend, "adas", "read_data", {"data": "calibration"})
    assert final["status"] == "completed", final
    assert bytes.fromhex(final["result"]["values"]["calibration"]["raw"]) == bytes(i & 0xFF for i in range(1024))


FLOOD = """
import socket, struct, sys, time
s = socket.socket(socket.AF_CAN, socket.SOCK_RAW, socket.CAN_RAW)
s.bind((sys.argv[1],))
frame = struct.pack("=IB3x8s", 0x123, 8, bytes(8))
rate, seconds = int(sys.argv[2]), float(sys.argv[3])
sent, start = 0, time.monotonic()
while (elapsed := time.monotonic() - start) < seconds:
    due = int(elapsed * rate)
    while sent < due:
        s.send(frame)
        sent += 1
    time.sleep(0.005)
print(sent / (time.monotonic() - start))
"""


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_kernel_filters_keep_the_agent_idle_under_a_flood(agent):
    process, backend, port = agent
    call(backend, "engine", "read_data", {"data": "vin"})
    before_rx = metric(metrics(port), 'sovd_can_frames_total{direction="rx"')
    cpu_before, started = cpu_seconds(process.proc.pid), time.monotonic()
    time.sleep(5)  # the baseline: the same agent, idle, for as long as the flood lasts
    idle = (cpu_seconds(process.proc.pid) - cpu_before) / (time.monotonic() - started)
    cpu_before, started = cpu_seconds(process.proc.pid), time.monotonic()
    flood = subprocess.run([sys.executable, "-c", FLOOD, CAN, "4000", "5"], capture_output=True, text=True,
                           timeout=120)
    cpu = (cpu_seconds(process.proc.pid) - cpu_before) / (time.monotonic() - started)
    rate = float(flood.stdout.strip())
    figure = {"benchmark": "agent_cpu_under_unrelated_flood", "interface": CAN, "flood_frames_per_s": round(rate),
              "agent_cpu_percent_of_one_core": round(cpu * 100, 2),
              "agent_idle_cpu_percent_of_one_core": round(idle * 100, 2)}
    print(json.dumps(figure))
    text = metrics(port)
    assert rate > 3000
    # the bus-state reading counts every frame on the interface (kernel counters); the agent's own
    # receive path sees only its ECUs' response ids, which a flood of 0x123 does not touch
    assert cpu < idle + 0.03, figure  # the flood costs the agent (almost) nothing: the kernel filters it
    assert call(backend, "engine", "read_data", {"data": "vin"})["status"] == "completed"
    assert metric(text, 'sovd_can_frames_total{direction="rx"') >= before_rx


def test_bus_state_and_counters_from_the_real_interface(agent):
    _, backend, port = agent
    call(backend, "engine", "read_data", {"data": "vin"})
    time.sleep(2.5)  # bus_state_interval_s is 1 in config/vcan.yaml
    text = metrics(port)
    assert f'sovd_can_bus_state{{interface="{CAN}",sovd_can_bus_state="unknown"}} 1.0' in text  # vcan: no controller
    kernel = json.loads(subprocess.run(["ip", "-details", "-statistics", "-json", "link", "show", "dev", CAN],
                                       capture_output=True, text=True, check=True).stdout)[0]["stats64"]
    tx = metric(text, f'sovd_can_frames_total{{direction="tx",interface="{CAN}"}}')
    assert 0 < tx <= kernel["tx"]["packets"]  # read from the kernel, so it counts the simulator's frames too
    assert f'sovd_can_bus_load_ratio{{interface="{CAN}"}}' in text


def test_interface_down_gives_bus_error_then_recovers_without_restart(agent):
    process, backend, _ = agent
    subprocess.run(["ip", "link", "set", CAN, "down"], check=True)
    try:
        final = call(backend, "engine", "read_data", {"data": "vin"})
        assert final["status"] == "failed" and final["error"]["code"] == "bus_error", final.get("error")
        time.sleep(2.5)  # longer than bus_state_interval_s (1 s): the monitor sees the interface down
    finally:
        subprocess.run(["ip", "link", "set", CAN, "up"], check=True)
    deadline = time.monotonic() + 60
    while True:
        final = call(backend, "engine", "read_data", {"data": "vin"})
        if final["status"] == "completed" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert final["status"] == "completed", final
    assert process.proc.poll() is None  # the same agent process
    events = [json.loads(s.payload) for s in backend.seen if s.topic == backend.topics.events]
    assert any(e["type"] == "bus_state" and e["state"] == "stopped" for e in events)


SLOW_ANSWER = bytes([0x62, 0xF1, 0x90]) + bytes(range(97))  # a first frame and 14 consecutive frames


@pytest.mark.parametrize("kind", ["kernel", "userspace"])
def test_p2_bounds_only_the_first_frame_of_a_slow_answer(kind):
    """Both links on the real kernel: asked for STmin 50 ms, an ECU on a kernel ISO-TP socket takes
    ~0.7 s for a 100-byte answer; P2 (0.2 s) bounds only its first frame. A silent ECU ends at P2."""
    addressing = Addressing("normal_11bit", request_id=0x6A0, response_id=0x6A8)  # clear of config/sim/vcan.yaml
    ecu = isotp.socket()
    ecu.bind(CAN, isotp_address(addressing, server=True))
    ecu.settimeout(10)
    owner = BusOwner(BusConfig(interface="socketcan", channel=CAN))
    assert owner.start(5)
    sockets = []

    def factory():
        sockets.append(isotp.socket())
        return sockets[-1]

    config = IsoTpConfig(st_min=50)
    link = (KernelIsoTpLink(CAN, isotp_address(addressing), config, name="k", owner=owner, socket_factory=factory)
            if kind == "kernel" else IsoTpLink(owner, isotp_address(addressing), config, name="u"))

    def serve():
        if ecu.recv() == bytes.fromhex("22f190"):
            ecu.send(SLOW_ANSWER)
        ecu.recv()  # the second request stays unanswered

    server = threading.Thread(target=serve, name="kernel-ecu", daemon=True)
    server.start()
    try:
        timings = []
        for request in (bytes.fromhex("22f190"), bytes.fromhex("220000")):
            link.flush()
            started = time.monotonic()
            link.send(request, timeout=2)
            timings.append((link.recv(0.2, time.monotonic() + 5), time.monotonic() - started))
        server.join(10)
    finally:
        owner.stop()
        ecu.close()
        for sock in sockets:
            sock.close()
    (answer, slow), (nothing, silent) = timings
    assert answer == SLOW_ANSWER and slow > 0.5, slow
    assert nothing is None and 0.19 < silent < 1.5, silent
