"""Failure paths a newcomer hits: a second agent on the same state dir, the metrics port taken, two agents
sharing one client id, an unreachable socketcand hub, and library loggers that repeat themselves."""

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
import yaml
from conftest import DATA, ROOT
from mqtt_support import AgentProcess

from agent.bus.owner import BusOwner, wait_until
from agent.config.model import BusConfig
from agent.devtools.local_broker import free_port
from agent.system.logs import LibraryRateLimit
from agent.system.service import Service


def agent_config(tmp_path, broker_url, metrics_port=None):
    config = yaml.safe_load((DATA / "vehicle.yaml").read_text())
    config.update(vehicle=f"VF{uuid.uuid4().hex[:10].upper()}", state_dir=str(tmp_path / "state"))
    config["bus"]["channel"] = f"fail-{uuid.uuid4().hex[:8]}"
    config["mqtt"] = {"broker": broker_url}
    config["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"} if metrics_port else {"enabled": False}
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)


def test_second_agent_on_the_same_state_dir_exits_75_naming_the_holder(tmp_path, broker):
    path = agent_config(tmp_path, broker.url)
    first = AgentProcess(path, broker.url, tmp_path / "state").start()
    try:
        second = run_cli("run", "-c", str(path), "--state-dir", str(tmp_path / "state"), "--log-format", "json")
        assert second.returncode == 75, second.stderr
        assert f"pid {first.proc.pid}" in second.stderr and "Traceback" not in second.stderr
        assert first.proc.poll() is None  # the first one is untouched
    finally:
        assert first.terminate() == 0
    # once it is gone, the directory is free again (the kernel drops the lock even after SIGKILL)
    again = AgentProcess(path, broker.url, tmp_path / "state").start()
    again.kill()
    again.start()
    assert again.terminate() == 0


def test_metrics_port_in_use_is_one_line_and_exit_69(tmp_path, broker):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = agent_config(tmp_path, broker.url, metrics_port=port)
        result = run_cli("run", "-c", str(path), "--log-format", "json")
    assert result.returncode == 69, result.stderr
    errors = [line for line in result.stderr.splitlines() if '"level": "ERROR"' in line]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0] and "in use" in errors[0]
    assert "Traceback" not in result.stderr


def test_session_taken_over_by_a_second_client_is_said_plainly(mqtt_vehicle, tmp_path, caplog):
    """Two agents with one config (one client id) keep taking the session from each other. An MQTT 5
    broker may say so (DISCONNECT 0x8E); Mosquitto 2.0.11 just closes the older connection, so the
    agent recognises connections cut again and again right after they were accepted."""
    one = Service(mqtt_vehicle)
    two = Service(dataclasses.replace(mqtt_vehicle, state_dir=tmp_path / "other"))
    one.start()
    try:
        assert one.link.wait_connected(10), one.link.last_error
        two.start()
        assert wait_until(lambda: one.link.stats.taken_over + two.link.stats.taken_over >= 1, 10)
    finally:
        two.stop()
        one.stop()
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "agent.fleet.link"]
    assert any("over the session" in line and one.link.client_id in line and "second agent" in line
               for line in lines), lines


def test_unreachable_socketcand_hub_backs_off_with_one_clear_line(caplog):
    caplog.set_level(logging.DEBUG)
    port = free_port()  # nothing listens there
    owner = BusOwner(BusConfig(interface="socketcand", channel="can0",
                               options=(("host", "127.0.0.1"), ("port", port))))
    assert not owner.start(wait=0.0)
    try:
        assert wait_until(lambda: owner._failures >= 4, 10)
    finally:
        owner.stop()
    ours = [r.getMessage() for r in caplog.records if r.name == "agent.bus.owner" and r.levelno >= logging.WARNING]
    assert len(ours) == 1, ours  # the cause does not change: said once (again after OPEN_LOG_EVERY_S)
    assert "socketcand:can0" in ours[0] and f"127.0.0.1:{port} unreachable" in ours[0] and "refused" in ours[0]
    assert not [r for r in caplog.records if r.name.startswith("can.")]  # python-can's own retry loop not entered


def test_library_log_lines_are_rate_bounded():
    limit = LibraryRateLimit(burst=3, window_s=60.0)
    records = [logging.LogRecord("can.interfaces.socketcand.socketcand", logging.WARNING, "", 0,
                                 "Failed to connect to server: %s", ("refused",), None) for _ in range(1000)]
    passed = [r for r in records if limit.filter(r)]
    assert len(passed) == 3 and limit.suppressed == 997
    ours = logging.LogRecord("agent.bus.owner", logging.WARNING, "", 0, "x", (), None)
    assert all(limit.filter(ours) for _ in range(100))  # the agent's own lines are never limited
    limit._seen = {k: (v[0] - 61.0, v[1], v[2]) for k, v in limit._seen.items()}  # the window has passed
    after = records[0]
    assert limit.filter(after) and after.suppressed == 997


def test_disconnect_reason_0x8e_is_logged_as_a_takeover_and_slows_reconnects(mqtt_vehicle, caplog):
    """A broker that says why (DISCONNECT 0x8E, e.g. EMQX, HiveMQ): the callback alone, no broker needed."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from agent.fleet.link import MqttLink
    from agent.fleet.topics import Topics

    link = MqttLink(mqtt_vehicle.mqtt, Topics("sovd", "V"), "sovd-edge-V", status=lambda state: b"{}",
                    on_command=lambda item: None, on_published=lambda mid, code: None,
                    on_connection=lambda up: None)
    link._up_since = time.monotonic()  # it was connected
    link._disconnected(link._client, None, None, ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E), None)
    assert link.stats.taken_over == 1 and link._takeover.in_a_row == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("says another connection with our client id 'sovd-edge-V' took over the session" in e for e in errors)


def test_a_message_handed_over_while_disconnected_is_tracked_not_raised(mqtt_vehicle):
    """paho keeps a QoS 1 message published while there is no connection and sends it on the next one; the
    link must return its mid like any other (it once raised from is_published(), so the outbox handed the same
    row over again and paho's orphan copy was resent on every reconnect: a message too large for the broker
    then kept cutting connections after it was set aside). The link is never started: no broker needed."""
    from agent.fleet.link import MqttLink
    from agent.fleet.topics import Topics
    from agent.store.sqlite import Outgoing

    link = MqttLink(mqtt_vehicle.mqtt, Topics("sovd", "V"), "sovd-edge-V", status=lambda state: b"{}",
                    on_command=lambda item: None, on_published=lambda mid, code: None,
                    on_connection=lambda up: None)
    mid = link.publish(Outgoing("sovd/V/events", b'{"type":"x"}'))
    assert isinstance(mid, int) and mid in link._unacked
    assert mid in link._client._out_messages  # queued by paho for the next connection
    link.forget(mid)
    assert mid not in link._client._out_messages and mid not in link._unacked


def test_a_state_lock_whose_pid_cannot_be_written_is_not_kept_half_taken(tmp_path):
    """A full disk when the pid is written: the lock's file descriptor was left open (the lock held) with
    the error raised, so an in-process caller could never take it again. A file-size limit of 0 stands in
    for the full disk (RLIMIT_FSIZE, in a child process: a disk cannot be filled here)."""
    code = f"""
import os, resource, signal
from pathlib import Path
from agent.system.statelock import StateLock
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
before = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
try:
    StateLock(Path({str(tmp_path)!r})).acquire()
except OSError as err:
    print("raised", err.errno)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print("fds", len(os.listdir("/proc/self/fd")) - before)
StateLock(Path({str(tmp_path)!r})).acquire()
print("taken")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.split("\n")[:3] == ["raised 27", "fds 0", "taken"], result.stdout + result.stderr


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_left_alone(tmp_path):
    """`agent.lock` a symlink (a mistaken fix by hand, or planted): the agent followed it, locked the target
    and truncated it to write its pid: the store, a config, whatever it named. Doctor already calls such a
    lock "not a file: the agent cannot lock"; the agent now refuses it likewise (run exits 73), touching
    nothing, and keeps no descriptor open."""
    from agent.system.statelock import StateLock

    target = tmp_path / "precious"
    target.write_text("not a lock\n")
    (tmp_path / "agent.lock").symlink_to(target)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        StateLock(tmp_path).acquire()
    assert target.read_text() == "not a lock\n"
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_deleted_lock_file_does_not_let_a_second_agent_take_the_state_directory(tmp_path):
    """An operator who deletes `agent.lock` as a stale lock file while the agent runs: the lock was on that
    file alone, so a second agent locked a new one and ran the same ledger. The directory is locked too."""
    from agent.system.statelock import StateLock, StateLockedError

    first = StateLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(StateLockedError) as refused:
            StateLock(tmp_path).acquire()
        assert refused.value.holder == str(os.getpid())
        fds = len(os.listdir("/proc/self/fd"))
        (tmp_path / "agent.lock").unlink()
        with pytest.raises(StateLockedError) as refused:
            StateLock(tmp_path).acquire()
        assert refused.value.holder == "unknown"  # its pid went with the file
        assert len(os.listdir("/proc/self/fd")) == fds  # a refused attempt keeps nothing open
    finally:
        first.release()
    with StateLock(tmp_path) as again:
        assert (tmp_path / "agent.lock").read_text() == f"{os.getpid()}\n"
    assert again._fds == []
