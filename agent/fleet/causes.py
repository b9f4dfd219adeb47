"""Why the link is down, as text: paho's error lines caught as causes, and the causes that say nothing.

Apart from link.py: they judge and pass on log text and hold no connection state."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

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
