"""`sovd-edge run`: the daemon. Bus, workers and the MQTT link; stops cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import logging
import os
import pwd
import sys
from pathlib import Path
from typing import Any

from agent import __version__
from agent.cli import common as c
from agent.config.model import AgentConfig
from agent.devtools.sim.simulator import simulators_for
from agent.errors import ConfigError
from agent.fleet.credentials import LinkSetupError
from agent.metrics.server import MetricsServerError
from agent.store.sqlite import NewerStoreError, StoreError
from agent.system.daemon import run_until_stopped
from agent.system.service import Service
from agent.system.statelock import StateLock, StateLockedError

log = logging.getLogger("agent.run")

EXITS = {
    **c.ALWAYS,
    c.EXIT_OK: "stopped cleanly by SIGTERM/SIGINT",
    c.EXIT_DATAERR: "the store was written by a newer agent (a rollback): left untouched; systemd does not restart "
                    "on it",
    c.EXIT_UNAVAILABLE: "the metrics endpoint cannot listen (the CAN bus and the broker are retried instead)",
    c.EXIT_SOFTWARE: "an essential thread died, or a bug raised; systemd restarts the agent",
    c.EXIT_CANTCREAT: "the state directory cannot be created or written, or no store can be created in it, or "
                       "it is another user's (the service's) and this is root, or the --sim-journal file cannot "
                       "be opened",
    c.EXIT_TEMPFAIL: "another agent holds the state directory (the message names its pid)",
    c.EXIT_CONFIG: "the config file is invalid, or a credential or TLS file is unusable; systemd does not "
                   "restart on it",
}


def add_parser(sub: Any) -> None:
    p = c.add_subcommand(sub, "run", "Run the agent daemon (systemd starts this).",
                         "sovd-edge run -c /etc/sovd-edge/agent.yaml --state-dir /var/lib/sovd-edge",
                         EXITS, c.with_agent_config(handle))
    c.add_config_flag(p)
    c.add_state_dir_flag(p, "where the durable store lives (default: from the config)")
    c.add_broker_flag(p)
    p.add_argument("--metrics-listen", help="HOST:PORT for the Prometheus endpoint, overriding the config")
    p.add_argument("--grace", type=c.seconds, default=5.0,
                   help="seconds in-flight commands get to finish on stop (default 5)")
    p.add_argument("--sim-journal", type=Path,
                   help="append every request the in-process simulated ECUs execute to this file (tests, demos)")
    c.add_logging_flags(p, None)


def handle(args: argparse.Namespace, config: AgentConfig) -> int:
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        if not os.access(config.state_dir, os.W_OK):
            raise PermissionError(f"{config.state_dir} is not writable")
    except OSError as err:
        log.error("cannot use state directory: %s (it must be a directory this user can write: systemd creates "
                  "it with StateDirectory=, by hand `install -d -o sovd-edge %s`; `sovd-edge doctor` checks it)",
                  err, config.state_dir, extra={"state_dir": str(config.state_dir)})
        return c.EXIT_CANTCREAT
    owner = config.state_dir.stat().st_uid
    if os.geteuid() == 0 and owner != 0:
        # what root creates there (the lock, a fresh store, its WAL) the service's user cannot open afterwards,
        # and systemd's StateDirectory= does not give back files inside a directory it already owns
        log.error("refusing to run as root with %s, the state directory of user %s (the service's): the files "
                  "root would create there lock that user out. Run it as that user (sudo -u %s ...), or give "
                  "this run its own --state-dir", config.state_dir, _user(owner), _user(owner),
                  extra={"state_dir": str(config.state_dir)})
        return c.EXIT_CANTCREAT
    lock = StateLock(config.state_dir)
    try:
        lock.acquire()
    except StateLockedError as err:
        log.error("%s", err, extra={"state_dir": str(config.state_dir), "holder_pid": err.holder})
        return c.EXIT_TEMPFAIL
    except OSError as err:
        log.error("cannot lock the state directory: %s%s", err, _foreign_files(config.state_dir),
                  extra={"state_dir": str(config.state_dir)})
        return c.EXIT_CANTCREAT
    try:
        return _run(args, config)
    finally:
        lock.release()


def _run(args: argparse.Namespace, config: AgentConfig) -> int:
    stop = c.stop_on_signals()
    # systemd's watchdog ends a process that stopped pinging with SIGABRT: every thread's stack goes to
    # the journal on the way out, the one trace of where a hung main loop waited (also on SIGSEGV & co.)
    with contextlib.suppress(AttributeError, ValueError, OSError):  # a stderr without a file descriptor
        faulthandler.enable(file=sys.stderr, all_threads=True)
    try:
        companions = simulators_for(config, journal=args.sim_journal)
    except OSError as err:
        log.error("cannot open --sim-journal %s: %s", args.sim_journal, err.strerror or err)
        return c.EXIT_CANTCREAT
    except ConfigError as err:  # a simulate: file
        log.error("invalid configuration: %s", err)
        return c.EXIT_CONFIG
    try:
        service = Service(config, companions=companions)
    except LinkSetupError as err:
        log.error("MQTT link cannot be set up: %s", err)
        return c.EXIT_CONFIG
    except ConfigError as err:  # e.g. a signing key file that cannot be read
        log.error("invalid configuration: %s", err)
        return c.EXIT_CONFIG
    except NewerStoreError as err:  # a rollback: what its rows mean may have changed; never touched
        log.error("cannot run on this store: %s", err, extra={"store": err.path, "schema_version": err.found})
        return c.EXIT_DATAERR
    except StoreError as err:  # not even a fresh store can be created: the state dir is unusable
        log.error("cannot open the store in %s: %s", config.state_dir, err)
        return c.EXIT_CANTCREAT
    try:
        started = service.start(wait=1.0)
    except MetricsServerError as err:  # nothing else was started, and start() closed the store: one line
        log.error("%s", err)  # it says what to look at
        return c.EXIT_UNAVAILABLE
    log.info("sovd-edge %s starting", __version__, extra={"vehicle": config.vehicle, "config": args.config,
                                                           "broker": config.mqtt.broker})
    if not started:
        log.warning("CAN bus not up yet; retrying in the background",
                    extra={"error": service.runtime.owner.last_error})
    clean = run_until_stopped(service, stop, args.grace)
    return c.EXIT_OK if clean else c.EXIT_SOFTWARE


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _foreign_files(directory: Path) -> str:
    """What to do when files in the state directory belong to another user (an agent once run as root)."""
    me = os.geteuid()
    try:
        foreign = sorted({_user(p.stat().st_uid) for p in directory.iterdir() if p.stat().st_uid != me})
    except OSError:
        return ""
    if not foreign:
        return ""
    return (f" (files in it belong to {', '.join(foreign)}, not to {_user(me)}: an agent run as another user? "
            f"give them back: sudo chown -R {_user(me)}: {directory})")
