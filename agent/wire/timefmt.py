"""RFC 3339 timestamps as the protocol writes and reads them: UTC with milliseconds. Pure."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def format_rfc3339(epoch: float) -> str:
    """Epoch seconds as UTC with milliseconds: 2026-11-28T10:00:01.120Z."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """Epoch seconds of an RFC 3339 timestamp with a time zone; ValueError says why it is not one."""
    if not _RFC3339.fullmatch(text):
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp with a time zone")
    try:
        return datetime.fromisoformat(text.replace("z", "Z")).timestamp()
    except ValueError as err:
        raise ValueError(f"{text!r} is not a valid timestamp: {err}") from None
