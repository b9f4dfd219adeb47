"""The MQTT link's credentials, set up before it connects: the password, and TLS with a client key only we
can read.

Apart from link.py: the backend caller (caller.py) reads the password the same way."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from agent.config.model import MqttConfig
from agent.config.tlsfiles import key_file_problem, load_failure
from agent.errors import AgentError


class LinkSetupError(AgentError, ValueError):
    """Credentials or TLS files are unusable; the agent must not start (exit 78)."""


def read_secret(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").rstrip("\n")
    except OSError as err:
        raise LinkSetupError(f"cannot read {path}: {err.strerror or err}") from err


def check_key_file(path: Path) -> None:
    """Refuses a private key that other users can read."""
    problem = key_file_problem(path, "client key")
    if problem is not None:
        raise LinkSetupError(problem)


def password_of(config: MqttConfig, environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    if config.password_file is not None:
        try:
            return read_secret(config.password_file)
        except LinkSetupError as err:
            raise LinkSetupError(f"mqtt.password_file: {err}") from err
    if config.password_credential is not None:
        directory = env.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise LinkSetupError("password_credential is set but $CREDENTIALS_DIRECTORY is not (use LoadCredential=)")
        return read_secret(Path(directory) / config.password_credential)
    return None


def use_tls(client: mqtt.Client, config: MqttConfig) -> None:
    """TLS on a paho client (the link's, the backend caller's): the CA, the client certificate and its key
    (refused when other users can read it), the broker's hostname checked unless `verify_hostname: false`.
    Raises LinkSetupError, each problem named by its field as check-config names it."""
    tls = config.tls
    problems = tls_file_problems(config)
    if problems:
        raise LinkSetupError("; ".join(f"{field}: {problem}" for field, problem in problems))
    ca = str(tls.ca_file) if tls and tls.ca_file else None
    cert = str(tls.cert_file) if tls and tls.cert_file else None
    key = str(tls.key_file) if tls and tls.key_file else None
    try:
        client.tls_set(ca_certs=ca, certfile=cert, keyfile=key, cert_reqs=ssl.CERT_REQUIRED,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    except (OSError, ssl.SSLError) as err:
        raise LinkSetupError(f"TLS setup failed: {err}") from err
    client.tls_insecure_set(not (tls.verify_hostname if tls else True))


def tls_file_problems(config: MqttConfig, skip: Callable[[Path], bool] = lambda path: False) -> list[tuple[str, str]]:
    """The TLS files as the link loads them, before it connects: (field path, what is wrong) for each
    problem. Files `skip` returns True for are not read (check-config: systemd's credentials exist only
    inside the service)."""
    tls = config.tls
    if tls is None:
        return []
    problems: list[tuple[str, str]] = []
    if tls.ca_file is not None and not skip(tls.ca_file):
        try:
            ssl.create_default_context(cafile=str(tls.ca_file))
        except (OSError, ssl.SSLError) as err:
            problems.append(("mqtt.tls.ca_file",
                             f"{tls.ca_file} is not a readable PEM CA certificate: {load_failure(err)}"))
    key = tls.key_file
    if key is not None and not skip(key):
        try:
            check_key_file(key)
        except LinkSetupError as err:
            return [*problems, ("mqtt.tls.key_file", str(err))]
    if tls.cert_file is not None and not skip(tls.cert_file) and (key is None or not skip(key)):
        try:  # the pair as the link loads it: a key that is not the certificate's is refused here
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(tls.cert_file), str(key) if key else None)
        except (OSError, ssl.SSLError) as err:
            problems.append(("mqtt.tls.cert_file", f"{tls.cert_file} with the key {key or '(in the same file)'} "
                                                   f"cannot be loaded: {load_failure(err)}"))
    return problems
