"""`sovd-edge run`: the daemon. Bus, workers and the MQTT link; stops cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from agent import __version__
from agent.cli.common import (
    EXIT_CONFIG,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    add_logging_flags,
    add_subcommand,
    broker_override,
    configure_logging,
    load_or_report,
    stop_on_signals,
)
from agent.config import AgentConfig
from agent.config.parse import host_port
from agent.config.reader import InvalidValueError
from agent.devtools.sim.simulator import simulators_for
from agent.fleet.link import LinkSetupError
from agent.metrics.server import MetricsServerError
from agent.store.sqlite import StoreError
from agent.system.daemon import run_until_stopped
from agent.system.service import Service
from agent.system.statelock import StateLock, StateLockedError

log = logging.getLogger("agent.run")
EXIT_CANTCREAT = 73


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "run", "Run the agent daemon (systemd starts this).",
                       "sovd-edge run -c /etc/sovd-edge/agent.yaml --state-dir /var/lib/sovd-edge")
    p.add_argument("-c", "--config", required=True, help="agent config (YAML)")
    p.add_argument("--state-dir", type=Path, help="where the durable store lives (default: from the config)")
    p.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT, overriding the config")
    p.add_argument("--metrics-listen", help="HOST:PORT for the Prometheus endpoint, overriding the config")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight commands get to finish on stop")
    p.add_argument("--sim-journal", type=Path,
                   help="append every request the in-process simulated ECUs execute to this file (tests, demos)")
    add_logging_flags(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    config = broker_override(config, args.broker)
    if config is None:
        return EXIT_CONFIG
    if args.state_dir:
        config = dataclasses.replace(config, state_dir=args.state_dir)
    if args.metrics_listen:
        try:
            host, port = host_port(args.metrics_listen)
        except InvalidValueError as err:
            print(f"invalid --metrics-listen: {err}", file=sys.stderr)
            return EXIT_CONFIG
        config = dataclasses.replace(config, metrics=dataclasses.replace(config.metrics, listen_host=host,
                                                                         listen_port=port))
    configure_logging(args, config.log_level)
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        if not os.access(config.state_dir, os.W_OK):
            raise PermissionError(f"{config.state_dir} is not writable")
    except OSError as err:
        log.error("cannot use state directory: %s", err, extra={"state_dir": str(config.state_dir)})
        return EXIT_CANTCREAT
    lock = StateLock(config.state_dir)
    try:
        lock.acquire()
    except StateLockedError as err:
        log.error("%s", err, extra={"state_dir": str(config.state_dir), "holder_pid": err.holder})
        return EXIT_TEMPFAIL
    except OSError as err:
        log.error("cannot lock the state directory: %s", err, extra={"state_dir": str(config.state_dir)})
        return EXIT_CANTCREAT
    try:
        return _run(args, config)
    finally:
        lock.release()


def _run(args: argparse.Namespace, config: AgentConfig) -> int:
    stop = stop_on_signals()
    try:
        service = Service(config, companions=simulators_for(config, journal=args.sim_journal))
    except LinkSetupError as err:
        log.error("MQTT link cannot be set up: %s", err)
        return EXIT_CONFIG
    except StoreError as err:  # not even a fresh store can be created: the state dir is unusable
        log.error("cannot open the store in %s: %s", config.state_dir, err)
        return EXIT_CANTCREAT
    try:
        started = service.start(wait=1.0)
    except MetricsServerError as err:  # nothing else was started: one line, no traceback
        log.error("%s (is another agent or exporter using it? set metrics.listen_port)", err)
        return EXIT_UNAVAILABLE
    log.info("sovd-edge %s starting", __version__, extra={"vehicle": config.vehicle, "config": args.config,
                                                           "broker": config.mqtt.broker})
    if not started:
        log.warning("CAN bus not up yet; retrying in the background",
                    extra={"error": service.runtime.owner.last_error})
    return run_until_stopped(service, stop, args.grace)
