"""The `sovd-edge` command line: one subcommand per module, documented exit codes.
May import: every layer, dev tools included; it is where simulated ECUs are wired into the agent."""

from __future__ import annotations

import argparse
import signal
import sys

from agent import __version__
from agent.cli import call, check_config, demo, doctor, keygen, run, simulate, uds
from agent.cli.common import EXIT_CODES

SUBCOMMANDS = (run, call, uds, demo, simulate, check_config, doctor, keygen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovd-edge",
        description="SOVD edge agent: diagnostic commands from MQTT, run as UDS over ISO-TP on CAN.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sovd-edge {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `sovd-edge uds ... | head` ends quietly
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
