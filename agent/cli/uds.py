"""`sovd-edge uds`: runs one command locally on the CAN bus and prints the Response as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cli.common import (
    EXIT_CONFIG,
    EXIT_NOT_COMPLETED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_logging_flags,
    add_subcommand,
    configure_logging,
    load_or_report,
    parse_params,
    print_json,
)
from agent.config.model import ALL_COMMANDS
from agent.devtools.sim.simulator import simulators_for
from agent.system.local import BusUnavailableError, LocalSession
from agent.wire.command import Status
from agent.wire.messages import response_message
from agent.wire.parse import InvalidCommandError, UnknownComponentError


def add_parser(sub: Any) -> None:
    p = add_subcommand(
        sub, "uds", "Run one diagnostic command on a component and print the result as JSON.",
        "sovd-edge uds -c config/demo.yaml engine read_data data='[\"vin\",\"engine_speed\"]'",
    )
    p.add_argument("-c", "--config", required=True, help="agent config (YAML)")
    p.add_argument("component", help="component (ECU) name from the config")
    p.add_argument("command", choices=ALL_COMMANDS, metavar="COMMAND", help=", ".join(ALL_COMMANDS))
    p.add_argument("params", nargs="*",
                   help="params as key=value (values parsed as JSON where possible) or one JSON object")
    p.add_argument("--timeout-ms", type=int, help="whole-command deadline")
    add_logging_flags(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    configure_logging(args, "WARNING")
    try:
        params = parse_params(args.params)
    except (ValueError, json.JSONDecodeError) as err:
        print(f"sovd-edge uds: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with LocalSession(config, companions=simulators_for(config)) as session:
            result = session.run(args.component, args.command, params, args.timeout_ms)
    except (InvalidCommandError, UnknownComponentError) as err:
        print(f"sovd-edge uds: invalid command: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BusUnavailableError as err:
        print(f"sovd-edge uds: CAN bus unavailable: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    print_json(response_message(result, seq=1))
    return EXIT_OK if result.status is Status.COMPLETED else EXIT_NOT_COMPLETED
