"""Serves the agent's registry over HTTP(S) with prometheus-client (OpenMetrics by content negotiation)."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from agent.config.model import MetricsConfig, MetricsTls
from agent.config.tlsfiles import key_file_problem, load_failure
from agent.errors import AgentError

log = logging.getLogger(__name__)


class MetricsServerError(AgentError, OSError):
    """The endpoint could not be opened (port taken, bad certificate)."""


def tls_file_problems(tls: MetricsTls | None, skip: Callable[[Path], bool] = lambda path: False,
                      ) -> list[tuple[str, str]]:
    """The endpoint's TLS files as `start` loads them: (field path, what is wrong) for each problem, so that
    `run` refuses them as a bad config (exit 78) and check-config finds them first. Files `skip` returns
    True for are not read (check-config: systemd's credentials exist only inside the service)."""
    if tls is None:
        return []
    problems: list[tuple[str, str]] = []
    key_ok = skip(tls.key_file) or (problem := key_file_problem(tls.key_file, "metrics key")) is None
    if not key_ok:
        problems.append(("metrics.tls.key_file", problem))
    elif not skip(tls.cert_file) and not skip(tls.key_file):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (OSError, ssl.SSLError) as err:
            problems.append(("metrics.tls.cert_file", f"{tls.cert_file} with the key {tls.key_file} cannot be "
                                                      f"loaded: {load_failure(err)}"))
    if tls.client_ca_file is not None and not skip(tls.client_ca_file):
        try:
            ssl.create_default_context(cafile=str(tls.client_ca_file))
        except (OSError, ssl.SSLError) as err:
            problems.append(("metrics.tls.client_ca_file", f"{tls.client_ca_file} is not a readable PEM CA "
                                                           f"certificate: {load_failure(err)}"))
    return problems


class MetricsServer:
    def __init__(self, config: MetricsConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def start(self) -> None:
        tls = self.config.tls
        try:
            self._server, self._thread = start_http_server(
                self.config.listen_port, addr=self.config.listen_host, registry=self.registry,
                certfile=str(tls.cert_file) if tls else None, keyfile=str(tls.key_file) if tls else None,
                client_cafile=str(tls.client_ca_file) if tls and tls.client_ca_file else None,
                client_auth_required=bool(tls and tls.client_ca_file),
            )
        except (OSError, ValueError) as err:
            raise MetricsServerError(f"cannot serve metrics on {self.config.listen_host}:"
                                     f"{self.config.listen_port}: {err} ({_hint(err)})") from err
        self._thread.name = "metrics-http"
        log.info("metrics endpoint up", extra={"listen": f"{self.config.listen_host}:{self.port}",
                                               "tls": tls is not None})

    @property
    def alive(self) -> bool:
        """The serving thread runs (the watchdog checks it: a dead endpoint is a silent edge)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 3.0) -> None:
        """Stops serving within `timeout`. serve_forever looks for a stop only between its 0.5 s polls,
        which every stop of the agent waited out: a connection made once the stop is asked for wakes it
        at once, and it leaves without accepting that connection (socketserver, bpo-35017)."""
        end = time.monotonic() + timeout
        if self._server is not None:
            server = self._server
            stopping = threading.Thread(target=server.shutdown, name="metrics-stop", daemon=True)
            stopping.start()
            while stopping.is_alive() and time.monotonic() < end:
                if getattr(server, "_BaseServer__shutdown_request", False):  # (no such flag: the poll ends it)
                    self._knock()
                stopping.join(0.01)
            server.server_close()
        if self._thread is not None:
            self._thread.join(max(0.0, end - time.monotonic()))

    def _knock(self) -> None:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.config.listen_host,
                                                                          self.config.listen_host)
        with contextlib.suppress(OSError):
            socket.create_connection((host, self.port), timeout=0.1).close()


def _hint(err: Exception) -> str:
    """What to look at, by what went wrong: the setting is `metrics.listen` (or --metrics-listen)."""
    if isinstance(err, OSError) and err.errno == errno.EADDRINUSE:
        return "is another agent or exporter using it? choose another port in metrics.listen"
    if isinstance(err, OSError) and err.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
        return "metrics.listen must be an address of this host, and a port this user may bind"
    if isinstance(err, OSError) and not isinstance(err, ssl.SSLError) and err.filename is None:
        return "check the host in metrics.listen: a name that resolves or an address of this host"
    return "check metrics.listen and metrics.tls"
