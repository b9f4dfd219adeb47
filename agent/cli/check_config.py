"""`sovd-edge check-config`: validates a config file and reports every problem with its path."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli import common as c
from agent.collect.schedule import plan_tasks
from agent.config.model import AgentConfig
from agent.devtools.sim.config import load_sim_config
from agent.errors import ConfigError
from agent.fleet.credentials import LinkSetupError, read_secret, tls_file_problems
from agent.metrics.server import tls_file_problems as metrics_tls_problems
from agent.wire.plan import local_plan_problems, parse_plan

EXITS = {**c.ALWAYS, c.EXIT_OK: "the file is valid", c.EXIT_CONFIG: c.CONFIG_EXIT}
SYSTEMD_CREDENTIALS = Path("/run/credentials")  # LoadCredential= files: there only inside the service


def add_parser(sub: Any) -> None:
    p = c.add_subcommand(sub, "check-config", "Validate an agent config file; every error is listed with its path.",
                         "sovd-edge check-config -c /etc/sovd-edge/agent.yaml", EXITS, c.with_agent_config(handle))
    c.add_config_flag(p)


def handle(args: argparse.Namespace, config: AgentConfig) -> int:
    problems = local_plan_problems(config)  # plans are checked by the wire layer, as strictly as from MQTT
    problems += scheduled_request_problems(config) if not problems else []
    if config.security.signatures_configured:  # the keys are read as `run` reads them (cryptography only then)
        from agent.policy.signature import load_authenticator

        try:
            load_authenticator(config.security, str(config.source or args.config))
        except ConfigError as err:
            problems += err.problems
    file_problems, provided = credential_file_problems(config)
    problems += file_problems  # every problem of the file at once, as --help promises: not one kind per run
    if problems:
        c.fail(args, f"invalid configuration: {ConfigError(str(args.config), problems)}")
        return c.EXIT_CONFIG
    for sim_file in config.simulate:  # read as `run` and `uds` read them, so that OK here means they start
        try:
            load_sim_config(sim_file)
        except ConfigError as err:
            c.fail(args, f"invalid configuration: {err}")
            return c.EXIT_CONFIG
    names = ", ".join(e.name for e in config.ecus)
    print(f"{args.config}: OK (vehicle {config.vehicle}, bus {config.bus.interface}:{config.bus.channel}, "
          f"{len(config.ecus)} ECUs: {names}; {len(config.collect.plans)} collection plans)")
    for line in provided:
        print(f"  not checked here: {line} (systemd provides it when it starts the agent: LoadCredential=)")
    return c.EXIT_OK


def credential_file_problems(config: AgentConfig) -> tuple[list[tuple[str, str]], list[str]]:
    """The files read as `run` reads them before it connects: the MQTT link's password, CA, client
    certificate and key, and the metrics endpoint's certificate, key and client CA; so that OK here means
    both can be set up: (problems, files only systemd provides)."""
    provided: list[str] = []

    def systemd_provides(path: Path) -> bool:
        return path.is_relative_to(SYSTEMD_CREDENTIALS)

    mqtt = config.mqtt
    problems: list[tuple[str, str]] = []
    if mqtt.password_credential is not None:
        provided.append(f"mqtt.password_credential {mqtt.password_credential}")
    if mqtt.password_file is not None:
        if systemd_provides(mqtt.password_file):
            provided.append(f"mqtt.password_file {mqtt.password_file}")
        else:
            try:
                read_secret(mqtt.password_file)
            except LinkSetupError as err:
                problems.append(("mqtt.password_file", str(err)))
    tls, metrics_tls = mqtt.tls, config.metrics.tls if config.metrics.enabled else None
    files = [*((("mqtt.tls.ca_file", tls.ca_file), ("mqtt.tls.cert_file", tls.cert_file),
                ("mqtt.tls.key_file", tls.key_file)) if tls is not None else ()),
             *((("metrics.tls.cert_file", metrics_tls.cert_file), ("metrics.tls.key_file", metrics_tls.key_file),
                ("metrics.tls.client_ca_file", metrics_tls.client_ca_file)) if metrics_tls is not None else ())]
    provided += [f"{field} {path}" for field, path in files if path is not None and systemd_provides(path)]
    return (problems + tls_file_problems(mqtt, skip=systemd_provides)
            + metrics_tls_problems(metrics_tls, skip=systemd_provides)), provided


def scheduled_request_problems(config: AgentConfig) -> list[tuple[str, str]]:
    """The local plans' requests against collect.max_scheduled_requests, counted as the collector counts
    them when it applies them (the plans in order: one that would pass the bound is rejected at start)."""
    settings = config.collect
    scheduled = 0
    found: list[tuple[str, str]] = []
    for index, body in enumerate(settings.plans):
        requests = len(plan_tasks(parse_plan(body, config), settings.max_dids_per_request))
        if scheduled + requests > settings.max_scheduled_requests:
            found.append((f"collect.plans[{index}]", f"the plan needs {requests} requests and the plans before it "
                                                     f"{scheduled}: more than collect.max_scheduled_requests "
                                                     f"({settings.max_scheduled_requests}); it would be rejected"))
            continue
        scheduled += requests
    return found
