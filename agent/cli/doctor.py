"""`sovd-edge doctor`: checks the running system against a config and says how to fix what fails.
It only looks: it creates, writes and changes nothing."""

from __future__ import annotations

import argparse
from typing import Any

from agent.cli import common as c
from agent.config.model import AgentConfig
from agent.system.doctor import FAIL, render, run_checks, traffic_checks

EXITS = {
    **c.ALWAYS,
    c.EXIT_OK: "every check passed (or warned)",
    c.EXIT_NOT_COMPLETED: "a check failed; its line says how to fix it",
    c.EXIT_CONFIG: c.CONFIG_EXIT,
}


def add_parser(sub: Any) -> None:
    p = c.add_subcommand(sub, "doctor", "Check interface, bitrate, bus state, kernel ISO-TP, broker and state dir.",
                         "sovd-edge doctor -c /etc/sovd-edge/agent.yaml", EXITS, c.with_agent_config(handle))
    c.add_config_flag(p)
    p.add_argument("--broker", help="mqtt://HOST:PORT to check instead of the configured broker")
    c.add_state_dir_flag(p, "state directory to check instead of the configured one")
    p.add_argument("--listen", type=c.seconds, default=2.0, metavar="SECONDS",
                   help="listen this long for frames and error counters (default 2; 0: skip the bus traffic checks)")
    p.add_argument("--no-probe", action="store_true",
                   help="do not send TesterPresent to the configured ECUs (the only frames doctor sends)")


def handle(args: argparse.Namespace, config: AgentConfig) -> int:
    checks = run_checks(config)
    if args.listen > 0:
        checks += traffic_checks(config, args.listen, probe=not args.no_probe)
    print(render(checks))
    return c.EXIT_NOT_COMPLETED if any(check.result == FAIL for check in checks) else c.EXIT_OK
