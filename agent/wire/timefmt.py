"""RFC 3339 timestamps as the protocol writes and reads them: UTC with milliseconds. Pure."""

from __future__ import annotations

import re
from datetime import UTC, datetime

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def format_rfc3339(epoch: float) -> str:
    """Epoch seconds as UTC with milliseconds: 2026-11-28T10:00:01.120Z."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """Epoch seconds of an RFC 3339 timestamp with a time zone; ValueError says why it is not one.

    The instant must lie within the years 1 to 9999 in UTC (what `format_rfc3339` can write): RFC 3339
    allows "0001-01-01T00:00:00+23:59", a day before year 1, and a number for it would raise wherever it
    is shown again.
    """
    if not _RFC3339.fullmatch(text):
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp with a time zone")
    try:
        instant = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError as err:
        raise ValueError(f"{text!r} is not a valid timestamp: {err}") from None
    try:
        instant.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"{text!r} cannot be represented: it is outside the years 1 to 9999 in UTC") from None
    return instant.timestamp()
