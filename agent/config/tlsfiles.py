"""Rules for the TLS files the agent is given (the MQTT link's, the metrics endpoint's), shared so that
both say the same things: a private key other users may read is refused, not used; a file that fails
to load is named with the reason in words, not an OpenSSL symbol."""

from __future__ import annotations

import ssl
from pathlib import Path


def key_file_problem(path: Path, what: str) -> str | None:
    """What is wrong with the key file at `path` (named `what` in the text), or None."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        return f"cannot read {what} {path}: {err.strerror or err}"
    if mode & 0o004:
        return f"{what} {path} is world-readable (mode {mode & 0o777:o}); chmod 600 it"
    return None


def load_failure(err: OSError | ssl.SSLError) -> str:
    """Why a certificate, CA or key file did not load, in words."""
    if isinstance(err, ssl.SSLError):
        return str(err.reason or err).replace("_", " ").lower()
    return err.strerror or str(err)
