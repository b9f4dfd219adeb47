"""`sovd-edge demo`: the agent's main job on simulated ECUs: read a VIN, the faults, change session."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
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
from agent.command import Status
from agent.local import BusUnavailableError, LocalSession
from agent.response import response_message

STEPS: list[tuple[str, str, dict[str, Any]]] = [
    ("engine", "read_data", {"data": ["vin", "engine_speed", "coolant_temperature"]}),
    ("engine", "read_faults", {"status_mask": "0xFF", "snapshots": True}),
    ("engine", "set_session", {"session": "extended"}),
    ("engine", "security_access", {"level": 1}),
    ("engine", "write_data", {"data": "idle_mode", "value": "high"}),
    ("engine", "read_data", {"data": "idle_mode"}),
    ("abs", "read_data", {"data": ["vin", "wheel_speeds"]}),
    ("abs", "clear_faults", {}),
    ("adas", "read_data", {"data": "calibration"}),
]


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "demo", "Show the agent at work on the simulated demo vehicle (no hardware needed).",
                       "sovd-edge demo -c config/demo.yaml")
    p.add_argument("-c", "--config", default="config/demo.yaml", help="agent config with simulated ECUs")
    add_logging_flags(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    configure_logging(args, "WARNING")
    failures = 0
    try:
        with LocalSession(config) as session:
            print(f"demo vehicle {config.vehicle} on {config.bus.interface}:{config.bus.channel}, "
                  f"components: {', '.join(e.name for e in config.ecus)}\n")
            for component, command, params in STEPS:
                result = session.run(component, command, params)
                shown = " ".join(shlex.quote(f"{k}={json.dumps(v) if not isinstance(v, str) else v}")
                                 for k, v in params.items())
                print(f"$ sovd-edge uds -c {args.config} {component} {command} {shown}".rstrip())
                print(json.dumps(_brief(response_message(result, seq=1)), indent=2), end="\n\n")
                expected_refusal = result.status is Status.REJECTED
                failures += 0 if result.status is Status.COMPLETED or expected_refusal else 1
    except BusUnavailableError as err:
        print(f"sovd-edge demo: CAN bus unavailable: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK if failures == 0 else EXIT_NOT_COMPLETED


def _brief(message: dict[str, Any]) -> dict[str, Any]:
    """Long raw values shortened so the transcript stays readable."""
    def cut(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        if isinstance(value, list):
            return [cut(v) for v in value]
        if isinstance(value, str) and len(value) > 72:
            return f"{value[:64]}... ({len(value) // 2} bytes)"
        return value

    return {k: cut(v) for k, v in message.items() if k not in ("received_at", "started_at")}
