"""One agent per state directory: an exclusive lock on a file in it, naming the process that holds it."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from agent.errors import AgentError

LOCK_FILE = "agent.lock"


class StateLockedError(AgentError, RuntimeError):
    """Another process holds the state directory (two agents with one config would fight over the
    ledger, the outbox and the broker session)."""

    def __init__(self, directory: Path, holder: str) -> None:
        self.holder = holder
        super().__init__(f"another agent (pid {holder}) is running with the state directory {directory}; "
                         f"stop it first, or give this one its own --state-dir and client id")


class StateLock:
    """flock(2) on `{state_dir}/agent.lock`: released by the kernel when the process ends, even by SIGKILL."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock and writes our pid into the file; raises StateLockedError naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateLockedError(self.directory, holder) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # a full disk: the lock is not kept half-taken (closing the fd releases it)
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
