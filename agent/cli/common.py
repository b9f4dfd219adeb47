"""Pieces the subcommands share: exit codes, config loading, param parsing, JSON output."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from typing import Any

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError
from agent.system.logs import setup_logging

EXIT_OK = 0
EXIT_NOT_COMPLETED = 1  # the command ran (or was refused) but did not complete
EXIT_USAGE = 2  # bad arguments or an invalid command
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the CAN bus or the metrics port could not be opened
EXIT_SOFTWARE = 70  # EX_SOFTWARE: internal error
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL: another agent holds the state directory (run) / no answer in time (call)
EXIT_CONFIG = 78  # EX_CONFIG: the configuration file is invalid

EXIT_CODES = """exit codes:
  0   success (for uds: the command completed)
  1   the command did not complete (failed, timeout, rejected, expired)
  2   usage error or invalid command parameters
  69  the CAN bus could not be opened (run: the metrics port is in use)
  70  internal error
  75  run: another agent holds the state directory; call: no final response in time
  78  invalid configuration (every problem is listed with its path)"""

log = logging.getLogger("agent.cli")


class Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def add_subcommand(sub: Any, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text,
                          epilog=f"example:\n  {example}\n\n{EXIT_CODES}", formatter_class=Formatter)


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log level (default: from the config, else INFO)")
    parser.add_argument("--log-format", choices=("auto", "json", "human"), default="auto",
                        help="json lines (journald), human, or auto: human on a terminal")


def load_or_report(path: str) -> AgentConfig | None:
    """The config, or None after printing every problem to stderr."""
    try:
        return load_config(path)
    except ConfigError as err:
        print(f"invalid configuration: {err}", file=sys.stderr)
        return None


def configure_logging(args: argparse.Namespace, default: str) -> None:
    """--log-level wins; else `default` (the config's level for the daemon, WARNING for one-shot tools)."""
    setup_logging(args.log_level or default, args.log_format)


def parse_params(tokens: list[str]) -> dict[str, Any]:
    """`key=value` tokens (values as JSON where they parse, else strings) or one JSON object."""
    if len(tokens) == 1 and tokens[0].lstrip().startswith("{"):
        value = json.loads(tokens[0])
        if not isinstance(value, dict):
            raise ValueError("params JSON must be an object")
        return value
    params: dict[str, Any] = {}
    for token in tokens:
        key, sep, raw = token.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {token!r}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM/SIGINT; the handler only sets it (all work stays on the main thread)."""
    stop = threading.Event()

    def handler(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def broker_override(config: AgentConfig, url: str | None) -> AgentConfig | None:
    """The config with --broker applied (None after reporting an invalid URL)."""
    if url is None:
        return config
    from agent.config.parse import broker_url
    from agent.config.reader import InvalidValueError

    try:
        broker_url(url)
    except InvalidValueError as err:
        print(f"invalid --broker: {err}", file=sys.stderr)
        return None
    return dataclasses.replace(config, mqtt=dataclasses.replace(config.mqtt, broker=url))
