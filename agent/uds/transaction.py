"""One UDS request/response exchange over an ISO-TP link: answers matched to their request by echo,
suppressPosRspMsgIndicationBit, P2/P2*, NRC 0x78 pending, NRC 0x21 retry.

An answer counts only if it echoes the request (`answers`): service id, and per service the
sub-function, DID, routine id, DTC number, block counter or memory address the ECU must repeat. A
positive answer that does not echo the request, or a negative one for another service, is stale (an
earlier request's late answer, another tester's exchange): it is discarded and logged at DEBUG, and
the wait for the real answer goes on within the same P2 window. The link is flushed before every
request. The echo table is hand-written: udsoncan's services have no stand-alone check, their
`interpret_response` only parses (its client compares the echoes); the executor still runs
`interpret_response` on every answer it understands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.errors import AgentError
from agent.uds.response import code_name

log = logging.getLogger(__name__)

NRC_BUSY_REPEAT = 0x21
NRC_RESPONSE_PENDING = 0x78
NEGATIVE_RESPONSE = 0x7F

# Services whose second byte is a sub-function with the suppressPosRspMsgIndicationBit (ISO 14229-1:2013
# per service; ReadDTCInformation's reportType has no such bit).
SPRMIB_SERVICES = frozenset({0x10, 0x11, 0x27, 0x28, 0x29, 0x2C, 0x31, 0x3E, 0x83, 0x85, 0x86, 0x87})
# Services whose positive response repeats the request's first byte after the service id (with the
# SPRMIB cleared where there is one): sub-functions, OBD PIDs and info types, block counters, modes.
_ECHO_FIRST_BYTE = SPRMIB_SERVICES | {0x01, 0x02, 0x05, 0x06, 0x08, 0x09, 0x19, 0x36, 0x38}
# Services whose positive response repeats a 2-byte identifier right after the service id.
_ECHO_DID = frozenset({0x22, 0x24, 0x2E, 0x2F})
# ReadDTCInformation sub-functions answered with the DTC number they were asked about.
_DTC_BY_NUMBER = frozenset({0x04, 0x06, 0x10})


class Link(Protocol):
    """What a transaction needs of an ISO-TP link (userspace or kernel).

    `recv(timeout, limit)`: `timeout` bounds the wait for a PDU to *start* (its first frame); a PDU
    that has started is received to its end, each frame bounded by N_Cr, the whole by `limit`
    (monotonic seconds).
    """

    def send(self, payload: bytes, timeout: float) -> None: ...
    def recv(self, timeout: float, limit: float) -> bytes | None: ...
    def flush(self) -> None: ...


class NegativeResponseError(AgentError):
    def __init__(self, service: int, code: int) -> None:
        self.service = service
        self.code = code
        name = code_name(code)
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


def suppresses_positive(request: bytes) -> bool:
    """The request asks the ECU not to answer positively (bit 7 of its sub-function)."""
    return len(request) >= 2 and request[0] in SPRMIB_SERVICES and bool(request[1] & 0x80)


def echo_prefix(request: bytes) -> bytes:
    """The bytes a positive response to `request` must start with: its service id + 0x40 and the echo."""
    sid = request[0]
    head = bytes([(sid + 0x40) & 0xFF])
    if len(request) < 2:
        return head
    if sid in _ECHO_DID and len(request) >= 3:
        return head + request[1:3]
    if sid == 0x31 and len(request) >= 4:  # routine control: type and routine id
        return head + bytes([request[1] & 0x7F]) + request[2:4]
    if sid == 0x2C and request[1] & 0x7F in (1, 2) and len(request) >= 4:  # dynamically defined DID
        return head + bytes([request[1] & 0x7F]) + request[2:4]
    if sid == 0x19 and request[1] in _DTC_BY_NUMBER and len(request) >= 5:
        return head + request[1:5]
    if sid == 0x3D:  # write memory: addressAndLengthFormatIdentifier, address and size
        alfid = request[1]
        return head + request[1:2 + (alfid & 0x0F) + (alfid >> 4)]
    if sid in _ECHO_FIRST_BYTE:
        return head + bytes([request[1] & 0x7F if sid in SPRMIB_SERVICES else request[1]])
    return head


def answers(request: bytes, response: bytes) -> bool:
    """Whether `response` (positive or negative) can be the answer to `request`."""
    if len(response) >= 2 and response[0] == NEGATIVE_RESPONSE:
        return response[1] == request[0]
    if request[0] == 0x01 and len(request) > 2:  # OBD-II PIDs: the ECU leaves out those it lacks, first or not
        return len(response) >= 2 and response[0] == 0x41 and response[1] in request[1:]
    return response.startswith(echo_prefix(request))


Discarded = Callable[[bytes], None]  # told of every answer a wait discarded as not the request's (a metric)


def transact(link: Link, request: bytes, timing: Timing, deadline: float,
             wait_negative: bool = True, *, accept: Callable[[bytes], object] | None = None,
             on_discard: Discarded | None = None) -> bytes | None:
    """Sends `request`, returns the positive response payload; raises the exceptions above.

    `accept` checks more of a positive answer than its echo can (a read's answer carries every DID
    asked for): one it refuses with InvalidResponseError is taken for a stale answer that happens to
    echo the request (a late answer to a read of fewer DIDs), discarded, and the wait goes on; only
    when no other answer comes in time is the refusal the exchange's error. `on_discard` is told of
    every answer discarded so.

    A request with the suppressPosRspMsgIndicationBit returns None once P2 passed without a negative
    response (`wait_negative=False`: at once, for S3 keepalives). NRC 0x78 extends the wait to P2*
    (any number of times, within `deadline`); after it the ECU owes a final answer even when
    suppression was asked. NRC 0x21 repeats the request after a bounded, doubling pause, at most
    `timing.busy_retries` times. Nothing is sent once `deadline` has passed (UdsTimeoutError).
    """
    pause = 0.02
    for attempt in range(timing.busy_retries + 1):
        try:
            return _exchange(link, request, timing, deadline, wait_negative, accept=accept, on_discard=on_discard)
        except NegativeResponseError as nrc:
            remaining = deadline - time.monotonic()
            if nrc.code != NRC_BUSY_REPEAT or attempt == timing.busy_retries or remaining <= pause:
                raise
            log.debug("ECU busy (0x21), repeating request in %.0f ms", pause * 1000)
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
    raise AssertionError("unreachable")


def _exchange(link: Link, request: bytes, timing: Timing, deadline: float, wait_negative: bool, *,
              accept: Callable[[bytes], object] | None = None, on_discard: Discarded | None = None) -> bytes | None:
    sid = request[0]
    refused: InvalidResponseError | None = None  # the last answer `accept` refused (and the answer itself)
    refused_data = b""

    def superseded() -> None:  # another answer is the result: the one set aside was discarded after all
        if refused is not None and on_discard is not None:
            on_discard(refused_data)

    discarded, last = 0, b""  # answers not for this request: a timeout says so, rather than "no response"
    suppressed = suppresses_positive(request)
    if time.monotonic() >= deadline:  # no request whose answer nobody waits for (it lands in the next exchange)
        raise UdsTimeoutError(f"command deadline passed before service 0x{sid:02X} could be sent")
    link.flush()
    # The send has the command's time: P2/P2* bound the wait for an answer, not a transfer paced by the
    # ECU's flow control (up to 127 ms a frame; each flow control itself is bounded by N_Bs).
    link.send(request, timeout=max(0.001, deadline - time.monotonic()))
    if suppressed and not wait_negative:
        return None
    pending = False
    window_end, which = time.monotonic() + timing.p2, "P2"
    while True:
        now = time.monotonic()
        if (now >= deadline or now >= window_end) and refused is not None:
            raise refused  # the ECU did answer, wrongly: that, not a timeout, is the result
        if now >= deadline:
            if suppressed and not pending:
                return None
            raise UdsTimeoutError(f"no response to service 0x{sid:02X} before the command deadline"
                                  + _discarded_note(discarded, last))
        if now >= window_end:
            if suppressed and not pending:
                return None  # no negative response within P2: the suppressed positive one stands
            raise UdsTimeoutError(f"no response to service 0x{sid:02X} within {which} "
                                  f"({(timing.p2_star if pending else timing.p2) * 1000:.0f} ms)"
                                  + _discarded_note(discarded, last))
        data = link.recv(min(window_end, deadline) - now, deadline)
        if data is None:
            continue
        if not answers(request, data):
            if log.isEnabledFor(logging.DEBUG):  # hex dumps only built when they are logged
                log.debug("discarding an answer that is not for request %s: %s", request[:4].hex(), data[:8].hex())
            discarded, last = discarded + 1, data
            if on_discard is not None:
                on_discard(data)
            continue
        if data[0] == NEGATIVE_RESPONSE:
            if len(data) < 3:
                raise InvalidResponseError(f"truncated negative response {data.hex()}")
            if data[2] == NRC_RESPONSE_PENDING:
                pending = True
                window_end, which = time.monotonic() + timing.p2_star, "P2*"
                continue
            superseded()
            raise NegativeResponseError(sid, data[2])
        if accept is not None:
            try:
                accept(data)
            except InvalidResponseError as err:
                log.debug("setting aside an answer to request %s that echoes it but does not fit it (%s): %s",
                          request[:4].hex(), err, data[:8].hex())
                superseded()
                refused, refused_data = err, data
                continue
        superseded()
        return data


def _discarded_note(discarded: int, last: bytes) -> str:
    if not discarded:
        return ""
    more = "..." if len(last) > 8 else ""
    return f"; {discarded} answer(s) discarded as not for this request (the last: {last[:8].hex()}{more})"
