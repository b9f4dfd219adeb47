"""`sovd-edge uds`: runs one command locally on the CAN bus and prints the Response as JSON."""

from __future__ import annotations

import argparse
import time
from typing import Any

from agent.cli import common as c
from agent.cli.commands import summary
from agent.config.model import ALL_COMMANDS, AgentConfig
from agent.policy.mutating import is_mutating
from agent.system.audit import LocalAudit
from agent.system.local import BusUnavailableError, LocalSession, validate
from agent.wire.catalog import params_from_words
from agent.wire.command import ErrorCode, Outcome, Result, Status
from agent.wire.messages import response_message
from agent.wire.parse import InvalidCommandError, UnknownComponentError

EXITS = {
    **c.ALWAYS,
    c.EXIT_OK: "the command completed",
    c.EXIT_NOT_COMPLETED: "failed, timeout or rejected (the Response says why)",
    c.EXIT_USAGE: "unknown or missing arguments, unreadable params, an unknown component, an invalid command",
    c.EXIT_UNAVAILABLE: "the CAN bus could not be opened",
    c.EXIT_CANTCREAT: "the config requires signed commands and the audit log in its state_dir cannot be written "
                      "(a mutating command is recorded there before it runs, else not run), or stdout cannot "
                      "be written",
    c.EXIT_CONFIG: c.CONFIG_EXIT,
}


def add_parser(sub: Any) -> None:
    p = c.add_subcommand(sub, "uds", "Run one diagnostic command on a component and print the result as JSON. "
                         "Each run starts in the ECU's default session.",
                         "sovd-edge uds -c config/demo.yaml engine read_data data=vin,engine_speed",
                         EXITS, c.with_agent_config(handle), epilog=summary())
    c.add_config_flag(p)
    p.add_argument("component", help="component (ECU) name from the config")
    p.add_argument("command", choices=ALL_COMMANDS, metavar="COMMAND", help=", ".join(ALL_COMMANDS))
    p.add_argument("params", nargs="*", help="key=value words, key:=JSON, or one JSON object (below)")
    p.add_argument("--timeout-ms", type=int, help="whole-command deadline")
    c.add_logging_flags(p, "WARNING")


def handle(args: argparse.Namespace, config: AgentConfig) -> int:
    try:
        params = params_from_words(args.command, args.params, config.ecu(args.component))
    except ValueError as err:
        c.fail(args, str(err))
        return c.EXIT_USAGE
    try:
        validate(config, args.component, args.command, params, timeout_ms=args.timeout_ms)
    except (InvalidCommandError, UnknownComponentError) as err:
        c.fail(args, f"invalid command: {err}")
        return c.EXIT_USAGE
    companions = c.simulated_ecus(args, config)
    if companions is None:
        return c.EXIT_CONFIG
    audit, audit_id = None, None
    try:  # from the audit record of its start on (a Ctrl-C may come at once), its end is recorded too
        if config.security.require_signature != "none" and is_mutating(args.command):
            # The daemon audits every mutating command; on a vehicle that requires signatures the audit log is
            # what shows who changed it, so a local run is recorded there too, or not run.
            audit = LocalAudit(config)
            try:
                audit_id = audit.started(args.component, args.command, params)
            except OSError as err:
                c.fail(args, f"not run: the audit log cannot be written ({err}); this config requires signed "
                             f"commands (security.require_signature), so mutating commands are recorded in "
                             f"{audit.log.path} first")
                return c.EXIT_CANTCREAT
        with LocalSession(config, companions=companions) as session:
            result = session.run(args.component, args.command, params, args.timeout_ms)
    except BusUnavailableError as err:
        if audit is not None and audit_id is not None:  # recorded as started: its end is recorded too
            now = time.time()
            audit.finished(audit_id, Result(audit_id, args.component, args.command, Outcome.failure(
                Status.FAILED, ErrorCode.BUS_ERROR, f"not run: CAN bus unavailable: {err}"), now, None, now))
        c.fail(args, f"CAN bus unavailable: {err}{_hub_hint(config)}")
        return c.EXIT_UNAVAILABLE
    except BaseException as err:  # Ctrl-C, SIGTERM or a bug while it ran: the log says it may have run, not nothing
        audit_id = audit_id or (audit.pending if audit is not None else None)  # a signal in started()'s fsync
        if audit is not None and audit_id is not None:
            now = time.time()
            why = "Ctrl-C or SIGTERM" if isinstance(err, KeyboardInterrupt | c.Interrupted) \
                else f"{type(err).__name__}: {err}"
            audit.finished(audit_id, Result(audit_id, args.component, args.command, Outcome.failure(
                Status.INTERRUPTED, ErrorCode.INTERRUPTED, f"stopped ({why}) while it ran: it may or "
                "may not have taken effect"), now, now, now))
        raise
    if audit is not None and audit_id is not None:
        audit.finished(audit_id, result)
    c.print_json(response_message(result, seq=1))
    return c.EXIT_OK if result.status is Status.COMPLETED else c.EXIT_NOT_COMPLETED


def _hub_hint(config: AgentConfig) -> str:
    """For a socketcand bus (config/hub.yaml): how to start the hub it expects."""
    if config.bus.interface != "socketcand":
        return ""
    options = dict(config.bus.options)
    where = f"{options.get('host', 'HOST')}:{options.get('port', 'PORT')}"
    return f"; is the hub running? sovd-edge simulate -c config/sim/demo-vehicle.yaml --hub {where}"
