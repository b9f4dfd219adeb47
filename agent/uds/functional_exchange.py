"""One functional UDS request and every ECU's answer to it: answers matched by echo as in `transaction`,
collected by responder within P2 (P2* for an ECU that said 0x78), answers still under way received to their
end, those that broke off reported as lost.

Kept apart from `transaction` (one request, one answer) because the waiting is another one: a window,
several responders, a first final answer per responder. `uds.functional` turns the answers into results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from agent.uds.transaction import (
    NEGATIVE_RESPONSE,
    NRC_RESPONSE_PENDING,
    Discarded,
    InvalidResponseError,
    Timing,
    UdsTimeoutError,
    answers,
)

log = logging.getLogger(__name__)


class FunctionalPort(Protocol):
    """What a functional collection needs: one-frame requests out, (responder, PDU) pairs in, and the
    responders whose answer broke off under way (`lost`: responder -> why)."""

    def open(self, timeout: float) -> None: ...
    def close(self) -> None: ...
    def send(self, payload: bytes, timeout: float) -> None: ...
    def recv(self, timeout: float, limit: float) -> tuple[str, bytes] | None: ...
    def lost(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class Collected:
    """Every ECU's final answer by responder, and the responders whose answer broke off (with why)."""

    answers: dict[str, bytes]
    lost: dict[str, str]


def collect_answers(link: FunctionalPort, request: bytes, timing: Timing, deadline: float, *,
                    on_discard: Discarded | None = None,
                    accept: Callable[[bytes], object] | None = None) -> Collected:
    """Sends a functional request and returns every ECU's final answer (positive or negative), by responder.

    Answers count when they start within P2 of the request (one under way when P2 ends is received to
    its end, within `deadline`; nothing is read after it, however much keeps arriving); an ECU that
    answered NRC 0x78 gets P2* from then on for its final answer. Answers that do not echo the request
    are discarded (DEBUG), as in `transact`; an ECU's first final answer is its answer. An answer that
    broke off under way (N_Cr, the deadline) is in `lost` unless that ECU answered in full after all,
    and so is an ECU that said 0x78 and then nothing more. Nothing in either: nobody answered in time.
    A positive answer `accept` refuses (InvalidResponseError) is set aside as in `transact`: that ECU's
    next answer counts; the refused one is its answer only if none follows.
    """
    final: dict[str, bytes] = {}
    refused: dict[str, bytes] = {}  # by responder: its last answer that echoed the request but did not fit
    pending: dict[str, float] = {}  # responders that sent 0x78: until when their final answer counts
    if time.monotonic() >= deadline:
        raise UdsTimeoutError(f"command deadline passed before functional request 0x{request[0]:02X} could be sent")
    link.open(deadline - time.monotonic())
    try:
        link.send(request, timeout=max(0.001, deadline - time.monotonic()))
        window_end = time.monotonic() + timing.p2
        while True:
            now = time.monotonic()
            if now >= deadline:  # answers still under way are the link's to give up (`lost`) on close
                break
            end = min(max(window_end, *pending.values()) if pending else window_end, deadline)
            if now < end:
                got = link.recv(end - now, deadline)
                if got is None:
                    continue
            else:  # the window is closed, but answers that started in it are received to their end
                got = link.recv(0, deadline)
                if got is None:
                    break
            key, data = got
            if not answers(request, data) or key in final:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("discarding an answer from %s that is not for request %s: %s", key, request[:4].hex(),
                              data[:8].hex())
                if on_discard is not None:
                    on_discard(data)
                continue
            if data[0] == NEGATIVE_RESPONSE and len(data) >= 3 and data[2] == NRC_RESPONSE_PENDING:
                pending[key] = time.monotonic() + timing.p2_star
                continue
            if accept is not None and data[0] != NEGATIVE_RESPONSE:
                try:
                    accept(data)
                except InvalidResponseError as err:
                    log.debug("setting aside an answer from %s to request %s that echoes it but does not fit "
                              "it (%s): %s", key, request[:4].hex(), err, data[:8].hex())
                    if key in refused and on_discard is not None:
                        on_discard(refused[key])
                    refused[key] = data
                    continue
            pending.pop(key, None)
            final[key] = data
    finally:
        link.close()
    for key, data in refused.items():  # nothing fitting followed: the answer it gave is its answer (an error)
        if key not in final:
            final[key] = data
            pending.pop(key, None)
        elif on_discard is not None:
            on_discard(data)
    lost = {key: why for key, why in link.lost().items() if key not in final}
    for key in pending:  # it did answer: its silence after 0x78 is its result, never a missing entry
        lost.setdefault(key, f"NRC 0x78 (response pending), then no final answer within P2* "
                             f"({timing.p2_star * 1000:.0f} ms) or the command deadline")
    for key, why in lost.items():
        log.warning("answer from %s to functional request %s lost under way: %s", key, request[:4].hex(), why)
    return Collected(final, lost)
