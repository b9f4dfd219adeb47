"""`sovd-edge simulate`: runs simulated ECUs standalone on a bus (vcan0, a real bench, a virtual channel)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import can

from agent.bus.owner import wait_until
from agent.cli import common as c
from agent.config.model import BusConfig
from agent.config.parse import host_port
from agent.config.reader import InvalidValueError
from agent.devtools.hub import Hub
from agent.devtools.sim.config import load_sim_config
from agent.devtools.sim.simulator import Simulator
from agent.errors import ConfigError

log = logging.getLogger("agent.devtools.sim")

EXITS = {
    **c.ALWAYS,
    c.EXIT_OK: "stopped by SIGTERM/SIGINT",
    c.EXIT_USAGE: "unknown or missing arguments, or no bus (--interface and --channel, or a bus in the file)",
    c.EXIT_UNAVAILABLE: "the bus cannot be opened, or the hub cannot listen",
    c.EXIT_CONFIG: "invalid simulator file (each problem with its path)",
}


def add_parser(sub: Any) -> None:
    p = c.add_subcommand(sub, "simulate", "Run simulated ECUs on a CAN bus until stopped (SIGTERM/Ctrl-C).",
                         "sovd-edge simulate -c config/sim/demo-vehicle.yaml --interface socketcan --channel vcan0",
                         EXITS, handle)
    c.add_config_flag(p, "simulator config (YAML)")
    p.add_argument("--interface", help="python-can interface (default: from the simulator config)")
    p.add_argument("--channel", help="channel, e.g. vcan0 (default: from the simulator config)")
    p.add_argument("--fd", action=argparse.BooleanOptionalAction, default=None, help="open the bus for CAN FD")
    p.add_argument("--hub", metavar="HOST:PORT",
                   help="also serve the bus over the socketcand protocol, for an agent in another process "
                        "(its config: interface socketcand, options {host, port}); virtual buses only")
    c.add_logging_flags(p, "INFO")


def handle(args: argparse.Namespace) -> int:
    c.configure_logging(args, "INFO")
    try:
        config = load_sim_config(args.config)
    except ConfigError as err:
        c.fail(args, f"invalid simulator configuration: {err}")
        return c.EXIT_CONFIG
    base = config.bus or BusConfig(interface="virtual", channel="sovd-demo", fd=True)
    interface, channel = args.interface or base.interface, args.channel or base.channel
    if not interface or not channel:
        c.fail(args, "give --interface and --channel (or a bus in the config)")
        return c.EXIT_USAGE
    bus = BusConfig(interface=interface, channel=channel, fd=base.fd if args.fd is None else args.fd)
    stop = c.stop_on_signals()
    simulator = Simulator(config, bus=bus)
    if not simulator.start(wait=3.0) and not wait_until(lambda: simulator.owner.is_up, 2.0):
        log.error("cannot open the bus: %s", simulator.owner.last_error)
        simulator.stop()
        return c.EXIT_UNAVAILABLE
    hub = None
    if args.hub:
        try:
            host, port = host_port(args.hub)
            hub = Hub(lambda: can.Bus(interface=interface, channel=channel, ignore_config=True), host, port)
        except (InvalidValueError, OSError) as err:
            log.error("cannot serve the hub on %s: %s", args.hub, err)
            simulator.stop()
            return c.EXIT_UNAVAILABLE
        hub.start()
    log.info("simulating", extra={"ecus": list(simulator.ecus), "bus": f"{interface}:{channel}",
                                  "hub": f"{args.hub}" if hub else None})
    stop.wait()
    if hub is not None:
        hub.stop()
    simulator.stop()
    executed = {name: ecu.server.total_executed for name, ecu in simulator.ecus.items()}
    log.info("simulator stopped", extra={"executed": executed})
    return c.EXIT_OK
