"""Chaos run: streams commands at a real agent while SIGKILLing it and the broker, then counts.

    python -m bench.chaos [--commands 1000] [--rate 40] [--kills 6] [--seed 1]

A private Mosquitto (persistence, autosave_on_changes) and `sovd-edge run` with its simulated ECUs
in-process; the simulator journals every request it executes (`--sim-journal`), which outlives a
SIGKILL. A backend with a persistent session streams `operation` commands (each names its own
routine data, so the journal tells which id ran) and, as the protocol asks of a backend, resends
the ids that got no final answer. Kills alternate between agent and broker at random points of the
stream. Prints JSON: sent, finals per id, executions per id, lost (no final), run twice, silent
(ran but never answered), and the statuses. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.devtools.local_broker import LocalBroker

ROOT = Path(__file__).resolve().parent.parent
VEHICLE = "CHAOS0VEHICLE0001"
DEADLINE_S = 900.0  # the whole run stops by itself after this


class Backend:
    """A fleet backend's client: persistent session, QoS 1, records every final per id."""

    def __init__(self, port: int) -> None:
        self.finals: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        self.events: list[dict[str, Any]] = []
        self._mids: dict[int, str] = {}
        self.acked_ids: set[str] = set()
        self.online = threading.Event()
        self._lock = threading.Lock()
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="chaos-backend",
                                   protocol=mqtt.MQTTv5)
        self._client.reconnect_delay_set(0.2, 2.0)
        self._client.on_connect = self._connected
        self._client.on_message = self._message
        self._client.on_publish = self._published
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self._client.connect("127.0.0.1", port, keepalive=10, clean_start=False, properties=properties)
        self._client.loop_start()

    def _connected(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe(f"sovd/{VEHICLE}/responses/+", qos=1)
        client.subscribe(f"sovd/{VEHICLE}/events", qos=1)
        client.subscribe(f"sovd/{VEHICLE}/status", qos=1)

    def _message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(message.payload)
        except ValueError:
            return
        with self._lock:
            if message.topic.endswith("/status") and isinstance(body, dict) and body.get("state") == "online":
                self.online.set()
            if message.topic.endswith("/events"):
                self.events.append(body)
            elif isinstance(body, dict) and body.get("final") is True:
                self.finals[str(body.get("id"))].append(body)

    def _published(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            command_id = self._mids.pop(mid, None)
            if command_id is not None:
                self.acked_ids.add(command_id)

    def send(self, body: dict[str, Any]) -> None:
        """Queued by paho while the broker is away, resent after the reconnect (QoS 1)."""
        info = self._client.publish(f"sovd/{VEHICLE}/commands", json.dumps(body).encode(), qos=1)
        with self._lock:
            self._mids[info.mid] = body["id"]

    def without_final(self, ids: list[str]) -> list[str]:
        with self._lock:
            return [i for i in ids if not self.finals.get(i)]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Agent:
    """`sovd-edge run` as a child process, restartable, SIGKILLable."""

    def __init__(self, workdir: Path, broker_url: str) -> None:
        self.journal = workdir / "journal"
        self.log = workdir / "agent.log"
        config = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
        sim = yaml.safe_load((ROOT / "config/sim/demo-vehicle.yaml").read_text())
        sim["ecus"][0]["faults"] = [{"service": 0x31, "delay_ms": 20}]  # so that kills land mid-command
        (workdir / "sim.yaml").write_text(yaml.safe_dump(sim))
        config.update(vehicle=VEHICLE, simulate=[str(workdir / "sim.yaml")], state_dir=str(workdir / "state"),
                      metrics={"enabled": False})
        config["bus"]["channel"] = f"chaos-{random.randrange(1 << 30):x}"
        config["mqtt"] = {"broker": broker_url, "keepalive_s": 5}
        (workdir / "agent.yaml").write_text(yaml.safe_dump(config))
        self.args = [sys.executable, "-m", "agent", "run", "-c", str(workdir / "agent.yaml"),
                     "--sim-journal", str(self.journal), "--log-format", "json"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log.open("ab"))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def executions(self) -> collections.Counter[str]:
        """Executed routine data (the id's number, hex) -> how often the simulated ECU ran it."""
        lines = self.journal.read_text().splitlines() if self.journal.exists() else []
        return collections.Counter(line.removeprefix("engine 31010203") for line in lines
                                   if line.startswith("engine 31010203"))


def command(n: int) -> dict[str, Any]:
    return {"id": f"chaos-{n:05d}", "component": "engine", "command": "operation",
            "params": {"routine": "self_test", "action": "start", "data": f"{n:08x}"}}


def run(commands: int, rate: float, kills: int, seed: int, workdir: Path) -> dict[str, Any]:
    random.seed(seed)
    started = time.monotonic()
    broker = LocalBroker(workdir / "broker", extra="autosave_on_changes true\n").start()  # save on every change
    agent = Agent(workdir, broker.url)
    agent.start()
    backend = Backend(broker.port)
    if not backend.online.wait(60):  # the agent's session (its subscription) exists from here on
        raise RuntimeError(f"the agent did not come online; see {agent.log}")
    bodies = [command(n) for n in range(commands)]
    kill_at = sorted(random.sample(range(commands // 10, commands - commands // 20), kills))
    killed = {"agent": 0, "broker": 0}
    try:
        for n, body in enumerate(bodies):
            if kill_at and n == kill_at[0]:
                kill_at.pop(0)
                victim = "agent" if (killed["agent"] + killed["broker"]) % 2 == 0 else "broker"
                killed[victim] += 1
                if victim == "agent":
                    agent.kill()
                    time.sleep(random.uniform(0.2, 1.5))
                    agent.start()
                else:
                    broker.kill()
                    time.sleep(random.uniform(0.2, 1.5))
                    broker.start()
            backend.send(body)
            time.sleep(1 / rate)
        ids = [b["id"] for b in bodies]
        resent = 0
        for _round in range(4):  # a backend resends ids without a final answer (exactly once per id holds)
            _wait_quiet(backend, ids, started)
            missing = backend.without_final(ids)
            if not missing:
                break
            resent += len(missing)
            for command_id in missing:
                backend.send(bodies[int(command_id.split("-")[1])])
        _wait_quiet(backend, ids, started)
    finally:
        exit_code = agent.stop()
        backend.close()
        broker.stop()
    executions = agent.executions()
    finals = {i: backend.finals.get(i, []) for i in ids}
    runs = {i: executions.get(f"{int(i.split('-')[1]):08x}", 0) for i in ids}
    statuses = collections.Counter(_status(f[0]) for f in finals.values() if f)
    inconsistent = [i for i in ids if finals[i] and {f["status"] for f in finals[i]} != {finals[i][0]["status"]}]
    return {
        "commands": commands,
        "sent": len(ids),
        "acknowledged_by_broker": len(backend.acked_ids),
        "resent_without_final": resent,
        "kills": killed,
        "finals_per_id": dict(sorted(collections.Counter(len(f) for f in finals.values()).items())),
        "executions_per_id": dict(sorted(collections.Counter(runs.values()).items())),
        "statuses": dict(statuses),
        "lost": sum(1 for f in finals.values() if not f),
        "run_twice": sum(1 for r in runs.values() if r > 1),
        "silent": sum(1 for i in ids if runs[i] and not finals[i]),
        "completed_without_execution": sum(1 for i in ids if finals[i] and finals[i][0]["status"] == "completed"
                                           and runs[i] == 0),
        "conflicting_finals": len(inconsistent),
        "interrupted_after_executing": sum(1 for i in ids if finals[i] and finals[i][0]["status"] == "interrupted"
                                           and runs[i] == 1),
        "agent_exit_code": exit_code,
        "events": dict(collections.Counter(e.get("type") for e in backend.events)),
        "duration_s": round(time.monotonic() - started, 1),
        "workdir": str(workdir),
    }


def _status(final: dict[str, Any]) -> str:
    code = (final.get("error") or {}).get("code")
    return f"{final['status']}/{code}" if code and code != final["status"] else final["status"]


def _wait_quiet(backend: Backend, ids: list[str], started: float, quiet_s: float = 20.0) -> None:
    """Waits until every id has a final, or nothing new arrived for `quiet_s`, or the deadline."""
    last, seen = time.monotonic(), -1
    while time.monotonic() - started < DEADLINE_S:
        missing = len(backend.without_final(ids))
        if missing == 0:
            return
        if missing != seen:
            last, seen = time.monotonic(), missing
        elif time.monotonic() - last > quiet_s:
            return
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=40.0, help="commands per second")
    parser.add_argument("--kills", type=int, default=6, help="SIGKILLs, alternating agent and broker")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="keep logs and state here (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sovd-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = run(args.commands, args.rate, args.kills, args.seed, workdir)
    print(json.dumps(result, indent=2))
    ok = result["lost"] == 0 and result["run_twice"] == 0 and result["silent"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
