"""`sovd-edge demo`: the agent's main job on the demo vehicle: a private Mosquitto, `sovd-edge run`
with simulated ECUs, and a few `sovd-edge call` round trips as a backend would make them."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from agent.cli.common import (
    EXIT_CONFIG,
    EXIT_NOT_COMPLETED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    add_logging_flags,
    add_subcommand,
    configure_logging,
    load_or_report,
)
from agent.devtools.local_broker import BrokerUnavailableError, LocalBroker, free_port
from agent.devtools.sim.simulator import simulators_for
from agent.system.local import BusUnavailableError, LocalSession
from agent.wire.command import Status
from agent.wire.messages import response_message

STEPS: list[tuple[str, str, dict[str, Any]]] = [
    ("engine", "read_data", {"data": ["vin", "engine_speed", "coolant_temperature"]}),
    ("engine", "read_faults", {"snapshots": True}),
    ("engine", "set_session", {"session": "extended"}),
    ("engine", "security_access", {"level": 1}),
    ("engine", "write_data", {"data": "idle_mode", "value": "high"}),
    ("abs", "read_data", {"data": ["vin", "wheel_speeds"]}),
    ("abs", "clear_faults", {}),  # not allowed for abs by the config's policy: rejected
    ("adas", "read_data", {"data": "calibration"}),
]


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "demo", "Show the agent at work on the simulated demo vehicle, over a local MQTT broker.",
                       "sovd-edge demo -c config/demo.yaml")
    p.add_argument("-c", "--config", default="config/demo.yaml", help="agent config with simulated ECUs")
    p.add_argument("--local", action="store_true", help="no broker: run the commands in-process instead")
    add_logging_flags(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    configure_logging(args, "WARNING")
    if args.local:
        return _local(args, config)
    with tempfile.TemporaryDirectory(prefix="sovd-demo-") as tmp:
        try:
            broker = LocalBroker(Path(tmp) / "broker").start()
        except BrokerUnavailableError as err:
            print(f"sovd-edge demo: {err}. Run hw/dev-setup, or use --local.", file=sys.stderr)
            return EXIT_UNAVAILABLE
        try:
            return _over_mqtt(args, broker, Path(tmp))
        finally:
            broker.stop()


def _over_mqtt(args: argparse.Namespace, broker: LocalBroker, tmp: Path) -> int:
    me = [sys.executable, "-m", "agent"]
    log = tmp / "agent.log"
    print(f"# a private Mosquitto on {broker.url}; the agent runs with {args.config} (simulated ECUs)")
    print(f"$ sovd-edge run -c {args.config} --broker {broker.url}   (log: journald-style JSON lines)\n")
    metrics_port = free_port()
    agent = subprocess.Popen([*me, "run", "-c", args.config, "--broker", broker.url, "--state-dir", str(tmp / "state"),
                              "--metrics-listen", f"127.0.0.1:{metrics_port}", "--log-format", "json"],
                             stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        if not _wait_for(log, "connected to broker", 20):
            print(f"sovd-edge demo: the agent did not connect:\n{log.read_text()[-3000:]}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        call = [*me, "call", "-c", args.config, "--broker", broker.url]
        failures = _show([*call, "--status"], "sovd-edge call --status")
        for component, command, params in STEPS:
            shown = " ".join(shlex.quote(arg) for arg in _param_args(params))
            words = [component, command] + ([shown] if shown else [])
            rc = _show([*call, component, command, *_param_args(params)], "sovd-edge call " + " ".join(words))
            failures += 0 if rc in (0, 1) else 1
        _show_metrics(metrics_port)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
    print("$ kill -TERM <agent>   # a clean stop publishes the retained offline status")
    _show([*call, "--status"], "sovd-edge call --status")
    return EXIT_OK if failures == 0 else EXIT_NOT_COMPLETED


def _show_metrics(port: int) -> None:
    """A few lines of what Prometheus scrapes from the agent."""
    print(f"$ curl -s http://127.0.0.1:{port}/metrics | grep -E '^(commands_executed_total|sovd_mqtt_connected)'")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(("commands_executed_total", "sovd_mqtt_connected")) and not line.endswith(" 0.0"):
            print("  " + line)
    print()


def _param_args(params: dict[str, Any]) -> list[str]:
    """`key=value` arguments as `sovd-edge call`/`uds` take them (strings bare, the rest as JSON)."""
    return [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items()]


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


def _local(args: argparse.Namespace, config: Any) -> int:
    failures = 0
    try:
        with LocalSession(config, companions=simulators_for(config)) as session:
            for component, command, params in STEPS:
                result = session.run(component, command, params)
                shown = " ".join(shlex.quote(arg) for arg in _param_args(params))
                print(f"$ sovd-edge uds -c {args.config} {component} {command} {shown}".rstrip())
                print(json.dumps(_brief(response_message(result, seq=1)), indent=2), end="\n\n")
                failures += 0 if result.status in (Status.COMPLETED, Status.REJECTED) else 1
    except BusUnavailableError as err:
        print(f"sovd-edge demo: CAN bus unavailable: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK if failures == 0 else EXIT_NOT_COMPLETED


def _brief(message: Any) -> Any:
    """Long raw values shortened and timestamps left out, so the transcript stays readable."""
    if isinstance(message, dict):
        return {k: _brief(v) for k, v in message.items() if k not in ("received_at", "started_at", "finished_at")}
    if isinstance(message, list):
        return [_brief(v) for v in message]
    if isinstance(message, str) and len(message) > 72:
        return f"{message[:64]}... ({len(message) // 2} bytes)"
    return message
