"""Starts a private Mosquitto on a free loopback port (the demo and the test suite use it)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerUnavailableError(RuntimeError):
    """No mosquitto binary, or it did not start."""


def find_mosquitto() -> str:
    found = shutil.which("mosquitto") or next((p for p in SEARCH if Path(p).exists()), None)
    if found is None:
        raise BrokerUnavailableError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class BrokerTls:
    ca_file: Path
    cert_file: Path
    key_file: Path
    require_certificate: bool = True


class LocalBroker:
    """A mosquitto process with a generated config in `workdir`; restartable on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, tls: BrokerTls | None = None,
                 extra: str = "") -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.tls = tls
        self._extra = extra
        self._proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "mosquitto.conf"
        self.log_file = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        lines = [
            # Stay the user who started it: a root-started mosquitto would otherwise become `mosquitto`
            # and lose access to the files generated for it.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 1",
            "max_queued_messages 10000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if self.tls:
            lines += [f"cafile {self.tls.ca_file}", f"certfile {self.tls.cert_file}", f"keyfile {self.tls.key_file}",
                      f"require_certificate {'true' if self.tls.require_certificate else 'false'}"]
        self.config_file.write_text("\n".join(lines) + "\n" + self._extra)

    def start(self, timeout: float = 10.0) -> LocalBroker:
        self._write_config()
        log = self.log_file.open("ab")
        self._proc = subprocess.Popen([find_mosquitto(), "-c", str(self.config_file)], stdout=log, stderr=log,
                                      stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerUnavailableError(f"mosquitto exited: {self.log_file.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerUnavailableError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self) -> None:
        """Stops the broker cleanly (it saves its persistent sessions)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: no clean save; what `persistence` with `autosave_on_changes` must survive (chaos runs)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
        self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
