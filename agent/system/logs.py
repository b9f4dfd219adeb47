"""Logging setup: JSON lines on stderr for journald, readable lines on a terminal."""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else came in through `extra=` and is emitted as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class HumanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = _fields(record)
        return f"{text}  {' '.join(f'{k}={v}' for k, v in extra.items())}" if extra else text


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Configures the root logger once; fmt is 'json', 'human' or 'auto' (human on a terminal)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else HumanFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party libraries log every frame at DEBUG/INFO; keep them at WARNING unless we debug.
    for noisy in ("can", "isotp", "udsoncan", "Connection"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    # python-can's socketcand client retries a refused connection in a busy loop for 10 s with a warning
    # each time (about 10,000 lines a second); the agent's bus owner reports the failure once instead.
    logging.getLogger("can.interfaces.socketcand").setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
    threading.excepthook = _log_thread_exception


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    """Uncaught exceptions in threads become one structured log line instead of a stray traceback."""
    logging.getLogger("agent.threads").error(
        "thread %s ended with %s: %s", args.thread.name if args.thread else "?",
        args.exc_type.__name__, args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )

