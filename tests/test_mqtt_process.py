"""The agent as a real process under a real broker: SIGKILL, restarts, broker outages, Last Will, CLI.

The simulated ECUs run inside the agent process (virtual bus); they journal every request they
execute to a file, which outlives a SIGKILL and proves what ran and how often.
"""

import json
import subprocess
import sys
import time
import uuid

import pytest
from conftest import ROOT
from mqtt_support import AgentProcess, daemon_files, validate_published

from agent.bus.owner import wait_until
from agent.fleet.caller import Caller


@pytest.fixture
def setup(tmp_path, broker):
    vehicle = f"VP{uuid.uuid4().hex[:12].upper()}"
    config = daemon_files(tmp_path, broker.url, vehicle, f"proc-{uuid.uuid4().hex[:8]}",
                          faults=[{"service": 0x31, "pending": 50}])  # each routine takes ~1 s (50 x 0x78)
    agent = AgentProcess(config, broker.url, tmp_path / "state", tmp_path / "journal")
    yield agent, vehicle, tmp_path
    agent.ensure_stopped()


@pytest.fixture
def backends():
    """Opens backend clients; closes every one of them at the end, even when the test failed."""
    opened: list[Caller] = []

    def open_backend(broker, vehicle, client_id=None):
        from agent.config.model import MqttConfig

        # A persistent session, as a real backend has: the broker keeps the subscription (and queues
        # what the agent publishes) across the backend's own reconnects and the broker's restarts.
        caller = Caller(MqttConfig(broker=broker.url), vehicle, client_id=client_id,
                        session_expiry_s=300 if client_id else 0)
        opened.append(caller)
        caller.connect()
        caller.subscribe(f"{caller.topics.base}/#")
        return caller

    yield open_backend
    for caller in opened:
        caller.close()


def routine(n):
    return {"id": f"op-{n}-{uuid.uuid4().hex[:6]}", "component": "engine", "command": "operation",
            "params": {"routine": "self_test", "action": "start", "data": f"{n:04x}"}}


def journal_count(tmp_path, n):
    path = tmp_path / "journal"
    lines = path.read_text().splitlines() if path.exists() else []
    return sum(1 for line in lines if line == f"engine 31010203{n:04x}")


def test_sigkill_mid_stream_then_restart(setup, broker, backends):
    agent, vehicle, tmp = setup
    agent.start()
    backend = backends(broker, vehicle)
    ops = [routine(n) for n in (1, 2, 3)]
    for body in ops:
        backend.send(body)
    backend.wait_for(lambda s: b'"accepted"' in s.payload, 10, count=3)
    broker.stop()  # op 1 finishes while the broker is away: its response waits in the outbox
    assert wait_until(lambda: journal_count(tmp, 1) == 1, 10), "op 1 did not execute"
    time.sleep(0.3)  # op 2 is now running (in its 0x78 phase)
    agent.kill()
    backend.close()
    broker.start()
    backend = backends(broker, vehicle)
    agent.start()
    finals = {body["id"]: backend.final(body["id"], timeout=15) for body in ops}
    assert finals[ops[0]["id"]]["status"] == "completed"  # from the outbox, after the restart
    assert finals[ops[1]["id"]]["status"] == "interrupted"
    assert finals[ops[1]["id"]]["error"]["code"] == "interrupted"
    assert finals[ops[2]["id"]]["status"] == "completed"  # was queued: runs after the restart
    started = backend.wait_for(lambda s: s.topic == backend.topics.events and b"agent_started" in s.payload
                               and ops[1]["id"].encode() in s.payload, 10)
    assert json.loads(started[0].payload)["interrupted"] == [ops[1]["id"]]
    time.sleep(0.5)
    assert [journal_count(tmp, n) for n in (1, 2, 3)] == [1, 0, 1]  # nothing ran twice; op 2 never re-ran
    assert agent.terminate() == 0
    validate_published(backend.seen, backend.topics.base)


def test_broker_restart_mid_stream_delivers_afterwards(setup, broker, backends):
    """The agent may reconnect to the restarted broker before the backend does, and drain its outbox at
    once: only a backend with a persistent session can count on seeing those responses."""
    agent, vehicle, tmp = setup
    agent.start()
    backend_id = f"backend-{uuid.uuid4().hex[:8]}"
    backend = backends(broker, vehicle, backend_id)
    body = routine(7)
    backend.send(body)
    backend.wait_for(lambda s: b'"accepted"' in s.payload, 10)
    broker.stop()
    assert wait_until(lambda: journal_count(tmp, 7) == 1, 10), "the routine did not execute"
    backend.close()
    broker.start()
    # The agent reconnects and drains its outbox before the backend is back: the broker must queue it.
    assert wait_until(lambda: agent.log_count('"message": "connected to broker"') == 2, 30), "no reconnect"
    backend = backends(broker, vehicle, backend_id)
    assert backend.final(body["id"], timeout=30)["status"] == "completed"
    fresh = {"id": f"after-{uuid.uuid4().hex[:6]}", "component": "engine", "command": "read_data",
             "params": {"data": "vin"}}
    backend.send(fresh)
    assert backend.final(fresh["id"], timeout=15)["status"] == "completed"
    assert journal_count(tmp, 7) == 1
    assert agent.terminate() == 0


def test_commands_sent_while_agent_is_offline_arrive_later(setup, broker, backends):
    agent, vehicle, _ = setup
    agent.start()
    backend = backends(broker, vehicle)
    assert agent.terminate() == 0
    backend.wait_status("offline", 10)
    body = {"id": f"late-{uuid.uuid4().hex[:6]}", "component": "engine", "command": "read_data",
            "params": {"data": "vin"}}
    backend.send(body)  # the broker queues it in the agent's persistent session
    agent.start()
    assert backend.final(body["id"], timeout=15)["result"] == {"values": {"vin": "TEST0VEHICLE00001"}}
    assert agent.terminate() == 0


def test_last_will_on_sigkill(setup, broker, backends):
    agent, vehicle, _ = setup
    agent.start()
    backend = backends(broker, vehicle)
    online = backend.wait_status("online", 10)
    agent.kill()
    offline = backend.wait_status("offline", 15)
    assert offline.json()["vehicle"] == vehicle
    # The Will was registered before the agent went online: it carries the start time (docs/protocol.md)
    assert offline.json()["since"] == online.json()["since"]


def test_call_cli_round_trip_and_status(setup, broker):
    agent, _, tmp = setup
    agent.start()
    base = [sys.executable, "-m", "agent", "call", "-c", str(tmp / "agent.yaml"), "--broker", broker.url]
    result = subprocess.run([*base, "engine", "read_data", "data=vin"], capture_output=True, text=True,
                            cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [m["status"] for m in lines] == ["accepted", "completed"]
    assert lines[-1]["result"]["values"]["vin"] == "TEST0VEHICLE00001"
    refused = subprocess.run([*base, "body", "clear_faults"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert refused.returncode == 1 and '"not_permitted"' in refused.stdout
    status = subprocess.run([*base, "--status"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "online"
    assert agent.terminate() == 0
    status = subprocess.run([*base, "--status"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert status.returncode == 1 and json.loads(status.stdout)["state"] == "offline"
    other = subprocess.run([*base, "--vehicle", "NOBODY", "--wait", "1", "engine", "read_data", "data=vin"],
                           capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert other.returncode == 75 and "no final response" in other.stderr
