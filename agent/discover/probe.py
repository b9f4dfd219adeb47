"""The searches: passive listening, the OBD-II functional request, the TesterPresent scan, one TesterPresent."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import can
import isotp

from agent.bus.canstate import CanLink, read_link
from agent.config.model import Addressing
from agent.config.transport import isotp_address
from agent.discover.frames import is_tester_present_answer, read_single_frame, single_frame
from agent.discover.tap import BusTap

OBD_FUNCTIONAL_11BIT, OBD_FUNCTIONAL_29BIT = 0x7DF, 0x18DB33F1
TESTER = 0xF1  # the tester's source address on 29-bit normal-fixed ids
TESTER_PRESENT = b"\x3e\x00"
Progress = Callable[[int, int, int], None]  # done, total, found


@dataclass(frozen=True)
class Traffic:
    """What passive listening saw: ids with frame counts and rates, and the controller's error counters."""

    seconds: float
    ids: tuple[tuple[int, bool, int, float], ...]  # (id, extended, frames, frames per second)
    error_frames: int
    before: CanLink | None = None
    after: CanLink | None = None

    @property
    def alive(self) -> bool:
        return bool(self.ids)

    @property
    def errors_rising(self) -> bool | None:
        """True when error counters grew while listening (likely a wrong bitrate); None when unknown."""
        if self.error_frames:
            return True
        a, b = self.before, self.after
        if a is None or b is None or a.tx_errors is None or b.tx_errors is None:
            return None
        grew = (b.tx_errors or 0) + (b.rx_errors or 0) > (a.tx_errors or 0) + (a.rx_errors or 0)
        return grew or b.bus_off > a.bus_off or b.error_passive > a.error_passive

    @property
    def talking(self) -> set[tuple[int, bool]]:
        return {(i, ext) for i, ext, _, _ in self.ids}


@dataclass(frozen=True)
class Responder:
    """An ECU that answered: its physical ids, and the frame it answered with (padding, FD)."""

    addressing: Addressing
    found_by: str  # obd_11bit, obd_29bit, scan_11bit, scan_29bit
    frame: bytes = b""
    fd: bool = False

    @property
    def key(self) -> tuple[int | None, int | None, int | None]:
        a = self.addressing
        return (a.request_id, a.response_id, a.target_address)


def listen(tap: BusTap, seconds: float, reader: Callable[[str], CanLink | None] = read_link) -> Traffic:
    """Listens without sending for `seconds` (a time window by nature: traffic is counted, not awaited)."""
    kernel = tap.config.interface == "socketcan"
    before = reader(tap.config.channel) if kernel else None
    errors, start = tap.error_frames, time.monotonic()
    seen_before = tap.snapshot()
    time.sleep(seconds)
    elapsed = max(time.monotonic() - start, 1e-3)
    after = reader(tap.config.channel) if kernel else None
    ids = []
    for (can_id, ext), stats in sorted(tap.snapshot().items()):
        frames = stats.frames - (seen_before[(can_id, ext)].frames if (can_id, ext) in seen_before else 0)
        if frames:
            ids.append((can_id, ext, frames, round(frames / elapsed, 1)))
    return Traffic(round(elapsed, 2), tuple(ids), tap.error_frames - errors, before, after)


class _Answers:
    """Single-frame answers seen by a watch on the tap, in arrival order, with a condition to wait on."""

    def __init__(self, tap: BusTap, accept: Callable[[can.Message, bytes], bool], prefix_size: int = 0) -> None:
        self.items: list[tuple[float, can.Message, bytes]] = []
        self._accept = accept
        self._prefix_size = prefix_size
        self._cond = threading.Condition()
        self._stop = tap.watch(self._on_frame)

    def _on_frame(self, msg: can.Message) -> None:
        payload = read_single_frame(bytes(msg.data), self._prefix_size)
        if payload is not None and self._accept(msg, payload):
            with self._cond:
                self.items.append((time.monotonic(), msg, payload))
                self._cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def close(self) -> None:
        self._stop()


def obd_functional(tap: BusTap, wait_s: float, padding: int | None) -> list[Responder]:
    """01 00 on 0x7DF and 0x18DB33F1; every ECU that answers within `wait_s` (J1979 allows 50 ms each)."""
    def accept(msg: can.Message, payload: bytes) -> bool:
        return payload[:2] == b"\x41\x00" and len(payload) == 6 and (
            (not msg.is_extended_id and 0x7E8 <= msg.arbitration_id <= 0x7EF)
            or (msg.is_extended_id and msg.arbitration_id & 0x1FFFFF00 == 0x18DAF100))

    answers = _Answers(tap, accept)
    try:
        tap.send_frame(OBD_FUNCTIONAL_11BIT, False, single_frame(b"\x01\x00", padding=padding))
        tap.send_frame(OBD_FUNCTIONAL_29BIT, True, single_frame(b"\x01\x00", padding=padding))
        time.sleep(wait_s)  # how many ECUs answer is unknown: the window is the protocol's, not a guess
    finally:
        answers.close()
    found: dict[tuple[int, bool], Responder] = {}
    for _, msg, _ in answers.items:
        rid = msg.arbitration_id
        if msg.is_extended_id:
            ta = rid & 0xFF
            addressing = Addressing("normal_fixed_29bit", target_address=ta, source_address=TESTER)
        else:
            addressing = Addressing("normal_11bit", request_id=rid - 8, response_id=rid)
        found[(rid, msg.is_extended_id)] = Responder(addressing, "obd_29bit" if msg.is_extended_id else "obd_11bit",
                                                     bytes(msg.data), msg.is_fd)
    return list(found.values())


def _pace(rate: float, last: float) -> float:
    gap = 1.0 / rate - (time.monotonic() - last)
    if gap > 0:
        time.sleep(gap)  # the rate limit is a real-time budget on the bus
    return time.monotonic()


def scan_11bit(tap: BusTap, ids: list[int], skip: set[int], rate: float, wait_s: float, confirm_s: float,
               padding: int | None, progress: Progress | None = None, talking: set[int] | None = None,
               ) -> list[Responder]:
    """TesterPresent on each 11-bit id; an answer on another id pairs them, confirmed by asking again.

    An answer is matched to its request by asking once more, first on the OBD convention (answer id
    - 8), then on the ids probed just before it arrived, newest first: a slow ECU's late answer is
    never credited to the id probed after it. Nothing is sent on `skip`; frames on `talking` (ids
    heard before the scan, default: `skip`) are never taken for answers.
    """
    quiet = skip if talking is None else talking
    probes: list[tuple[float, int]] = []
    answers = _Answers(tap, lambda m, p: not m.is_extended_id and m.arbitration_id not in quiet
                       and is_tester_present_answer(p))
    targets = [i for i in ids if i not in skip]
    last = 0.0
    try:
        for done, rid in enumerate(targets, 1):
            if any(m.arbitration_id == rid for _, m, _ in answers.items):
                continue  # an ECU answers on this id: never transmit on it
            last = _pace(rate, last)
            seen = len(answers.items)
            probes.append((time.monotonic(), rid))
            tap.send_frame(rid, False, single_frame(TESTER_PRESENT, padding=padding))
            answers.wait(lambda seen=seen: len(answers.items) > seen, wait_s)
            if progress:
                progress(done, len(targets), len({m.arbitration_id for _, m, _ in answers.items}))
        answers.wait(lambda: False, wait_s)  # late answers to the last probes
    finally:
        answers.close()
    found: dict[int, Responder] = {}
    for at, msg, _ in answers.items:
        response_id = msg.arbitration_id
        if response_id in found:
            continue
        earlier = [rid for t, rid in reversed(probes) if t <= at][:8]
        candidates = list(dict.fromkeys([response_id - 8, *earlier]))
        for rid in candidates:
            if rid in targets and rid != response_id and ask_tester_present(
                    tap, rid, False, response_id, False, padding, confirm_s) is not None:
                found[response_id] = Responder(Addressing("normal_11bit", request_id=rid, response_id=response_id),
                                               "scan_11bit", bytes(msg.data), msg.is_fd)
                break
    return list(found.values())


def scan_29bit(tap: BusTap, targets: list[int], rate: float, wait_s: float, padding: int | None,
               progress: Progress | None = None) -> list[Responder]:
    """TesterPresent on 0x18DA<ta>F1 for each target address; the answer id 0x18DAF1<ta> names the ECU."""
    answers = _Answers(tap, lambda m, p: m.is_extended_id and m.arbitration_id & 0x1FFFFF00 == 0x18DAF100
                       and is_tester_present_answer(p))
    last = 0.0
    try:
        for done, ta in enumerate(targets, 1):
            last = _pace(rate, last)
            expected = 0x18DAF100 | ta
            tap.send_frame(0x18DA00F1 | (ta << 8), True, single_frame(TESTER_PRESENT, padding=padding))
            answers.wait(lambda expected=expected: any(m.arbitration_id == expected for _, m, _ in answers.items),
                         wait_s)
            if progress:
                progress(done, len(targets), len({m.arbitration_id for _, m, _ in answers.items}))
        answers.wait(lambda: False, wait_s)
    finally:
        answers.close()
    found: dict[int, Responder] = {}
    for _, msg, _ in answers.items:
        ta = msg.arbitration_id & 0xFF
        found.setdefault(ta, Responder(Addressing("normal_fixed_29bit", target_address=ta, source_address=TESTER),
                                       "scan_29bit", bytes(msg.data), msg.is_fd))
    return list(found.values())


def ask_tester_present(tap: BusTap, tx: int, tx_ext: bool, rx: int, rx_ext: bool, padding: int | None,
                       timeout: float, prefix: bytes = b"", rx_prefix: int = 0) -> bytes | None:
    """Sends 3E 00 once and waits for its answer on `rx`: the answer payload, or None."""
    answers = _Answers(tap, lambda m, p: m.arbitration_id == rx and m.is_extended_id == rx_ext
                       and is_tester_present_answer(p), rx_prefix)  # listening before sending: nothing missed
    try:
        tap.send_frame(tx, tx_ext, single_frame(TESTER_PRESENT, prefix, padding), prefix_size=len(prefix))
        got = answers.wait(lambda: bool(answers.items), timeout)
    finally:
        answers.close()
    return answers.items[0][2] if got else None


def tester_present(tap: BusTap, addressing: Addressing, padding: int | None, timeout: float) -> bytes | None:
    """TesterPresent to one configured ECU, in any addressing mode: its answer payload, or None."""
    address = isotp_address(addressing)
    physical = isotp.TargetAddressType.Physical
    return ask_tester_present(tap, address.get_tx_arbitration_id(physical), address.is_tx_29bits(),
                              address.get_rx_arbitration_id(physical), address.is_rx_29bits(), padding, timeout,
                              address.get_tx_payload_prefix(), address.get_rx_prefix_size())
