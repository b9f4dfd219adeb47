"""Starting the measured processes: the agent (`sovd-edge run`), the naive bridge, bare can-isotp stacks.

Each is started with its own systemd notify socket (an abstract AF_UNIX datagram socket, as systemd
gives a Type=notify service) and a ProcessProbe attached right after exec.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bench.configs import ROOT
from bench.probe import ProcessProbe


class NotifySocket:
    """Plays systemd's side of sd_notify for one process: reads every datagram it sends, as systemd
    does (an unread socket would fill up and block the sender), and notes when READY=1 came."""

    def __init__(self) -> None:
        self.name = f"@sovd-bench-{uuid.uuid4().hex[:12]}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind("\0" + self.name[1:])
        self._sock.settimeout(0.2)
        self._ready = threading.Event()
        self.ready_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="bench-notify", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if self.ready_at is None and "READY=1" in data.decode(errors="replace").split("\n"):
                self.ready_at = time.monotonic()
                self._ready.set()

    def wait_ready(self, timeout: float, alive: subprocess.Popen[bytes]) -> float:
        """The monotonic time READY=1 arrived; RuntimeError if the process exits or it never comes."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
            if alive.poll() is not None:
                raise RuntimeError(f"process exited with {alive.returncode} before READY=1")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no READY=1 within {timeout} s")
        assert self.ready_at is not None
        return self.ready_at

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@dataclass
class Subject:
    """One measured process."""

    name: str
    proc: subprocess.Popen[bytes]
    probe: ProcessProbe
    log_path: Path
    started_at: float  # monotonic, just before exec
    notify: NotifySocket
    vehicle: str = ""
    ready_at: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from exec to READY=1."""
        if self.ready_at is None:
            try:
                self.ready_at = self.notify.wait_ready(timeout, self.proc)
            except RuntimeError as err:
                raise RuntimeError(f"{self.name}: {err}; log: {self.log_tail()}") from None
        return self.ready_at - self.started_at

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(5)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.probe.close()
        self.notify.close()
        return code


def spawn(name: str, argv: list[str], log_path: Path, stdin: int | IO[bytes] | None = subprocess.DEVNULL,
          stdout: int | IO[bytes] | None = None) -> Subject:
    """Starts `argv` (a Python module run by this interpreter) with a notify socket and a probe."""
    notify = NotifySocket()
    env = {**os.environ, "NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "30000000", "PYTHONUNBUFFERED": "1"}
    log = log_path.open("wb")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdin=stdin,
                            stdout=stdout if stdout is not None else log, stderr=log)
    log.close()
    return Subject(name, proc, ProcessProbe(proc.pid), log_path, started, notify)


def agent_argv(config: Path, broker: str) -> list[str]:
    return ["-m", "agent", "run", "-c", str(config), "--broker", broker, "--log-format", "json"]


def bridge_argv(config: Path, broker: str, nagle: bool = False) -> list[str]:
    return ["-m", "bench.bridge", "-c", str(config), "--broker", broker, *(["--nagle"] if nagle else [])]
