"""Helpers for the MQTT suites: schema validation of every published message, agent processes."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import yaml
from conftest import DATA, ROOT

from agent.config.model import AgentConfig
from agent.fleet.caller import Caller, Seen

_DOC = yaml.safe_load((ROOT / "docs/asyncapi.yaml").read_text())


def schema(name: str) -> dict:
    """A validator root for one of the AsyncAPI document's schemas ($refs resolve inside the document)."""
    return {**_DOC, "$ref": f"#/components/schemas/{name}"}


VALIDATORS = {name: jsonschema.Draft7Validator(schema(name))
              for name in ("Command", "SignedCommand", "Response", "Status", "Event", "Plan", "Telemetry", "State")}


def validate_published(seen: list[Seen], base: str) -> int:
    """Validates every message the agent published under `base` (plus custom reply topics); returns the count."""
    checked = 0
    for message in seen:
        if message.topic == f"{base}/commands":
            continue
        if message.topic.startswith(f"{base}/plans/"):  # the backend's own (test plans may be invalid on purpose)
            continue
        if message.topic == f"{base}/telemetry":
            kind = "Telemetry"
        elif message.topic.startswith(f"{base}/state/"):
            kind = "State"
        elif message.topic == f"{base}/status":
            kind = "Status"
        elif message.topic == f"{base}/events":
            kind = "Event"
        else:
            kind = "Response"
        body = json.loads(message.payload)
        errors = sorted(VALIDATORS[kind].iter_errors(body), key=str)
        assert not errors, f"{message.topic}: {body} violates {kind}: {[e.message for e in errors]}"
        checked += 1
    return checked


def daemon_files(tmp_path: Path, broker_url: str, vehicle: str, channel: str, faults: list | None = None) -> Path:
    """The test vehicle's config and simulator files for a daemon run as a process (`AgentProcess`), its
    engine given `faults`; returns the config's path."""
    sim = yaml.safe_load((DATA / "vehicle-sim.yaml").read_text())
    if faults:
        sim["ecus"][0]["faults"] = faults
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(sim))
    config = yaml.safe_load((DATA / "vehicle.yaml").read_text())
    config.update(vehicle=vehicle, simulate=[str(tmp_path / "sim.yaml")], state_dir=str(tmp_path / "state"))
    config["bus"]["channel"] = channel
    config["mqtt"] = {"broker": broker_url, "keepalive_s": 5}
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "agent.yaml"


class AgentProcess:
    """`sovd-edge run` as a child process (for SIGKILL, restart and Last Will tests)."""

    def __init__(self, config: Path, broker: str, state_dir: Path, journal: Path | None = None) -> None:
        self.args = [sys.executable, "-m", "agent", "run", "-c", str(config), "--broker", broker,
                     "--state-dir", str(state_dir), "--log-format", "json"]
        if journal:
            self.args += ["--sim-journal", str(journal)]
        state_dir.mkdir(parents=True, exist_ok=True)
        self.log = state_dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_for: str = '"message": "connected to broker"', timeout: float = 20) -> AgentProcess:
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log.open("ab"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if wait_for in self.log.read_text()[offset:]:
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.log.read_text()[offset:]}")
            time.sleep(0.05)
        raise AssertionError(f"agent not ready: {self.log.read_text()[offset:]}")

    def log_count(self, text: str) -> int:
        """How often `text` appears in the agent's log so far (over all its runs)."""
        return self.log.read_text().count(text) if self.log.exists() else 0

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def agent_and_backend(config: AgentConfig):
    """The agent in-process and a backend watching every topic of the vehicle, once the agent's subscription
    is in place (it subscribes before it publishes `online`); every message published is validated against
    the schemas afterwards."""
    from agent.system.service import Service

    with Caller(config.mqtt, config.vehicle) as backend:
        backend.subscribe(f"{backend.topics.base}/#")
        svc = Service(config)
        svc.start()
        try:
            assert svc.link.wait_connected(10), svc.link.last_error
            backend.wait_status("online", 10)
            yield svc, backend
        finally:
            svc.stop()
        validate_published(backend.seen, backend.topics.base)
