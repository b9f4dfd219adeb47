"""`sovd-edge discover`: finds the ECUs on a bus and prints an `ecus:` config for them (or JSON)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from typing import Any

import can

from agent.cli.common import (
    ALWAYS,
    CONFIG_EXIT,
    EXIT_CONFIG,
    EXIT_NOT_COMPLETED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    add_logging_flags,
    add_subcommand,
    agent_config,
    configure_logging,
    fail,
    finite_number,
    milliseconds,
    seconds,
    whole_number,
)
from agent.config.model import BusConfig
from agent.discover.report import as_json, render_yaml
from agent.discover.run import SCAN_11BIT, SCAN_29BIT, Options, discover
from agent.discover.tap import BusTap
from agent.errors import BusDownError

SAFETY = """what it sends: only OBD-II services 0x01 (current data, PID 0x00 and the supported-PID
bitmaps) and 0x09 (vehicle information), UDS 0x22 (ReadDataByIdentifier, the identification
DIDs F190 F18C F187 F189 F191 F197 F18A) and 0x3E (TesterPresent). Never a write, a reset, a
session change or a clear; the tool refuses to send anything else. Some ECUs dislike scans
(a scan sends TesterPresent to ids nobody may use): run --scan with the ignition on and the
engine off. A scan skips every id the listening phase heard talking."""


EXITS = {
    **ALWAYS,
    EXIT_OK: "ECUs found; their config is on stdout",
    EXIT_NOT_COMPLETED: "the bus was usable but no ECU answered",
    EXIT_UNAVAILABLE: "the bus could not be opened",
    EXIT_CONFIG: CONFIG_EXIT,
}


def add_parser(sub: Any) -> None:
    p = add_subcommand(
        sub, "discover", "Find the ECUs on a CAN bus and print an ecus: config for them (listen, ask OBD-II ECUs "
        "on 0x7DF and 0x18DB33F1, optionally --scan for UDS ECUs, read their identification DIDs).",
        "sovd-edge discover --interface socketcan --channel can0 --scan > discovered.yaml", EXITS, handle,
        epilog=SAFETY)
    p.add_argument("-c", "--config", help="take the bus (interface, channel, bitrate) from this agent config")
    p.add_argument("--interface", help="python-can interface, e.g. socketcan")
    p.add_argument("--channel", help="channel, e.g. can0")
    p.add_argument("--bitrate", type=int, default=None, help="bit/s (default: the config's, else 500000)")
    p.add_argument("--fd", action=argparse.BooleanOptionalAction, default=None, help="open the bus for CAN FD")
    p.add_argument("--listen", type=seconds, default=3.0, metavar="SECONDS", help="passive listening first (default 3)")
    p.add_argument("--no-obd", action="store_true", help="skip the OBD-II functional request")
    p.add_argument("--obd-wait-ms", type=milliseconds, default=300,
                   help="how long answers to it are collected (default 300)")
    p.add_argument("--scan", action="store_true", help="also send TesterPresent to each physical id (opt-in)")
    p.add_argument("--scan-11bit", type=_range(0x7FF, "0x700-0x7F7"), default=None, metavar="FROM-TO",
                   help="11-bit request ids to scan (default 0x700-0x7F7)")
    p.add_argument("--scan-29bit", type=_range(0xFF, "0x00-0xFF"), default=None, metavar="FROM-TO",
                   help="normal-fixed 29-bit target addresses to scan, 0x18DA<TA>F1 (default 0x00-0xFF; "
                        "the tester 0xF1 and the functional 0x33 are never scanned)")
    p.add_argument("--rate", type=_rate, default=20.0, help="scan requests per second at most (default 20)")
    p.add_argument("--scan-wait-ms", type=milliseconds, default=50,
                   help="wait for an answer per scanned id (default 50)")
    p.add_argument("--p2-ms", type=milliseconds, default=500, help="wait for each identification answer (default 500)")
    p.add_argument("--padding", type=_byte, default=0xCC, help="pad request frames with this byte (default 0xCC)")
    p.add_argument("--json", action="store_true", help="print everything found as JSON instead of YAML")
    add_logging_flags(p, "WARNING")


def _rate(text: str) -> float:
    return finite_number(text, 0, "a rate (requests per second, more than 0)", low_included=False)


def _byte(text: str) -> int:
    return whole_number(text, 0, 0xFF, "a byte (0x00..0xFF)")


def _range(highest: int, example: str) -> Callable[[str], tuple[int, ...]]:
    """argparse type: FROM-TO (or one value), each within 0..`highest`."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            low, _, high = text.partition("-")
            start, end = int(low, 0), int(high or low, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not FROM-TO, e.g. {example}") from None
        if not 0 <= start <= end <= highest:
            raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= FROM <= TO <= 0x{highest:X}")
        return tuple(range(start, end + 1))
    return parse


def _bus(args: argparse.Namespace) -> BusConfig | int:
    base = None
    if args.config:
        config = agent_config(args)
        if config is None:
            return EXIT_CONFIG
        base = config.bus
    interface = args.interface or (base.interface if base else None)
    channel = args.channel or (base.channel if base else None)
    if not interface or not channel:
        fail(args, "give -c CONFIG or --interface and --channel")
        return EXIT_USAGE
    return BusConfig(interface=interface, channel=channel,
                     bitrate=args.bitrate or (base.bitrate if base else 500_000),
                     fd=args.fd if args.fd is not None else bool(base and base.fd),
                     options=base.options if base and base.interface == interface else ())


def progress_line(done: int, total: int, found: int, width: int = 30) -> str:
    filled = width * done // max(total, 1)
    return f"\rscan [{'#' * filled}{'.' * (width - filled)}] {done}/{total}, {found} answered"


def handle(args: argparse.Namespace) -> int:
    bus = _bus(args)
    if isinstance(bus, int):
        return bus
    if not args.config:
        configure_logging(args, "WARNING")
    scan_29 = tuple(t for t in args.scan_29bit if t in SCAN_29BIT) if args.scan_29bit else SCAN_29BIT
    options = Options(listen_s=max(args.listen, 0.0), obd=not args.no_obd, obd_wait_s=args.obd_wait_ms / 1000,
                      scan=args.scan, scan_11bit=args.scan_11bit or SCAN_11BIT, scan_29bit=scan_29,
                      rate=max(args.rate, 0.1), scan_wait_s=args.scan_wait_ms / 1000, p2_s=args.p2_ms / 1000,
                      padding=args.padding)
    tty = sys.stderr.isatty()

    def progress(done: int, total: int, found: int) -> None:
        if tty:
            print(progress_line(done, total, found), end="" if done < total else "\n", file=sys.stderr, flush=True)

    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        with BusTap(bus) as tap:
            report = discover(tap, options, progress, when)
    except (can.CanError, OSError, ValueError, ImportError, NotImplementedError, BusDownError) as err:
        fail(args, f"cannot use the bus {bus.interface}:{bus.channel}: {err}")
        return EXIT_UNAVAILABLE
    if args.json:
        print(json.dumps(as_json(report), indent=2))
    else:
        print(render_yaml(report), end="")
    return EXIT_OK if report.ecus else EXIT_NOT_COMPLETED
