"""`sovd-edge doctor`: checks the running system against a config and says how to fix what fails."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from agent.cli.common import EXIT_CONFIG, EXIT_NOT_COMPLETED, EXIT_OK, add_subcommand, broker_override, load_or_report
from agent.system.doctor import FAIL, render, run_checks, traffic_checks


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "doctor", "Check interface, bitrate, bus state, kernel ISO-TP, broker and state dir.",
                       "sovd-edge doctor -c /etc/sovd-edge/agent.yaml")
    p.add_argument("-c", "--config", required=True, help="agent config (YAML)")
    p.add_argument("--broker", help="mqtt://HOST:PORT to check instead of the configured broker")
    p.add_argument("--state-dir", type=Path, help="state directory to check instead of the configured one")
    p.add_argument("--listen", type=float, default=2.0, metavar="SECONDS",
                   help="listen this long for frames and error counters (0: skip the bus traffic checks)")
    p.add_argument("--no-probe", action="store_true",
                   help="do not send TesterPresent to the configured ECUs (the only frames doctor sends)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    config = broker_override(config, args.broker) if config else None
    if config is None:
        print("config  FAIL    invalid (listed above)\n        fix: correct the file; exit code 78 under systemd")
        return EXIT_CONFIG
    if args.state_dir:
        config = dataclasses.replace(config, state_dir=args.state_dir)
    checks = run_checks(config)
    if args.listen > 0:
        checks += traffic_checks(config, args.listen, probe=not args.no_probe)
    print(render(checks))
    return EXIT_NOT_COMPLETED if any(c.result == FAIL for c in checks) else EXIT_OK
