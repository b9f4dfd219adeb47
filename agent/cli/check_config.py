"""`sovd-edge check-config`: validates a config file and reports every problem with its path."""

from __future__ import annotations

import argparse
from typing import Any

from agent.cli.common import EXIT_CONFIG, EXIT_OK, add_subcommand, load_or_report


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "check-config", "Validate an agent config file; every error is listed with its path.",
                       "sovd-edge check-config -c /etc/sovd-edge/agent.yaml")
    p.add_argument("-c", "--config", required=True, help="agent config (YAML)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    names = ", ".join(e.name for e in config.ecus)
    print(f"{args.config}: OK (vehicle {config.vehicle}, bus {config.bus.interface}:{config.bus.channel}, "
          f"{len(config.ecus)} ECUs: {names})")
    return EXIT_OK
