"""The MQTT link's credentials, set up before it connects: the password, and TLS with a client key only we
can read.

Apart from link.py: the backend caller (caller.py) reads the password the same way."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt

from agent.config.model import MqttConfig, TlsConfig
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
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise LinkSetupError(f"cannot read client key {path}: {err.strerror or err}") from err
    if mode & 0o004:
        raise LinkSetupError(f"client key {path} is world-readable (mode {mode & 0o777:o}); chmod 600 it")


def password_of(config: MqttConfig, environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    if config.password_file is not None:
        return read_secret(config.password_file)
    if config.password_credential is not None:
        directory = env.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise LinkSetupError("password_credential is set but $CREDENTIALS_DIRECTORY is not (use LoadCredential=)")
        return read_secret(Path(directory) / config.password_credential)
    return None


def use_tls(client: mqtt.Client, tls: TlsConfig | None) -> None:
    """TLS on the link's paho client: the CA, the client certificate and its key (refused when other users
    can read it), the broker's hostname checked unless `verify_hostname: false`. Raises LinkSetupError."""
    ca = str(tls.ca_file) if tls and tls.ca_file else None
    cert = str(tls.cert_file) if tls and tls.cert_file else None
    key = str(tls.key_file) if tls and tls.key_file else None
    if tls and tls.key_file:
        check_key_file(tls.key_file)
    try:
        client.tls_set(ca_certs=ca, certfile=cert, keyfile=key, cert_reqs=ssl.CERT_REQUIRED,
                       tls_version=ssl.PROTOCOL_TLS_CLIENT)
    except (OSError, ssl.SSLError) as err:
        raise LinkSetupError(f"TLS setup failed: {err}") from err
    client.tls_insecure_set(not (tls.verify_hostname if tls else True))
