"""RFC 3339 timestamps as the protocol writes and reads them: UTC with milliseconds. Pure."""

from __future__ import annotations

import math
import re
import time
from datetime import UTC, datetime

_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


_LAST_SECOND = 253402300799  # 9999-12-31T23:59:59Z: beyond it (and before 1970) datetime does the work
_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def format_rfc3339(epoch: float) -> str:
    """Epoch seconds as UTC with milliseconds: 2026-11-28T10:00:01.120Z.

    The same text as `datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")` (its
    rounding to microseconds, then milliseconds cut off), with the date and time of day formatted once
    per second: several timestamps go into every message.
    """
    global _second
    fraction, whole = math.modf(epoch)
    micro = round(fraction * 1e6)  # as datetime.fromtimestamp rounds (half to even)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    elif micro < 0:
        whole, micro = whole - 1, micro + 1_000_000
    second = int(whole)
    if not 0 <= second <= _LAST_SECOND:
        return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    cached = _second
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{micro // 1000:03d}Z"


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
