"""The stop request a SIGTERM/SIGINT makes, safe to set from a signal handler.

A handler that called `threading.Event.set()` could deadlock the daemon for good: Python runs the
handler on the main thread between two bytecodes, and when that lands while the main thread is inside
`Event.wait()` holding the Event's own (non-reentrant) lock, `set()` waits for that lock forever. The
agent then ignored SIGTERM until systemd killed it (a test caught it under load). Here setting takes no
lock: a flag, and a byte written to a pipe that `wait()` selects on, so a signal that lands anywhere wakes it.
"""

from __future__ import annotations

import contextlib
import os
import select


class StopSignal:
    """`set()` from anywhere (a signal handler included); `wait(timeout)` returns True once it is set."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._set = False

    def set(self) -> None:
        self._set = True
        with contextlib.suppress(BlockingIOError):  # the pipe is full: it is readable already
            os.write(self._write, b"\0")

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        if not self._set:
            select.select([self._read], [], [], timeout)  # retried after a signal's handler (PEP 475)
        return self._set
