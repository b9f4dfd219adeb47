"""`sovd-edge call`: the backend-side reference client. Sends one command (signed with --sign-key), prints
every response."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from agent.cli.common import (
    EXIT_CONFIG,
    EXIT_NOT_COMPLETED,
    EXIT_OK,
    EXIT_USAGE,
    add_subcommand,
    broker_override,
    load_or_report,
    parse_params,
)
from agent.config.model import ALL_COMMANDS
from agent.fleet.caller import Caller
from agent.wire.timefmt import format_rfc3339

EXIT_TEMPFAIL = 75  # no final response in time / broker unreachable


def add_parser(sub: Any) -> None:
    p = add_subcommand(sub, "call", "Send a command to a vehicle over MQTT and print its responses as they arrive.",
                       "sovd-edge call -c config/demo.yaml --broker mqtt://127.0.0.1:1883 engine read_data data=vin")
    p.add_argument("-c", "--config", required=True, help="config with the broker, prefix and TLS settings")
    p.add_argument("--vehicle", help="vehicle id (default: the config's)")
    p.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT, overriding the config")
    p.add_argument("--id", help="command id (default: a new uuid)")
    p.add_argument("--timeout-ms", type=int, help="the command's whole-command deadline")
    p.add_argument("--expires-at", help="RFC 3339 instant after which the command must not start")
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the final response")
    p.add_argument("--status", action="store_true", help="print the vehicle's retained status and exit")
    p.add_argument("--sign-key", type=Path, metavar="FILE",
                   help="sign the command with this Ed25519 private key (PEM; see `sovd-edge keygen`)")
    p.add_argument("--key-id", help="the key id the vehicle knows the key by (with --sign-key)")
    p.add_argument("--expires-in", type=float, default=300.0, metavar="S",
                   help="with --sign-key and no --expires-at: expires_at this many seconds from now (default 300)")
    p.add_argument("component", nargs="?", help="component (ECU) name")
    p.add_argument("command", nargs="?", choices=ALL_COMMANDS, metavar="COMMAND", help=", ".join(ALL_COMMANDS))
    p.add_argument("params", nargs="*", help="params as key=value or one JSON object")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    config = broker_override(config, args.broker) if config else None
    if config is None:
        return EXIT_CONFIG
    vehicle = args.vehicle or config.vehicle
    if (args.sign_key is None) != (args.key_id is None):
        print("sovd-edge call: --sign-key and --key-id go together", file=sys.stderr)
        return EXIT_USAGE
    signer = None
    if args.sign_key is not None:
        from agent.policy.ed25519 import KeyFileError, SigningUnavailableError  # not loaded by other subcommands
        from agent.policy.signature import Signer

        try:
            signer = Signer.from_file(args.sign_key, args.key_id)
        except (KeyFileError, SigningUnavailableError) as err:
            print(f"sovd-edge call: {err}", file=sys.stderr)
            return EXIT_USAGE
    try:
        with Caller(config.mqtt, vehicle, signer=signer) as caller:
            return _status(caller, args) if args.status else _call(caller, args)
    except (OSError, TimeoutError) as err:
        print(f"sovd-edge call: {err}", file=sys.stderr)
        return EXIT_TEMPFAIL


def _status(caller: Caller, args: argparse.Namespace) -> int:
    caller.subscribe(caller.topics.status)
    try:
        seen = caller.wait_for(lambda s: s.topic == caller.topics.status, min(args.wait, 5.0))[0]
    except TimeoutError:
        print(f"no status for vehicle on {caller.topics.status}", file=sys.stderr)
        return EXIT_TEMPFAIL
    status = seen.json()
    print(json.dumps(status))
    return EXIT_OK if status.get("state") == "online" else EXIT_NOT_COMPLETED


def _call(caller: Caller, args: argparse.Namespace) -> int:
    if not args.component or not args.command:
        print("sovd-edge call: give COMPONENT and COMMAND (or --status)", file=sys.stderr)
        return EXIT_USAGE
    try:
        params = parse_params(args.params)
    except ValueError as err:
        print(f"sovd-edge call: {err}", file=sys.stderr)
        return EXIT_USAGE
    command_id = args.id or str(uuid.uuid4())
    body: dict[str, Any] = {"id": command_id, "component": args.component, "command": args.command}
    if params:
        body["params"] = params
    if args.timeout_ms:
        body["timeout_ms"] = args.timeout_ms
    if args.expires_at:
        body["expires_at"] = args.expires_at
    elif caller.signer is not None:  # a signed command must carry expires_at (protocol: Signed commands)
        body["expires_at"] = format_rfc3339(time.time() + args.expires_in)
    topic = caller.topics.responses(command_id)
    caller.subscribe(topic)
    caller.send(body)
    printed = 0
    while True:
        try:
            caller.wait_for(lambda s: s.topic == topic, args.wait, count=printed + 1)
        except TimeoutError:
            print(f"sovd-edge call: no final response for {command_id} within {args.wait:.0f} s", file=sys.stderr)
            return EXIT_TEMPFAIL
        message = caller.replies(command_id)[printed]
        printed += 1
        print(json.dumps(message), flush=True)
        if message.get("final"):
            return EXIT_OK if message.get("status") == "completed" else EXIT_NOT_COMPLETED
