"""The daemon's main loop: tells systemd the truth (READY, STATUS, watchdog, STOPPING) and stops cleanly."""

from __future__ import annotations

import logging
import threading
import time

from agent import __version__
from agent.system.sdnotify import SystemdNotifier
from agent.system.service import Service
from agent.system.stopsignal import StopSignal

log = logging.getLogger("agent.run")

STATUS_EVERY_S = 5.0


def run_until_stopped(service: Service, stop: StopSignal | threading.Event, grace: float,
                      notifier: SystemdNotifier | None = None) -> bool:
    """Runs a started service until `stop` is set (SIGTERM/SIGINT): True when it stopped cleanly,
    False when it stopped because an essential thread died or the loop itself failed (the CLI turns that
    into an exit code)."""
    notify = notifier or SystemdNotifier()
    if notify.watchdog_s:
        log.info("systemd watchdog every %.1f s", notify.watchdog_s)
    try:
        return _loop(service, stop, grace, notify)
    except Exception:  # a bug in a health check: still a clean stop (commands queued again, offline status)
        log.exception("the main loop failed; stopping so systemd restarts the agent")
        notify.stopping("restarting after the main loop failed")
        service.stop(grace)
        notify.close()
        return False


def _loop(service: Service, stop: StopSignal | threading.Event, grace: float, notify: SystemdNotifier) -> bool:
    ready = False
    last_ping = last_status = 0.0
    last_problems: list[str] = []
    while True:
        service.runtime.revive_dead_workers()
        now = time.monotonic()
        if not ready and service.runtime.owner.is_up:
            ready = True
            notify.ready(service.status_line())
            log.info("ready", extra={"version": __version__, "bus": service.config.bus.channel})
        problems = service.health()
        if notify.watchdog_s and ready and now - last_ping >= notify.watchdog_s / 2:
            if wedged := service.wedged():  # only what a restart cures: not a full disk
                log.error("not feeding the watchdog: %s", "; ".join(wedged))
            else:
                notify.watchdog()
                last_ping = now
        if now - last_status >= STATUS_EVERY_S or problems != last_problems:  # health changes show at once
            notify.status(service.status_line() if not problems else f"unhealthy: {'; '.join(problems)}")
            last_status, last_problems = now, problems
        dead = [p for p in problems if p.endswith("thread died")]
        if dead:
            log.error("essential threads died (%s); exiting so systemd restarts the agent", ", ".join(dead))
            notify.stopping("restarting after a thread died")
            service.stop(grace)
            return False
        if stop.wait(_tick(notify)):
            break
    log.info("stopping")
    notify.stopping()
    service.stop(grace)
    log.info("stopped")
    notify.close()
    return True


def _tick(notify: SystemdNotifier) -> float:
    """Loop period: fast enough for pings at half the watchdog interval, otherwise once a second."""
    return min(1.0, notify.watchdog_s / 4) if notify.watchdog_s else 1.0
