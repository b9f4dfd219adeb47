"""The notify protocol against a real AF_UNIX datagram socket, with the agent as a real process."""

import contextlib
import dataclasses
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import yaml
from conftest import DATA, ROOT

from agent.bus.owner import wait_until
from agent.fleet.caller import Caller
from agent.system.sdnotify import SystemdNotifier


def test_environment_parsing():
    n = SystemdNotifier({"NOTIFY_SOCKET": "@abstract-name", "WATCHDOG_USEC": "3000000"})
    assert n.address == "\0abstract-name" and n.watchdog_s == 3.0
    assert SystemdNotifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert SystemdNotifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000",
                            "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 0.001
    outside = SystemdNotifier({})
    assert not outside.enabled and outside.ready() is False and outside.watchdog_s is None


class NotifySocket:
    """Plays systemd's side: an abstract AF_UNIX datagram socket collecting what the agent sends."""

    def __init__(self):
        self.name = f"@sovd-test-{uuid.uuid4().hex[:8]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(0.2)
        self.messages = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-socket", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, line):
        return [t for t, m in self.messages if line in m.split("\n")]

    def wait_for(self, line, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.times(line):
                return self.times(line)[0]
            time.sleep(0.05)
        raise AssertionError(f"no {line} in {self.messages}")

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify():
    sock = NotifySocket()
    yield sock
    sock.close()


def start_agent(tmp_path, broker, notify, watchdog_s, wedge=False, sim_faults=None):
    vehicle = f"VN{uuid.uuid4().hex[:10].upper()}"
    config = yaml.safe_load((DATA / "vehicle.yaml").read_text())
    sim = yaml.safe_load((DATA / "vehicle-sim.yaml").read_text())
    if sim_faults:
        sim["ecus"][0]["faults"] = sim_faults
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(sim))
    config.update(vehicle=vehicle, simulate=[str(tmp_path / "sim.yaml")], state_dir=str(tmp_path / "state"))
    config["bus"]["channel"] = f"notify-{uuid.uuid4().hex[:6]}"
    if wedge:
        config["max_command_timeout_ms"] = 500
        engine = config["ecus"][0]
        engine["timing"].update(request_ms=500, p2_star_ms=500)
        engine["security"] = [{"level": 1, "algorithm": "tests.wedge:forever"}]
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(tmp_path / "agent.yaml"),
                             "--broker", broker.url, "--log-format", "json"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log)
    return proc, vehicle


def test_ready_after_bus_open_pings_at_half_interval_and_stopping(tmp_path, broker, notify):
    proc, _ = start_agent(tmp_path, broker, notify, watchdog_s=2.0)
    try:
        notify.wait_for("READY=1", 20)
        log = (tmp_path / "agent.log").read_text()
        assert log.index('"CAN bus open"') < log.index('"message": "ready"')  # the bus was open first
        ready_message = next(m for _, m in notify.messages if "READY=1" in m)
        assert "STATUS=" in ready_message and "bus up" in ready_message
        time.sleep(5)
        pings = notify.times("WATCHDOG=1")
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 4 and all(0.6 <= g <= 1.5 for g in gaps), gaps  # about half of 2 s
        assert any(m.startswith("STATUS=") for _, m in notify.messages)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        notify.wait_for("STOPPING=1", 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_stop_with_stuck_threads_ends_within_its_budget(mqtt_vehicle, sim, monkeypatch):
    """A stop ends within `grace` + STOP_AFTER_GRACE_S however many threads are stuck: systemd kills one
    that outlasts TimeoutStopSec, and a killed stop reports `interrupted` what a clean one queues again.
    The threads cannot all be wedged here on cue, so each component's stop is made to wait out the whole
    timeout it is given, as the join of a stuck thread does, before it stops for real; the store's last
    commit and close are the real ones, and must still happen."""
    from agent.system import service as service_module
    from agent.system.service import Service

    monkeypatch.setattr(service_module, "STOP_AFTER_GRACE_S", 2.0)
    svc = Service(mqtt_vehicle)
    svc.start()
    assert svc.link.wait_connected(10), svc.link.last_error
    asked: dict[str, float] = {}

    def stuck(name, real):
        def stop(timeout=3.0):
            asked[name] = timeout
            threading.Event().wait(timeout)
            real(0.0)
        return stop

    for name, part in (("intake", svc.intake), ("collection", svc.collection), ("outbox", svc.outbox),
                       ("link", svc.link), ("bus_monitor", svc.bus_monitor), ("bus", svc.runtime.owner)):
        monkeypatch.setattr(part, "stop", stuck(name, part.stop))
    closed = []
    real_close = svc.store.close
    monkeypatch.setattr(svc.store, "close", lambda timeout=10.0: (real_close(timeout), closed.append(timeout)))
    started = time.monotonic()
    svc.stop(grace=0.5)
    took = time.monotonic() - started
    assert took < 0.5 + 2.0 + 1.5, (took, asked)  # the defaults alone would add up to 14 s
    assert set(asked) == {"intake", "collection", "outbox", "link", "bus_monitor", "bus"}
    # Each stuck part waited out all it was given, one after another: together no more than the budget
    # (the bus's supervisor join and notifier stop were given their own 3 s and 2 s on top of it).
    assert sum(asked.values()) <= 0.5 + 2.0 + 0.01, asked
    assert closed, "the store was not closed"


def test_pings_stop_when_a_worker_is_wedged(tmp_path, broker, notify):
    from agent.config.model import MqttConfig

    proc, vehicle = start_agent(tmp_path, broker, notify, watchdog_s=2.0, wedge=True)
    try:
        notify.wait_for("READY=1", 20)
        with Caller(MqttConfig(broker=broker.url), vehicle) as backend:
            backend.subscribe(f"{backend.topics.base}/#")
            backend.wait_status("online", 10)
            backend.send({"id": "s-1", "component": "engine", "command": "set_session",
                          "params": {"session": "extended"}})
            backend.final("s-1")
            backend.send({"id": "w-1", "component": "engine", "command": "security_access", "params": {"level": 1}})
            backend.wait_for(lambda s: b'"accepted"' in s.payload and b"w-1" in s.payload, 10)
            wedged_at = time.monotonic()
            time.sleep(9)  # wedge limit here: 0.5 s deadline + 0.5 s P2* + 5 s
        pings = notify.times("WATCHDOG=1")
        assert any(t < wedged_at + 5 for t in pings)  # still fed while the command could be legitimately running
        last = max(pings)
        assert time.monotonic() - last > 2.5, "pings continued after the worker wedged"
        assert "worker engine wedged" in (tmp_path / "agent.log").read_text()
        assert any("unhealthy: worker engine wedged" in m for _, m in notify.messages)
    finally:
        proc.kill()
        proc.wait()


def test_graceful_stop_finishes_in_flight_and_goes_offline(tmp_path, broker, notify):
    from agent.config.model import MqttConfig

    proc, vehicle = start_agent(tmp_path, broker, notify, watchdog_s=10.0,
                                sim_faults=[{"service": 0x31, "pending": 40}])  # ~0.8 s routine
    try:
        notify.wait_for("READY=1", 20)
        with Caller(MqttConfig(broker=broker.url), vehicle) as backend:
            backend.subscribe(f"{backend.topics.base}/#")
            backend.wait_status("online", 10)
            backend.send({"id": "g-1", "component": "engine", "command": "operation",
                          "params": {"routine": "self_test", "action": "start"}})
            backend.wait_for(lambda s: b'"accepted"' in s.payload, 10)
            time.sleep(0.2)
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            assert time.monotonic() - stopped_at < 20  # TimeoutStopSec in the unit
            assert backend.final("g-1")["status"] == "completed"  # finished, and flushed before exit
            backend.wait_status("offline", 5)
        notify.wait_for("STOPPING=1", 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class StallingBroker:
    """A TCP port that takes connections and never answers: a broker behind a middlebox, or one too busy to
    finish a TLS handshake. The agent's connect attempt blocks in the handshake until `release()`."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hello = threading.Event()  # the agent's ClientHello arrived: its link thread is in the handshake
        self.conns = []
        self._thread = threading.Thread(target=self._run, name="stalling-broker", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if conn.recv(1):
                self.hello.set()

    def release(self):
        for sock in [self.sock, *self.conns]:  # shutdown wakes the accept and recv under way; close would not
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._thread.join(2)


def test_a_connect_attempt_under_way_is_not_a_wedge(vehicle, sim, pki, tmp_path):
    # The MQTT loop thread blocks inside one connect attempt: the name lookup (the resolver's own retries,
    # 10 s per silent nameserver), 5 s per address that drops SYNs, 5 s of TLS handshake. A broker outage
    # is no wedge: counting that wait against the loop's 10 s heartbeat stopped the watchdog pings of a
    # healthy agent (ERROR "not feeding the watchdog", STATUS "unhealthy"), and systemd killed it again
    # and again (under the start limit the unit had then, for good). A connect that outlasts any such wait is.
    from agent.config.model import TlsConfig
    from agent.fleet.link import CONNECT_LIMIT_S
    from agent.system.service import Service

    stall = StallingBroker()
    config = dataclasses.replace(vehicle, state_dir=tmp_path / "state", mqtt=dataclasses.replace(
        vehicle.mqtt, broker=f"mqtts://127.0.0.1:{stall.port}", tls=TlsConfig(ca_file=pki / "ca.pem")))
    service = Service(config)
    service.link._client.connect_timeout = 60  # paho's 5 s handshake timeout: here the test ends the wait
    service.start()
    try:
        assert stall.hello.wait(20)
        assert service.link.connecting_since is not None
        service.link.heartbeat -= 11  # 11 s into this one handshake (its thread cannot beat meanwhile)
        assert not [p for p in service.wedged() if p.startswith("mqtt")]
        assert not [p for p in service.health() if p.startswith("mqtt")]
        service.link.connecting_since -= CONNECT_LIMIT_S + 1  # longer than any connect can take
        assert [p for p in service.wedged() if p.startswith("mqtt connecting for")]
    finally:
        stall.release()  # the handshake ends (EOF), the loop thread can stop
        service.stop()


def test_the_watchdogs_abort_leaves_every_threads_stack_in_the_journal(tmp_path, broker, notify):
    # systemd ends a process that stopped pinging with SIGABRT (WatchdogSignal=). When the main loop itself
    # is what hangs, no "not feeding the watchdog" line says why: the stacks written on the way out are the
    # only trace of where each thread was stuck.
    proc, _ = start_agent(tmp_path, broker, notify, watchdog_s=30.0)
    try:
        notify.wait_for("READY=1", 20)
        proc.send_signal(signal.SIGABRT)
        assert proc.wait(20) == -signal.SIGABRT
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = (tmp_path / "agent.log").read_text()
    assert "Fatal Python error: Aborted" in log
    assert "in run_until_stopped" in log  # the main loop, where it waited
    assert log.count("Thread 0x") + log.count("Current thread 0x") >= 5  # main, mqtt loop, intake, outbox, workers


def test_a_broken_pipe_does_not_end_the_daemon(tmp_path, broker, notify):
    # The kernel sends SIGPIPE to a process that writes to a socket whose peer is gone: the broker's
    # connection reset under paho, a Prometheus scrape that timed out mid-response. `sovd-edge` made SIGPIPE
    # fatal for every subcommand (for `uds ... | head`), the daemon included, and systemd counts death by
    # SIGPIPE as a clean exit: Restart=on-failure did not restart it. Python's own choice, ignored, makes it
    # an EPIPE error the code handles.
    proc, _ = start_agent(tmp_path, broker, notify, watchdog_s=30.0)
    try:
        notify.wait_for("READY=1", 20)
        proc.send_signal(signal.SIGPIPE)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # stopped by the SIGTERM, cleanly: not ended by the SIGPIPE before it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_metrics_thread_and_the_telemetry_lane_are_watched_too(service):
    """The metrics endpoint's thread could die and the lane could hang without the watchdog noticing:
    Prometheus saw the edge vanish, systemd saw a healthy agent (the deployment review's note)."""
    assert service.wedged() == []
    service.collection.lane.heartbeat -= 60  # the lane looks at least every 30 s when nothing waits
    assert "telemetry-lane silent for 60 s" in service.wedged()
    service.collection.lane.heartbeat += 60
    service.metrics_server._server.shutdown()  # its serve_forever returns: the thread ends
    service.metrics_server._thread.join(5)
    assert "metrics-http thread died" in service.wedged()


def test_a_frame_handler_that_never_returns_is_a_wedge(service, backend, monkeypatch):
    """The notifier thread hands every frame to its handlers; one that never returns stops every frame
    after it, and only timeouts showed it: the workers were not wedged, so the watchdog kept pinging.
    A tap (what a functional collection adds) that blocks on an event is that handler, for real."""
    from agent.system import health

    monkeypatch.setattr(health, "DISPATCH_STUCK_S", 0.2)
    owner = service.runtime.owner
    release = threading.Event()
    entered = threading.Event()

    def stuck(msg):
        entered.set()
        release.wait(30)

    owner.tap(stuck)
    try:
        backend.send({"id": f"stuck-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data",
                      "params": {"data": "vin"}})
        assert entered.wait(10)  # the ECU's answer reached the handler, which does not return
        assert wait_until(lambda: any("CAN notifier stuck in a frame handler" in p for p in service.wedged()), 5)
    finally:
        owner.untap(stuck)
        release.set()
    assert wait_until(lambda: service.wedged() == [], 5)


def test_the_store_writer_thread_is_watched(service, backend):
    """The store's writer thread (it commits what no caller waits for: finals riding a start mark, outbox
    deletes) was the one long-lived thread the watchdog did not look at. A thread standing in for a dead
    writer (one that has ended) is a wedge now."""
    import threading

    body = {"id": f"sw-{time.monotonic_ns()}", "component": "engine", "command": "read_data", "params": {"data": "vin"}}
    backend.send(body)
    assert backend.final(body["id"])["status"] == "completed"
    assert service.wedged() == []
    real, ended = service.store._writer, threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    service.store._writer = ended
    try:
        assert "store-writer thread died" in service.wedged()
    finally:
        service.store._writer = real


def test_a_main_loop_that_fails_still_stops_the_service_cleanly(service, backend, monkeypatch, caplog):
    """An exception in a health check (a bug) left the main loop with the service running under it: no
    offline status, and commands marked started were reported interrupted after the restart instead of
    being queued again. The loop's failure is logged and the service stopped as on SIGTERM."""
    import threading

    from agent.system.daemon import run_until_stopped
    from agent.system.sdnotify import SystemdNotifier

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    def broken():
        raise KeyError("a bug in a health check")

    monkeypatch.setattr(service, "health", broken)
    assert run_until_stopped(service, threading.Event(), 1.0, SystemdNotifier()) is False
    assert backend.wait_status("offline", 10)
    assert any("the main loop failed" in r.getMessage() and r.exc_info for r in caplog.records)
