"""Counts the agent's WARNING, ERROR and CRITICAL log lines by level: every error path the code logs has a metric."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter

LEVELS = ("warning", "error", "critical")


class LogCounter(logging.Handler):
    """A handler for the `agent` logger (third-party libraries log elsewhere). The level is the only
    label: the journal names the logger and the line; the metric says a vehicle has something to read."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(level=logging.WARNING)
        self.lines = Counter("sovd_log_messages", "WARNING, ERROR and CRITICAL lines the agent logged, by level.",
                             ["level"], registry=registry)
        for level in LEVELS:
            self.lines.labels(level)

    def emit(self, record: logging.LogRecord) -> None:
        number = record.levelno
        self.lines.labels("critical" if number >= logging.CRITICAL else "error" if number >= logging.ERROR
                          else "warning").inc()

    def attach(self, logger: str = "agent") -> None:
        logging.getLogger(logger).addHandler(self)

    def detach(self, logger: str = "agent") -> None:
        logging.getLogger(logger).removeHandler(self)
