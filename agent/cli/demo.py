"""`sovd-edge demo`: the agent's main job on the demo vehicle: a private Mosquitto, `sovd-edge run`
with simulated ECUs, and a few `sovd-edge call` round trips as a backend would make them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.cli import common as c
from agent.config.model import AgentConfig
from agent.devtools.local_broker import BrokerUnavailableError, LocalBroker, free_port
from agent.fleet.caller import Caller
from agent.system.local import BusUnavailableError, LocalSession
from agent.wire.command import Status
from agent.wire.messages import response_message


@dataclass(frozen=True)
class Step:
    component: str
    command: str
    params: dict[str, Any]
    expect: Status = Status.COMPLETED
    relies_on: str = ""  # ECU state an earlier step left behind, said next to the step in the transcript


_EXTENDED = "the extended session that set_session opened above"
STEPS = (
    Step("engine", "read_data", {"data": ["vin", "engine_speed", "coolant_temperature"]}),
    Step("engine", "read_faults", {"snapshots": True}),
    Step("engine", "set_session", {"session": "extended"}),
    Step("engine", "security_access", {"level": 1}, relies_on=_EXTENDED),
    Step("engine", "write_data", {"data": "idle_mode", "value": "high"}, relies_on=_EXTENDED),
    Step("abs", "read_data", {"data": ["vin", "wheel_speeds"]}),
    Step("abs", "clear_faults", {}, expect=Status.REJECTED),  # not allowed for abs by the config's policy
    Step("adas", "read_data", {"data": "calibration"}),
)

EXITS = {
    **c.ALWAYS,
    c.EXIT_OK: "every step answered as expected",
    c.EXIT_NOT_COMPLETED: "a step did not answer as expected (the transcript shows which)",
    c.EXIT_UNAVAILABLE: "Mosquitto is missing, the agent did not connect, or (--local) the CAN bus did not open",
    c.EXIT_CONFIG: c.CONFIG_EXIT + ", or a config without the demo's simulated ECUs",
}


def add_parser(sub: Any) -> None:
    p = c.add_subcommand(sub, "demo", "Show the agent at work on the simulated demo vehicle, over a local MQTT broker.",
                         "sovd-edge demo -c config/demo.yaml", EXITS, c.with_agent_config(handle))
    c.add_config_flag(p, "agent config with simulated ECUs", default="config/demo.yaml")
    p.add_argument("--local", action="store_true", help="no broker: run the commands in-process instead")
    c.add_logging_flags(p, "WARNING")


def handle(args: argparse.Namespace, config: AgentConfig) -> int:
    unfit = _unfit(config)
    if unfit:
        c.fail(args, f"{args.config} {unfit}; the demo needs config/demo.yaml or a copy of it")
        return c.EXIT_CONFIG
    if args.local:
        return _local(args, config)
    with tempfile.TemporaryDirectory(prefix="sovd-demo-") as tmp:
        try:
            broker = LocalBroker(Path(tmp) / "broker").start()
        except BrokerUnavailableError as err:
            c.fail(args, f"{err}. Run hw/dev-setup, or use --local.")
            return c.EXIT_UNAVAILABLE
        try:
            return _over_mqtt(args, config, broker, Path(tmp))
        finally:
            broker.stop()


def _unfit(config: AgentConfig) -> str:
    """Why the demo's steps cannot run on this config ("" when they can)."""
    if not config.simulate:
        return "runs no simulated ECUs (no simulate: list)"
    missing = sorted({step.component for step in STEPS} - {ecu.name for ecu in config.ecus})
    return f"has no component {', '.join(missing)}" if missing else ""


def _over_mqtt(args: argparse.Namespace, config: AgentConfig, broker: LocalBroker, tmp: Path) -> int:
    me = [sys.executable, "-m", "agent"]
    log = tmp / "agent.log"
    print(f"# a private Mosquitto on {broker.url}; the agent runs with {args.config} (simulated ECUs)")
    print(f"$ sovd-edge run -c {args.config} --broker {broker.url}   (log: journald-style JSON lines)\n")
    metrics_port = free_port()
    agent = subprocess.Popen([*me, "run", "-c", args.config, "--broker", broker.url, "--state-dir", str(tmp / "state"),
                              "--metrics-listen", f"127.0.0.1:{metrics_port}", "--log-format", "json"],
                             stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    call = [*me, "call", "-c", args.config, "--broker", broker.url]
    try:
        if not _wait_for(log, "connected to broker", 20):
            last = log.read_text().strip().splitlines()[-1:] or ["(no log)"]
            c.fail(args, f"the agent did not connect to {broker.url}; its last log line: {last[0]}")
            return c.EXIT_UNAVAILABLE
        print(f"# `sovd-edge call` below stands for: sovd-edge call -c {args.config} --broker {broker.url}\n")
        failures = 0 if _show([*call, "--status"], "sovd-edge call --status") == c.EXIT_OK else 1
        for step in STEPS:
            if step.relies_on:
                print(f"# relies on {step.relies_on}: the agent keeps a component's session between commands")
            words = _param_args(step.params)
            shown = " ".join([step.component, step.command, *(shlex.quote(w) for w in words)])
            rc = _show([*call, step.component, step.command, *words], f"sovd-edge call {shown}")
            failures += rc != (c.EXIT_OK if step.expect is Status.COMPLETED else c.EXIT_NOT_COMPLETED)
        failures += _show_collection(config, broker, call, metrics_port)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
    print("$ kill -TERM <agent>   # a clean stop publishes the retained offline status, since the time it stopped")
    _show([*call, "--status"], "sovd-edge call --status")
    return c.EXIT_OK if failures == 0 else c.EXIT_NOT_COMPLETED


DEMO_PLAN = {
    "name": "demo", "version": 1,
    "signals": [{"component": "engine", "data": ["engine_speed", "coolant_temperature"], "every_ms": 500,
                 "export": True},
                {"component": "abs", "data": ["wheel_speeds"], "every_ms": 1000, "on_change": True}],
    "faults": [{"component": "engine", "every_ms": 2000}],
    "batch": {"max_age_ms": 1500, "max_samples": 100},
}
BATCHES_SHOWN = 3


def _show_collection(config: AgentConfig, broker: LocalBroker, call: list[str], metrics_port: int) -> int:
    """A retained plan applied, then a few telemetry batches as the backend receives them; 1 if they do not come."""
    demo = dataclasses.replace(config.mqtt, broker=broker.url)
    with Caller(demo, config.vehicle) as backend:
        base = backend.topics.base
        backend.subscribe(f"{base}/events")
        backend.subscribe(f"{base}/telemetry")
        backend.subscribe(f"{base}/state/+")
        print("# collection: the backend publishes a retained plan; the agent reads on its own from now on.")
        print("# Collection waits while a command holds a component in a non-default session: engine goes back")
        print("# to the default session first (its extended session above would otherwise hold collection off)")
        reset = _show([*call, "engine", "set_session", "session=default"], "sovd-edge call engine set_session "
                                                                             "session=default")
        print(f"$ mosquitto_pub -q 1 -r -t {backend.topics.plans('demo')} -m '{json.dumps(DEMO_PLAN)}'")
        backend.publish_plan("demo", DEMO_PLAN)
        try:
            applied = backend.wait_for(lambda s: s.topic.endswith("/events") and s.json()["type"] in (
                "plan_applied", "plan_rejected"), 10)[0]
            print("  " + json.dumps(_brief(applied.json())))
            batches = backend.wait_for(lambda s: s.topic.endswith("/telemetry"), 15, BATCHES_SHOWN)
        except TimeoutError as err:
            print(f"  no telemetry: {err}\n")
            backend.publish_plan("demo", None)
            return 1
        print(f"$ mosquitto_sub -t {base}/telemetry   # {BATCHES_SHOWN} batches, one every max_age_ms")
        for batch in batches:
            body = batch.json()
            print(f"  plan {body['plan']} v{body['version']} seq {body['seq']}: " + ", ".join(
                f"{s['component']}.{s['data']}={json.dumps(_brief(s['value']))}" for s in body["samples"][:6])
                + (f" (+{len(body['samples']) - 6} more)" if len(body["samples"]) > 6 else ""))
        states = [s for s in backend.seen if "/state/" in s.topic]
        if states:
            print(f"$ mosquitto_sub -t '{base}/state/+'   # retained last-known state, per component")
            print("  " + json.dumps(_brief(states[-1].json()))[:300])
        faults_ok = _show_fault_changes(backend, call)
        print()
        _show_metrics(metrics_port)  # with the plan's exported gauges, before the plan goes
        backend.publish_plan("demo", None)  # the demo leaves no retained plan behind
    return 0 if reset == c.EXIT_OK and faults_ok else 1


def _show_fault_changes(backend: Caller, call: list[str]) -> bool:
    """The engine's faults cleared by a command; the plan's next fault reading reports each one `cleared`
    as a fault_changed Event (the backend hears of it without polling). False if the Events do not come."""
    print("# the workshop clears the engine's faults; the plan's next fault reading (every 2 s) reports each change")
    if _show([*call, "engine", "clear_faults"], "sovd-edge call engine clear_faults") != c.EXIT_OK:
        return False
    print(f"$ mosquitto_sub -t {backend.topics.events}   # fault_changed Events")
    try:
        changes = backend.wait_for(lambda s: s.topic.endswith("/events") and s.json()["type"] == "fault_changed"
                                   and s.json()["change"] == "cleared", 15, 3)
    except TimeoutError as err:
        print(f"  no fault_changed Events: {err}")
        return False
    for change in changes:
        body = change.json()
        print(f"  {body['component']} {body['code']} {body['change']}: status {body['previous']['raw']} -> "
              f"{body['status']['raw']}" + (f" ({body['text']})" if body.get("text") else ""))
    return True


def _show_metrics(port: int) -> None:
    """A few lines of what Prometheus scrapes from the agent."""
    shown = ("commands_executed_total", "sovd_mqtt_connected", "sovd_ecu_value", "sovd_collection_readings_total")
    print(f"$ curl -s http://127.0.0.1:{port}/metrics | grep -E '^({'|'.join(shown)})'")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(shown) and not line.endswith(" 0.0"):
            print("  " + line)
    print()


def _param_args(params: dict[str, Any]) -> list[str]:
    """`key=value` words as `sovd-edge call`/`uds` take them: text as is, several DIDs as a,b, else JSON."""
    def word(value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)
        return json.dumps(value)

    return [f"{key}={word(value)}" for key, value in params.items()]


def _show(argv: list[str], shown: str) -> int:
    print(f"$ {shown}")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    for line in result.stdout.splitlines():
        print("  " + _brief_line(line))
    if result.stderr.strip():
        print("  " + result.stderr.strip())
    print()
    return result.returncode


def _brief_line(line: str) -> str:
    try:
        return json.dumps(_brief(json.loads(line)), ensure_ascii=False)
    except ValueError:
        return line


def _wait_for(log: Path, text: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text():
            return True
        time.sleep(0.05)
    return False


def _local(args: argparse.Namespace, config: AgentConfig) -> int:
    failures = 0
    companions = c.simulated_ecus(args, config)
    if companions is None:
        return c.EXIT_CONFIG
    try:
        with LocalSession(config, companions=companions) as session:
            for step in STEPS:
                result = session.run(step.component, step.command, step.params)
                if step.relies_on:
                    print(f"# relies on {step.relies_on}, in this demo's one session; typed alone, "
                          f"`sovd-edge uds` starts in the default session, where the ECU refuses it (NRC 0x7F)")
                shown = " ".join(shlex.quote(word) for word in _param_args(step.params))
                print(f"$ sovd-edge uds -c {args.config} {step.component} {step.command} {shown}".rstrip())
                print(json.dumps(_brief(response_message(result, seq=1)), indent=2), end="\n\n")
                failures += result.status is not step.expect
    except BusUnavailableError as err:
        c.fail(args, f"CAN bus unavailable: {err}")
        return c.EXIT_UNAVAILABLE
    return c.EXIT_OK if failures == 0 else c.EXIT_NOT_COMPLETED


def _brief(message: Any) -> Any:
    """Long raw values shortened and timestamps left out, so the transcript stays readable."""
    if isinstance(message, dict):
        return {k: _brief(v) for k, v in message.items() if k not in ("received_at", "started_at", "finished_at")}
    if isinstance(message, list):
        return [_brief(v) for v in message]
    if isinstance(message, str) and len(message) > 72:
        return f"{message[:64]}... ({len(message) // 2} bytes)"
    return message
