"""`sovd-edge run`: the daemon. Opens the bus, starts one worker per component, stops on SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from agent import __version__
from agent.cli.common import (
    EXIT_CONFIG,
    EXIT_OK,
    add_logging_flags,
    add_subcommand,
    configure_logging,
    load_or_report,
    stop_on_signals,
)
from agent.command import Result
from agent.response import response_message
from agent.runtime import Runtime

log = logging.getLogger("agent.run")
EXIT_CANTCREAT = 73


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "run", "Run the agent daemon (systemd starts this).",
                       "sovd-edge run -c /etc/sovd-edge/agent.yaml --state-dir /var/lib/sovd-edge")
    p.add_argument("-c", "--config", required=True, help="agent config (YAML)")
    p.add_argument("--state-dir", type=Path, help="where durable state lives (default: from the config)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight commands get to finish on stop")
    add_logging_flags(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    configure_logging(args, config.log_level)
    state_dir = args.state_dir or config.state_dir
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        if not os.access(state_dir, os.W_OK):
            raise PermissionError(f"{state_dir} is not writable")
    except OSError as err:
        log.error("cannot use state directory: %s", err, extra={"state_dir": str(state_dir)})
        return EXIT_CANTCREAT
    stop = stop_on_signals()
    runtime = Runtime(config, sink=_log_result)
    log.info("sovd-edge %s starting", __version__, extra={"vehicle": config.vehicle, "config": args.config})
    if runtime.start(wait=1.0):
        log.info("ready", extra={"bus": f"{config.bus.interface}:{config.bus.channel}"})
    else:
        log.warning("CAN bus not up yet; retrying in the background", extra={"error": runtime.owner.last_error})
    while not stop.wait(1.0):
        runtime.revive_dead_workers()
    log.info("stopping")
    unrun = runtime.stop(grace=args.grace)
    if unrun:
        log.warning("%d queued commands were not run", len(unrun), extra={"ids": [c.id for c in unrun]})
    log.info("stopped")
    return EXIT_OK


def _log_result(result: Result) -> None:
    log.info("result", extra={"command_id": result.command_id, "response": response_message(result, seq=1)})
