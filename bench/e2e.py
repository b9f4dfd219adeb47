"""End to end through a real Mosquitto: the backend's view of the agent and of the naive bridge.

The backend here is the measuring instrument, the same for every subject: one paho client per
broker (TCP_NODELAY on its own socket, so the instrument adds no Nagle delay of its own), subscribed
to every subject's responses. A command's latency runs from just before its PUBLISH to the arrival
of its final response. Every final response is checked: `completed` with the demo's VIN.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from bench.configs import COMPONENTS, VIN
from bench.procs import Subject

REPLY_TIMEOUT_S = 15.0
SETTLE_S = 0.3  # after the last final: acknowledgements and outbox bookkeeping still belong to the phase
Done = Callable[[float, dict[str, Any] | None], None]


class Backend:
    """A paho client on one broker that sends commands and calls back on their final responses."""

    def __init__(self, url: str) -> None:
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                   client_id=f"bench-backend-{id(self):x}", protocol=mqtt.MQTTv5)
        self._client.on_socket_open = lambda c, u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._client.on_message = self._message
        self._client.max_inflight_messages_set(1000)
        self._pending: dict[str, tuple[float, Done]] = {}
        self._lock = threading.Lock()
        self.foreign = 0  # final responses nobody waited for (late, duplicated or unparseable)
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self._client.connect(host, int(port))
        self._client.loop_start()
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.subscribe("sovd/+/responses/#", qos=1)
        if not subscribed.wait(10):
            raise RuntimeError(f"backend could not subscribe on {url}")

    def send(self, vehicle: str, component: str, command_id: str, done: Done) -> None:
        body = {"id": command_id, "component": component, "command": "read_data", "params": {"data": "vin"}}
        with self._lock:
            self._pending[command_id] = (time.perf_counter(), done)
        self._client.publish(f"sovd/{vehicle}/commands", json.dumps(body), qos=1)

    def forget(self, command_id: str) -> None:
        with self._lock:
            self._pending.pop(command_id, None)

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        try:
            body = json.loads(message.payload)
            if not body.get("final"):
                return
            with self._lock:
                sent, done = self._pending.pop(body["id"])
        except (ValueError, AttributeError, KeyError, TypeError):
            self.foreign += 1
            return
        done(now - sent, body)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def correct(body: dict[str, Any] | None) -> bool:
    return bool(body) and body.get("status") == "completed" and body.get("result") == {"values": {"vin": VIN}}


@dataclass
class Phase:
    """What one phase of one subject produced."""

    latencies_ms: list[float] = field(default_factory=list)
    completed: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    cpu_ns: int = 0
    context_switches: int = 0
    syncs: int | None = None
    sync_calls: dict[str, int] | None = None  # the same, per syscall (fdatasync, fsync)

    def as_dict(self) -> dict[str, Any]:
        return {"commands": self.completed, "errors": self.errors, "elapsed_s": round(self.elapsed_s, 3),
                "cpu_ns": self.cpu_ns, "context_switches": self.context_switches, "fsyncs": self.syncs}


_ids = itertools.count()


def _next_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def round_trip(backend: Backend, vehicle: str, component: str, timeout: float) -> tuple[float, dict[str, Any] | None]:
    """One command, waited for: (seconds, final response or None on timeout)."""
    got: list[tuple[float, dict[str, Any] | None]] = []
    event = threading.Event()

    def done(latency: float, body: dict[str, Any] | None) -> None:
        got.append((latency, body))
        event.set()

    command_id = _next_id("rt")
    backend.send(vehicle, component, command_id, done)
    if not event.wait(timeout):
        backend.forget(command_id)
        return timeout, None
    return got[0]


def wait_answering(backend: Backend, subject: Subject, timeout: float = 60.0, warmup: int = 3) -> None:
    """Until the subject answers (its subscription is in place), then a few warm-up commands per component."""
    deadline = time.monotonic() + timeout
    while True:
        _, body = round_trip(backend, subject.vehicle, COMPONENTS[0], 1.0)
        if correct(body):
            break
        if subject.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{subject.name} does not answer: {body}; log: {subject.log_tail()}")
    for component in COMPONENTS * warmup:
        _, body = round_trip(backend, subject.vehicle, component, REPLY_TIMEOUT_S)
        if not correct(body):
            raise RuntimeError(f"{subject.name} answered a warm-up command with {body}")


def _alive(subject: Subject) -> None:
    """A subject that died ends the run at once (its phases would otherwise time out command by command)."""
    if subject.proc.poll() is not None:
        raise RuntimeError(f"{subject.name} exited with {subject.proc.returncode}; log: {subject.log_tail()}")


def _account(phase: Phase, subject: Subject, measure: Callable[[], None]) -> Phase:
    before = subject.probe.read()
    measure()
    time.sleep(SETTLE_S)
    spent = subject.probe.read() - before
    phase.cpu_ns, phase.context_switches, phase.syncs = spent.cpu_ns, spent.context_switches, spent.sync_total
    phase.sync_calls = spent.syncs
    return phase


def one_at_a_time(backend: Backend, subject: Subject, count: int) -> Phase:
    """`count` commands, each sent when the previous one's final response arrived, across the components."""
    phase = Phase()

    def measure() -> None:
        start = time.perf_counter()
        for i in range(count):
            latency, body = round_trip(backend, subject.vehicle, COMPONENTS[i % len(COMPONENTS)], REPLY_TIMEOUT_S)
            if correct(body):
                phase.completed += 1
                phase.latencies_ms.append(latency * 1000)
            else:
                phase.errors += 1
                _alive(subject)
        phase.elapsed_s = time.perf_counter() - start

    return _account(phase, subject, measure)


def under_load(backend: Backend, subject: Subject, duration_s: float, window: int) -> Phase:
    """`window` commands outstanding per component for `duration_s`, then the stragglers are waited for.

    Throughput = completed / (last final - first publish).
    """
    phase = Phase()
    lock = threading.Lock()
    outstanding = {c: 0 for c in COMPONENTS}
    finished = threading.Event()
    state = {"stop_at": 0.0, "last": 0.0}

    def issue(component: str) -> None:
        with lock:
            outstanding[component] += 1
        backend.send(subject.vehicle, component, _next_id("tp"), lambda lat, body: done(component, lat, body))

    def done(component: str, latency: float, body: dict[str, Any] | None) -> None:
        with lock:
            outstanding[component] -= 1
            state["last"] = time.perf_counter()
            if correct(body):
                phase.completed += 1
                phase.latencies_ms.append(latency * 1000)
            else:
                phase.errors += 1
            again = state["last"] < state["stop_at"]
            if not again and not any(outstanding.values()):
                finished.set()
        if again:
            issue(component)

    def measure() -> None:
        start = time.perf_counter()
        state["stop_at"] = start + duration_s
        for component in COMPONENTS:
            for _ in range(window):
                issue(component)
        if not finished.wait(duration_s + REPLY_TIMEOUT_S):
            _alive(subject)
            with lock:
                phase.errors += sum(outstanding.values())
        phase.elapsed_s = (state["last"] or time.perf_counter()) - start

    return _account(phase, subject, measure)
