"""One agent per state directory: an exclusive lock on the directory itself, and on a file in it that
names the process holding it.

The directory's lock is the one that cannot be lost: an operator who deletes `agent.lock` as a "stale
lock file" while the agent runs would otherwise let a second agent lock a new file of that name and run
the same ledger's commands again. The file's lock keeps an agent from before the directory lock out.
"""

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
    """flock(2) on `{state_dir}` and on `{state_dir}/agent.lock`: released by the kernel when the process
    ends, even by SIGKILL."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE
        self._fds: list[int] = []

    def acquire(self) -> None:
        """Takes both locks and writes our pid into the file; raises StateLockedError naming the holder."""
        try:
            # the directory may be a symlink (to another disk); the file may not: followed, the pid written into
            # it would truncate whatever it names (ELOOP: run exits 73, as doctor says "not a file")
            for path, flags in ((self.directory, os.O_RDONLY | os.O_DIRECTORY),
                                (self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)):
                fd = os.open(path, flags, 0o640)
                self._fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise StateLockedError(self.directory, self._holder()) from None
            os.ftruncate(self._fds[-1], 0)
            os.pwrite(self._fds[-1], f"{os.getpid()}\n".encode(), 0)
        except BaseException:  # locked elsewhere, or a full disk: no lock is kept half-taken (closing releases it)
            self.release()
            raise

    def _holder(self) -> str:
        """The pid the holder wrote, or "unknown" (the file deleted or not written yet)."""
        try:
            with open(self.path, "rb") as file:
                return file.read(32).decode(errors="replace").strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
