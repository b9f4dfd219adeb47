"""One UDS request/response exchange over an ISO-TP link: P2/P2*, NRC 0x78 pending, NRC 0x21 retry."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

from udsoncan import Response

from agent.errors import AgentError

log = logging.getLogger(__name__)

NRC_BUSY_REPEAT = 0x21
NRC_RESPONSE_PENDING = 0x78


class Link(Protocol):
    """What a transaction needs of an ISO-TP link (userspace or kernel)."""

    def send(self, payload: bytes, timeout: float) -> None: ...
    def recv(self, timeout: float) -> bytes | None: ...
    def flush(self) -> None: ...


class NegativeResponseError(AgentError):
    def __init__(self, service: int, code: int) -> None:
        self.service = service
        self.code = code
        name = Response.Code.get_name(code)
        self.name = name if isinstance(name, str) else "Unknown"
        super().__init__(f"ECU refused service 0x{service:02X}: NRC 0x{code:02X} {self.name}")


class UdsTimeoutError(AgentError, TimeoutError):
    """No (final) response in time."""


class InvalidResponseError(AgentError, ValueError):
    """The ECU answered with bytes that are not a valid response to the request."""


@dataclass
class Timing:
    """Client-side waits in seconds; p2 and p2_star may be raised by the ECU's session response."""

    p2: float
    p2_star: float
    busy_retries: int


def transact(link: Link, request: bytes, timing: Timing, deadline: float, expect_response: bool = True) -> bytes:
    """Sends `request`, returns the positive response payload; raises the exceptions above.

    NRC 0x78 extends the wait to P2* (any number of times, within `deadline`). NRC 0x21 repeats the
    request after a bounded, doubling pause, at most `timing.busy_retries` times.
    """
    pause = 0.02
    for attempt in range(timing.busy_retries + 1):
        try:
            return _exchange(link, request, timing, deadline, expect_response)
        except NegativeResponseError as nrc:
            remaining = deadline - time.monotonic()
            if nrc.code != NRC_BUSY_REPEAT or attempt == timing.busy_retries or remaining <= pause:
                raise
            log.debug("ECU busy (0x21), repeating request in %.0f ms", pause * 1000)
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
    raise AssertionError("unreachable")


def _exchange(link: Link, request: bytes, timing: Timing, deadline: float, expect_response: bool) -> bytes:
    sid = request[0]
    link.flush()
    link.send(request, timeout=max(0.001, min(deadline - time.monotonic(), timing.p2_star)))
    if not expect_response:
        return b""
    wait, which = timing.p2, "P2"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UdsTimeoutError(f"no response to service 0x{sid:02X} before the command deadline")
        data = link.recv(min(wait, remaining))
        if data is None:
            if wait < remaining:
                raise UdsTimeoutError(f"no response to service 0x{sid:02X} within {which} ({wait * 1000:.0f} ms)")
            raise UdsTimeoutError(f"no response to service 0x{sid:02X} before the command deadline")
        if not data:
            raise InvalidResponseError("empty response")
        if data[0] == 0x7F:
            if len(data) < 3:
                raise InvalidResponseError(f"truncated negative response {data.hex()}")
            if data[1] != sid:
                log.debug("ignoring negative response for service 0x%02X", data[1])
                continue
            if data[2] == NRC_RESPONSE_PENDING:
                wait, which = timing.p2_star, "P2*"
                continue
            raise NegativeResponseError(sid, data[2])
        if data[0] != sid + 0x40:
            log.debug("ignoring response 0x%02X while waiting for 0x%02X", data[0], sid + 0x40)
            continue
        return data
