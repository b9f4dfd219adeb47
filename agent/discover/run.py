"""One discovery run: listen, ask OBD-II functionally, scan if asked, identify each ECU, report."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from agent.config.model import IsoTpConfig
from agent.discover.frames import FD_LENGTHS, padding_of
from agent.discover.identify import identify
from agent.discover.probe import Progress, Responder, listen, obd_functional, scan_11bit, scan_29bit
from agent.discover.report import Ecu, Report, ecu_name
from agent.discover.tap import BusTap

log = logging.getLogger(__name__)

SCAN_11BIT = tuple(range(0x700, 0x7F8))
SCAN_29BIT = tuple(ta for ta in range(0x100) if ta not in (0xF1, 0x33))  # not the tester, not functional


@dataclass(frozen=True)
class Options:
    listen_s: float = 3.0
    obd: bool = True
    obd_wait_s: float = 0.3
    scan: bool = False
    scan_11bit: tuple[int, ...] = SCAN_11BIT
    scan_29bit: tuple[int, ...] = SCAN_29BIT
    rate: float = 20.0  # requests per second during a scan
    scan_wait_s: float = 0.05
    p2_s: float = 0.5
    padding: int | None = 0xCC
    skip_ids: frozenset[int] = field(default_factory=frozenset)  # never probe these (e.g. known traffic)


def discover(tap: BusTap, options: Options, progress: Progress | None = None, when: str = "") -> Report:
    traffic = listen(tap, options.listen_s) if options.listen_s > 0 else None
    found: dict[tuple[int | None, int | None, int | None], tuple[Responder, list[str]]] = {}

    def add(responders: list[Responder]) -> None:
        for r in responders:
            if r.key in found:
                found[r.key][1].append(r.found_by)
            else:
                found[r.key] = (r, [r.found_by])

    if options.obd:
        add(obd_functional(tap, options.obd_wait_s, options.padding))
    if options.scan:
        # Never transmit on an id another node uses: same id, different data is a bus error.
        talking = traffic.talking if traffic else set()
        heard = {i for i, ext in talking if not ext}
        answering = {r.addressing.response_id for r, _ in found.values() if r.addressing.response_id is not None}
        skip = heard | {0x7DF} | answering | set(options.skip_ids)
        add(scan_11bit(tap, list(options.scan_11bit), skip, options.rate, options.scan_wait_s, options.p2_s,
                       options.padding, progress, talking=heard))
        skip29 = {i & 0xFF for i, ext in talking if ext and i & 0x1FFFFF00 == 0x18DAF100}
        add(scan_29bit(tap, [t for t in options.scan_29bit if t not in skip29], options.rate, options.scan_wait_s,
                       options.padding, progress))
    ecus: list[Ecu] = []
    taken: set[str] = set()
    for responder, how in sorted(found.values(), key=lambda f: (f[0].addressing.mode, f[0].key[0] or 0,
                                                                  f[0].key[2] or 0)):
        isotp = _isotp(responder, options, tap.config.fd)
        identity = identify(tap, responder.addressing, isotp, options.p2_s, any(h.startswith("obd") for h in how))
        ecus.append(Ecu(ecu_name(identity, responder, taken), responder, how, isotp, identity))
        log.info("found ECU", extra={"ecu": ecus[-1].name, "found_by": how})
    return Report(tap.config, traffic, ecus, when)


def _isotp(responder: Responder, options: Options, bus_fd: bool) -> IsoTpConfig:
    """Frame format from the ECU's own answer: its padding byte, and CAN FD when it answered in FD."""
    padding = padding_of(responder.frame) if responder.frame else None
    if padding is None:
        padding = options.padding
    if responder.fd and bus_fd:
        length = len(responder.frame)
        return IsoTpConfig(padding=padding, fd=True, data_length=length if length in FD_LENGTHS else 8)
    return IsoTpConfig(padding=padding)
