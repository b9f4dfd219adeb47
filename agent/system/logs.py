"""Logging setup: JSON lines on stderr for journald, readable lines on a terminal."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
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


class LibraryRateLimit(logging.Filter):
    """At most `burst` records per message per `window_s` from third-party libraries (python-can retries
    a connection in a loop and logs each try): the first ones pass, the rest are counted, and the
    next one that passes says how many were suppressed. The agent's own loggers are never limited."""

    def __init__(self, prefixes: tuple[str, ...] = ("can", "isotp", "udsoncan", "paho"), burst: int = 3,
                 window_s: float = 60.0) -> None:
        super().__init__()
        self._prefixes = prefixes
        self._burst = burst
        self._window_s = window_s
        self._seen: dict[tuple[str, str], tuple[float, int, int]] = {}  # key -> (window start, passed, dropped)
        self._lock = threading.Lock()
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        root = record.name.split(".", 1)[0]
        if root not in self._prefixes:
            return True
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            start, passed, dropped = self._seen.get(key, (now, 0, 0))
            if now - start >= self._window_s:
                start, passed = now, 0
            if passed >= self._burst:
                self._seen[key] = (start, passed, dropped + 1)
                self.suppressed += 1
                return False
            self._seen[key] = (start, passed + 1, 0)
            if len(self._seen) > 1000:  # bounded: forget the oldest windows
                for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:500]:
                    del self._seen[old]
        if dropped:
            record.suppressed = dropped
        return True


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Configures the root logger once; fmt is 'json', 'human' or 'auto' (human on a terminal)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else HumanFormatter())
    handler.addFilter(LibraryRateLimit())
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

