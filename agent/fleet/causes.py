"""Why the link is down, as text: paho's error lines caught as causes, and the causes that say nothing.

Apart from link.py: they judge and pass on log text and hold no connection state."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

# CONNACK reason codes that refuse a connection (MQTT 5, 3.2.2.2; paho maps 3.1.1's return codes onto them)
# and the bounded label values the agent counts them under.
REFUSALS = {0x80: "unspecified_error", 0x81: "malformed_packet", 0x82: "protocol_error",
            0x83: "implementation_specific_error", 0x84: "unsupported_protocol_version",
            0x85: "client_identifier_not_valid", 0x86: "bad_username_or_password", 0x87: "not_authorized",
            0x88: "server_unavailable", 0x89: "server_busy", 0x8A: "banned", 0x8C: "bad_authentication_method",
            0x95: "packet_too_large", 0x97: "quota_exceeded", 0x9C: "use_another_server", 0x9D: "server_moved",
            0x9F: "connection_rate_exceeded"}


def refusal_name(code: int | None) -> str:
    """The label of a CONNACK refusal code ("other" for one not in REFUSALS)."""
    return REFUSALS.get(code, "other") if code is not None else "other"


_UNINFORMATIVE = ("eof occurred", "connection reset", "broken pipe", "connection lost")


def uninformative(reason: str) -> bool:
    """A cause that says only that the connection went away, not why."""
    low = reason.lower()
    return any(text in low for text in _UNINFORMATIVE) or low.endswith("unspecified error")


class PahoLog:
    """What paho's `_logger` needs (`log`): passes a line on to `logger` when its level is on, and hands
    error lines (formatted only then) to `on_error`."""

    def __init__(self, logger: logging.Logger, on_error: Callable[[str], None]) -> None:
        self._logger = logger
        self._on_error = on_error

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if level >= logging.ERROR:
            self._on_error(fmt % args)
        if self._logger.isEnabledFor(level):
            self._logger.log(level, fmt, *args)
