"""`sovd-edge call`: the backend-side reference client. Sends one command (signed with --sign-key), prints
every response."""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any

from agent.cli import common as c
from agent.cli.commands import summary
from agent.config.model import ALL_COMMANDS, AgentConfig
from agent.config.parse import VEHICLE
from agent.config.reader import InvalidValueError
from agent.fleet.caller import BrokerUnreachableError, Caller, Seen
from agent.fleet.credentials import LinkSetupError
from agent.fleet.topics import is_publishable
from agent.wire.catalog import params_from_words
from agent.wire.command import COMMAND_ID
from agent.wire.messages import clip
from agent.wire.timefmt import format_rfc3339

SIGNED_EXPIRY_S = 300.0  # a signed command must carry expires_at; --sign-key without one gets this
MAX_EXPIRY_S = 2**32 - 1  # MQTT 5's Message Expiry Interval is a four-byte integer
EXITS = {
    **c.ALWAYS,
    c.EXIT_OK: "the command completed (--status: the vehicle is online)",
    c.EXIT_NOT_COMPLETED: "failed, timeout, rejected or expired (--status: the vehicle is offline)",
    c.EXIT_USAGE: "unknown or missing arguments, or params that cannot be read",
    c.EXIT_UNAVAILABLE: "the broker cannot be reached",
    c.EXIT_TEMPFAIL: "no final response within --wait (the message says whether the command stays queued), "
                     "or (--status) no status for the vehicle",
    c.EXIT_CONFIG: c.CONFIG_EXIT,
}


def add_parser(sub: Any) -> None:
    p = c.add_subcommand(sub, "call", "Send a command to a vehicle over MQTT and print its responses as they arrive.",
                         "sovd-edge call -c config/demo.yaml --broker mqtt://127.0.0.1:1883 engine read_data data=vin",
                         EXITS, c.with_agent_config(handle), epilog=summary())
    c.add_config_flag(p, "config with the broker, prefix and TLS settings (and the components' DIDs)")
    p.add_argument("--vehicle", help="vehicle id (default: the config's)")
    c.add_broker_flag(p)
    p.add_argument("--id", help="command id (default: a new uuid)")
    p.add_argument("--timeout-ms", type=int, help="the command's whole-command deadline once it runs")
    p.add_argument("--expires-at", help="RFC 3339 instant after which the command must not start")
    p.add_argument("--reply-topic", metavar="TOPIC",
                   help="receive the responses on TOPIC (MQTT 5 Response Topic, or `reply_to` on 3.1.1) instead of "
                        "responses/{id}; only the final response comes there unless --progress")
    p.add_argument("--progress", action="store_true",
                   help="ask for the non-final `accepted` on the --reply-topic too (the default topic always gets it)")
    p.add_argument("--expires-in", type=float, metavar="SECONDS",
                   help="the command must not start later than this from now (default with --sign-key: 300, as a "
                        "signed command must carry expires_at) (sets expires_at and, on MQTT 5, "
                        "the message expiry, so that a broker drops it for an agent that stays offline)")
    p.add_argument("--wait", type=c.seconds, default=30.0, help="seconds to wait for the final response (default 30)")
    p.add_argument("--status", action="store_true", help="print the vehicle's retained status and exit")
    p.add_argument("--sign-key", type=Path, metavar="FILE",
                   help="sign the command with this Ed25519 private key (PEM; see `sovd-edge keygen`)")
    p.add_argument("--key-id", help="the key id the vehicle knows the key by (with --sign-key)")
    p.add_argument("component", nargs="?", help="component (ECU) name")
    p.add_argument("command", nargs="?", choices=ALL_COMMANDS, metavar="COMMAND", help=", ".join(ALL_COMMANDS))
    p.add_argument("params", nargs="*", help="key=value words, key:=JSON, or one JSON object (below)")


def handle(args: argparse.Namespace, config: AgentConfig) -> int:
    if not args.status and (not args.component or not args.command):
        c.fail(args, "give COMPONENT and COMMAND (or --status)")
        return c.EXIT_USAGE
    problem = _topic_level_problem(args)
    if problem:
        c.fail(args, problem)
        return c.EXIT_USAGE
    if args.reply_topic is not None and not is_publishable(args.reply_topic):
        c.fail(args, f"--reply-topic {args.reply_topic!r} is not a topic one can publish to (empty, or has + # or NUL)")
        return c.EXIT_USAGE
    if (args.sign_key is None) != (args.key_id is None):
        c.fail(args, "--sign-key and --key-id go together")
        return c.EXIT_USAGE
    signer = None
    if args.sign_key is not None:
        from agent.policy.ed25519 import KeyFileError, SigningUnavailableError  # not loaded by other subcommands
        from agent.policy.signature import Signer
        try:
            signer = Signer.from_file(args.sign_key, args.key_id)
        except (KeyFileError, SigningUnavailableError) as err:
            c.fail(args, str(err))
            return c.EXIT_USAGE
        if args.expires_in is None and not args.expires_at:
            args.expires_in = SIGNED_EXPIRY_S
    body: dict[str, Any] | None = None
    if not args.status:
        try:
            body = _body(args, config.ecu(args.component))
        except ValueError as err:
            c.fail(args, str(err))
            return c.EXIT_USAGE
    try:
        with Caller(config.mqtt, args.vehicle or config.vehicle, signer=signer) as caller:
            caller.subscribe(caller.topics.status)
            return _call(caller, args, body) if body is not None else _status(caller, args)
    except BrokerUnreachableError as err:
        c.fail(args, str(err))
        return c.EXIT_UNAVAILABLE
    except LinkSetupError as err:  # the config's TLS or credential files, as the agent would refuse them
        c.fail(args, f"invalid configuration: {err}")
        return c.EXIT_CONFIG
    except (OSError, RuntimeError) as err:  # connected, then the broker stopped answering (paho raises these)
        c.fail(args, f"the broker {config.mqtt.broker} stopped answering: {err}")
        return c.EXIT_UNAVAILABLE


def _topic_level_problem(args: argparse.Namespace) -> str | None:
    """--id and --vehicle become topic levels (`{prefix}/{vehicle}/responses/{id}`): what is wrong with them."""
    if args.id is not None and not COMMAND_ID.fullmatch(args.id):
        return f"--id: {clip(args.id, 60)!r} is not a command id (1 to 128 of A-Z a-z 0-9 . _ : -)"
    if args.vehicle is not None:
        try:
            VEHICLE(args.vehicle)  # the config's own rule for `vehicle`
        except InvalidValueError as err:
            return f"--vehicle: {clip(str(err))}"
    return None


def _body(args: argparse.Namespace, ecu: Any) -> dict[str, Any]:
    params = params_from_words(args.command, args.params, ecu)
    body: dict[str, Any] = {"id": args.id or str(uuid.uuid4()), "component": args.component, "command": args.command}
    if params:
        body["params"] = params
    if args.timeout_ms:
        body["timeout_ms"] = args.timeout_ms
    if args.expires_in is not None:
        if not 0 < args.expires_in <= MAX_EXPIRY_S:  # also refuses nan
            raise ValueError(f"--expires-in: give seconds, more than 0 and at most {MAX_EXPIRY_S}")
        body["expires_at"] = format_rfc3339(time.time() + args.expires_in)
    if args.expires_at:
        body["expires_at"] = args.expires_at
    if args.progress:
        body["progress"] = True
    return body


def _latest_status(caller: Caller, wait: float) -> dict[str, Any] | None:
    """The vehicle's status (the broker sends the retained one on subscribe), or None if it has none."""
    try:
        caller.wait_for(lambda s: s.topic == caller.topics.status, wait)
    except TimeoutError:
        return None
    seen: list[Seen] = [s for s in caller.seen if s.topic == caller.topics.status]
    try:
        status = seen[-1].json()
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def _status(caller: Caller, args: argparse.Namespace) -> int:
    status = _latest_status(caller, min(args.wait, 5.0))
    if status is None:
        c.fail(args, f"no status for the vehicle on {caller.topics.status} (wrong --vehicle or prefix?)")
        return c.EXIT_TEMPFAIL
    print(json.dumps(status))
    return c.EXIT_OK if status.get("state") == "online" else c.EXIT_NOT_COMPLETED


def _call(caller: Caller, args: argparse.Namespace, body: dict[str, Any]) -> int:
    command_id = body["id"]
    expiry = max(1, round(args.expires_in)) if args.expires_in is not None else None
    topic = caller.request(body, args.reply_topic, expiry_s=expiry)
    printed = 0
    while True:
        try:
            message = caller.wait_replies(command_id, printed + 1, args.wait, topic)[printed]
        except TimeoutError:
            c.fail(args, _no_final(caller, body, args.wait, printed))
            return c.EXIT_TEMPFAIL
        printed += 1
        print(json.dumps(message), flush=True)
        if message.get("final"):
            return c.EXIT_OK if message.get("status") == "completed" else c.EXIT_NOT_COMPLETED


def _no_final(caller: Caller, body: dict[str, Any], wait: float, answered: int) -> str:
    """Why no final response came, and what happens to the command now, in one line."""
    head = f"no final response for {body['id']} within {wait:g} s"
    later = (f"it expires at {body['expires_at']}" if "expires_at" in body else
             "to keep it from running late, send it with --expires-in SECONDS (or --expires-at)")
    if answered:
        return f"{head}; the agent accepted it and will still answer (a longer --wait?)"
    status = _latest_status(caller, 0.5)
    if status is None:
        return (f"{head}; no agent has published a status on {caller.topics.status} (wrong --vehicle or "
                f"prefix?); unless the broker already holds a session of that agent, nobody receives it")
    if status.get("state") != "online":
        return (f"{head}; the agent is offline (status since {status.get('since')}): the broker keeps the "
                f"command queued and the agent runs it when it reconnects; {later}")
    return f"{head}; the agent is online but did not answer yet; it may still run the command; {later}"
