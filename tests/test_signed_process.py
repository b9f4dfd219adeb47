"""Signed commands with the agent as a real process: `sovd-edge keygen`, `sovd-edge call --sign-key`, and the
audit log across a SIGKILL in the middle of a mutating command (the simulator journals what it executed)."""

import json
import subprocess
import sys
import uuid

import pytest
import yaml
from conftest import DATA, ROOT
from mqtt_support import AgentProcess, validate_published
from signing_support import KeyPair, expires_in

from agent.bus.owner import wait_until
from agent.config.model import MqttConfig
from agent.fleet.caller import Caller
from agent.store.audit import AUDIT_FILE, read_records


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


@pytest.fixture
def setup(tmp_path, broker):
    made = cli("keygen", "--key-id", "backend-1", "--dir", str(tmp_path / "keys"))
    assert made.returncode == 0, made.stderr
    key = KeyPair("backend-1", tmp_path / "keys/backend-1.key", tmp_path / "keys/backend-1.pub")
    assert key.private.stat().st_mode & 0o777 == 0o600
    vehicle = f"VS{uuid.uuid4().hex[:12].upper()}"
    sim = yaml.safe_load((DATA / "vehicle-sim.yaml").read_text())
    sim["ecus"][0]["faults"] = [{"service": 0x31, "pending": 150}]  # each routine takes ~3 s (150 x 0x78)
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(sim))
    config = yaml.safe_load((DATA / "vehicle.yaml").read_text())
    config.update(vehicle=vehicle, simulate=[str(tmp_path / "sim.yaml")], state_dir=str(tmp_path / "state"))
    config["bus"]["channel"] = f"sig-{uuid.uuid4().hex[:8]}"
    config["mqtt"] = {"broker": broker.url, "keepalive_s": 5}
    config["security"] = {"require_signature": "mutating", "keys": {"backend-1": {"public_key": str(key.public)}}}
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
    agent = AgentProcess(tmp_path / "agent.yaml", broker.url, tmp_path / "state", tmp_path / "journal")
    yield agent, vehicle, key, tmp_path
    agent.ensure_stopped()


@pytest.fixture
def backend(broker, setup):
    _, vehicle, _, _ = setup
    with Caller(MqttConfig(broker=broker.url), vehicle) as caller:
        caller.subscribe(f"{caller.topics.base}/#")
        yield caller
        validate_published(caller.seen, caller.topics.base)


def audit_events(backend):
    return [(e["phase"], e["id"]) for e in (s.json() for s in backend.seen
                                            if s.topic == backend.topics.events and b'"audit"' in s.payload)]


def executed_routines(tmp_path):
    path = tmp_path / "journal"
    return sum(1 for line in path.read_text().splitlines() if line.startswith("engine 3101")) if path.exists() else 0


def test_audit_across_sigkill_mid_command(setup, backend):
    agent, _, key, tmp = setup
    agent.start()
    body = {"id": f"op-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "operation",
            "params": {"routine": "self_test", "action": "start"}, "expires_at": expires_in(60)}
    backend.send(key.sign(body))
    # The event leaves through the outbox once the ledger says `started`: the routine is now in its 0x78 phase
    assert wait_until(lambda: ("started", body["id"]) in audit_events(backend), 10)
    agent.kill()
    audit = tmp / "state" / AUDIT_FILE
    (started,) = read_records(audit)  # fsynced before it ran; no outcome yet
    assert (started["phase"], started["who"], started["params"]) == ("started", "backend-1", body["params"])
    agent.start()
    final = backend.final(body["id"], timeout=15)
    assert final["status"] == "interrupted"
    started_again, finished = read_records(audit)
    assert started_again == started
    assert (finished["phase"], finished["id"], finished["status"], finished["who"]) == \
        ("finished", body["id"], "interrupted", "backend-1")
    assert wait_until(lambda: ("finished", body["id"]) in audit_events(backend), 10)
    assert executed_routines(tmp) == 0  # never re-run
    assert agent.terminate() == 0


def test_call_signs_with_sign_key(setup, broker):
    agent, _, key, tmp = setup
    agent.start()
    base = ["call", "-c", str(tmp / "agent.yaml"), "--broker", broker.url]
    signed = cli(*base, "--sign-key", str(key.private), "--key-id", "backend-1", "engine", "clear_faults")
    assert signed.returncode == 0, signed.stdout + signed.stderr
    assert [json.loads(line)["status"] for line in signed.stdout.splitlines()] == ["accepted", "completed"]
    unsigned = cli(*base, "engine", "clear_faults")
    assert unsigned.returncode == 1
    (refusal,) = [json.loads(line) for line in unsigned.stdout.splitlines()]
    assert refusal["error"]["code"] == "unauthenticated" and refusal["error"]["reason"] == "missing"
    read = cli(*base, "engine", "read_data", "data=vin")  # reads need no signature under `mutating`
    assert read.returncode == 0, read.stdout + read.stderr
    half = cli(*base, "--sign-key", str(key.private), "engine", "clear_faults")
    assert half.returncode == 2 and "go together" in half.stderr
    missing = cli(*base, "--sign-key", str(tmp / "nope.key"), "--key-id", "x", "engine", "clear_faults")
    assert missing.returncode == 2 and "cannot read private key" in missing.stderr
    assert agent.terminate() == 0
    records = read_records(tmp / "state" / AUDIT_FILE)
    assert [(r["phase"], r["who"], r["command"]) for r in records] == [
        ("started", "backend-1", "clear_faults"), ("finished", "backend-1", "clear_faults")]


def test_keygen_refuses_to_overwrite_and_bad_ids(tmp_path):
    assert cli("keygen", "--key-id", "k1", "--dir", str(tmp_path)).returncode == 0
    again = cli("keygen", "--key-id", "k1", "--dir", str(tmp_path))
    assert again.returncode == 73 and "refusing to overwrite" in again.stderr
    bad = cli("keygen", "--key-id", "a/b", "--dir", str(tmp_path))
    assert bad.returncode == 2 and "--key-id" in bad.stderr


def test_an_unusable_key_file_is_a_config_error_exit_78(setup):
    agent, _, key, _ = setup
    key.public.write_text("not a key")
    started = subprocess.run(agent.args, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert started.returncode == 78
    assert "security.keys.backend-1.public_key" in started.stderr
