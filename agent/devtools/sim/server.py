"""The simulated ECU's UDS behaviour: request bytes in, response bytes out, state kept. Pure (no I/O)."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable

from agent.config.ecu import resolve_callable
from agent.devtools.sim.config import SimDtc, SimEcu
from agent.devtools.sim.obd import SERVICES as OBD_SERVICES
from agent.devtools.sim.obd import ObdServer

P2_MS, P2_STAR_MS = 50, 5000
SESSIONS = (1, 2, 3, 4)
ACTIVE_SESSION_DID = 0xF186  # ISO 14229-1 activeDiagnosticSessionDataIdentifier, served from the session
NRC_SERVICE_NOT_SUPPORTED = 0x11
NRC_SUBFUNCTION_NOT_SUPPORTED = 0x12
NRC_BAD_LENGTH = 0x13
NRC_CONDITIONS = 0x22
NRC_SEQUENCE = 0x24
NRC_OUT_OF_RANGE = 0x31
NRC_SECURITY_DENIED = 0x33
NRC_INVALID_KEY = 0x35
NRC_NOT_IN_SESSION = 0x7F


class _NrcError(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


class UdsServer:
    """State and answers of one simulated ECU. `executed` counts every request handled, by service."""

    def __init__(self, ecu: SimEcu, seed_source: Callable[[int], bytes] = os.urandom, epoch: float = 0.0) -> None:
        """`epoch` is the `now` (as `handle` gets it) that waves and DTC schedules count from."""
        self.ecu = ecu
        self.epoch = epoch
        self.values = {d.id: d.value for d in ecu.dids}
        self.waves = {d.id: d.wave for d in ecu.dids if d.wave is not None}
        self.defaults = dict(self.values)
        self.writable = {d.id for d in ecu.dids if d.writable}
        self.io = {d.id for d in ecu.dids if d.io}
        self.dtcs = {d.dtc: d for d in ecu.dtcs if d.status}  # status 0: not stored (yet)
        self._scheduled = {d.dtc: d for d in ecu.dtcs if d.schedule is not None}
        self._steps_applied: dict[int, int] = {}  # DTC -> number of the schedule step last applied
        self.routines = {r.id: r.result for r in ecu.routines}
        self.security = {s.level: s for s in ecu.security}
        self.session = 1
        self.unlocked = 0
        self.executed: Counter[int] = Counter()
        self.reads: Counter[int] = Counter()  # DIDs read, by DID
        self.resets = 0
        self._seed: tuple[int, bytes] | None = None
        self._seed_source = seed_source
        self._last = 0.0
        self._handlers: dict[int, Callable[[bytes], bytes | None]] = {
            0x10: self._session, 0x11: self._reset, 0x14: self._clear, 0x19: self._dtc_info,
            0x22: self._read, 0x27: self._security, 0x2E: self._write, 0x2F: self._io_control,
            0x31: self._routine, 0x3E: self._tester_present,
        }
        self.now = 0.0
        if ecu.obd is not None:
            self.obd = ObdServer(ecu.obd, vin=lambda: self.values.get(0xF190),
                                 dtcs=lambda: [(d.dtc, d.status) for d in self.dtcs.values()])
            self._handlers.update(dict.fromkeys(OBD_SERVICES, lambda request: self.obd.handle(request, self.now)))

    def handle(self, request: bytes, now: float) -> bytes | None:
        """The response to `request` (None when the positive response is suppressed)."""
        if self.session != 1 and now - self._last > self.ecu.s3_ms / 1000:
            self.session, self.unlocked, self._seed = 1, 0, None  # S3 expired
        self._last = self.now = now
        self.advance(now)
        sid = request[0]
        self.executed[sid] += 1
        handler = self._handlers.get(sid)
        if handler is None:
            return bytes([0x7F, sid, NRC_SERVICE_NOT_SUPPORTED])
        try:
            return handler(request)
        except _NrcError as nrc:
            return bytes([0x7F, sid, nrc.code])

    def restart(self) -> None:
        """What a power cycle or a watchdog reset does: the default session, locked, no ECUReset asked."""
        self.session, self.unlocked, self._seed = 1, 0, None
        self.resets += 1

    def advance(self, now: float) -> None:
        """Moves waves and applies every DTC schedule step whose time has come since the last call."""
        t = now - self.epoch
        for did, wave in self.waves.items():
            self.values[did] = wave.at(t)
        for dtc, spec in self._scheduled.items():
            assert spec.schedule is not None
            current = spec.schedule.current(t)
            if current is not None and self._steps_applied.get(dtc) != current[0]:
                self._steps_applied[dtc] = current[0]
                self.set_dtc(dtc, current[1])

    def set_dtc(self, dtc: int, status: int) -> None:
        """Gives a DTC this status (0: the ECU no longer stores it); a known DTC keeps its snapshots."""
        if not status:
            self.dtcs.pop(dtc, None)
            return
        known = self.dtcs.get(dtc) or next((d for d in self.ecu.dtcs if d.dtc == dtc), None)
        self.dtcs[dtc] = dataclasses.replace(known, status=status) if known else SimDtc(dtc, status)

    @property
    def total_executed(self) -> int:
        return sum(self.executed.values())

    # ---- services ------------------------------------------------------------------------------
    @staticmethod
    def _sub(request: bytes, length: int | None = 2) -> tuple[int, bool]:
        if len(request) < 2 or (length is not None and len(request) != length):
            raise _NrcError(NRC_BAD_LENGTH)
        return request[1] & 0x7F, bool(request[1] & 0x80)

    def _session(self, request: bytes) -> bytes | None:
        session, suppress = self._sub(request)
        if session not in SESSIONS:
            raise _NrcError(NRC_SUBFUNCTION_NOT_SUPPORTED)
        self.session, self.unlocked, self._seed = session, 0, None
        timing = P2_MS.to_bytes(2, "big") + (P2_STAR_MS // 10).to_bytes(2, "big")
        if self.ecu.uds_standard < 2013:  # ISO 14229:2006 has no timing record in the answer
            timing = b""
        return None if suppress else bytes([0x50, session]) + timing

    def _reset(self, request: bytes) -> bytes | None:
        kind, suppress = self._sub(request)
        if kind not in (1, 2, 3):
            raise _NrcError(NRC_SUBFUNCTION_NOT_SUPPORTED)
        self.session, self.unlocked, self._seed = 1, 0, None
        self.resets += 1
        return None if suppress else bytes([0x51, kind])

    def _clear(self, request: bytes) -> bytes:
        if len(request) not in (4, 5):
            raise _NrcError(NRC_BAD_LENGTH)
        group = int.from_bytes(request[1:4], "big")
        if group == 0xFFFFFF:
            self.dtcs.clear()
        elif group in self.dtcs:
            del self.dtcs[group]
        else:
            raise _NrcError(NRC_OUT_OF_RANGE)
        return b"\x54"

    def _dtc_info(self, request: bytes) -> bytes:
        sub, _ = self._sub(request, None)
        if sub == 0x02 and len(request) == 3:
            mask = request[2]
            body = b"".join(d.to_bytes(3, "big") + bytes([x.status]) for d, x in self.dtcs.items() if x.status & mask)
            return bytes([0x59, 0x02, 0xFF]) + body
        if sub in (0x04, 0x06) and len(request) == 6:
            dtc = self.dtcs.get(int.from_bytes(request[2:5], "big"))
            if dtc is None:
                raise _NrcError(NRC_OUT_OF_RANGE)
            head = bytes([0x59, sub]) + dtc.dtc.to_bytes(3, "big") + bytes([dtc.status])
            wanted = request[5]
            if sub == 0x04:
                records = b"".join(
                    bytes([num, len(values)]) + b"".join(did.to_bytes(2, "big") + data for did, data in values)
                    for num, values in dtc.snapshots if wanted in (0xFF, num))
            else:
                records = b"".join(bytes([num]) + data for num, data in dtc.extended if wanted in (0xFF, num))
            return head + records
        raise _NrcError(NRC_SUBFUNCTION_NOT_SUPPORTED if len(request) >= 2 else NRC_BAD_LENGTH)

    def _read(self, request: bytes) -> bytes:
        if len(request) < 3 or len(request) % 2 != 1:
            raise _NrcError(NRC_BAD_LENGTH)
        out = bytearray([0x62])
        for pos in range(1, len(request), 2):
            did = int.from_bytes(request[pos:pos + 2], "big")
            self.reads[did] += 1
            if did == ACTIVE_SESSION_DID and did not in self.values:
                out += request[pos:pos + 2] + bytes([self.session])
                continue
            if did not in self.values:
                raise _NrcError(NRC_OUT_OF_RANGE)
            out += request[pos:pos + 2] + self.values[did]
        return bytes(out)

    def _write(self, request: bytes) -> bytes:
        if len(request) < 4:
            raise _NrcError(NRC_BAD_LENGTH)
        did = int.from_bytes(request[1:3], "big")
        if did not in self.writable:
            raise _NrcError(NRC_OUT_OF_RANGE)
        if self.session == 1:
            raise _NrcError(NRC_NOT_IN_SESSION)
        if len(request) - 3 != len(self.values[did]):
            raise _NrcError(NRC_BAD_LENGTH)
        self.values[did] = request[3:]
        return b"\x6e" + request[1:3]

    def _security(self, request: bytes) -> bytes:
        sub, _ = self._sub(request, None)
        if self.session == 1:
            raise _NrcError(NRC_NOT_IN_SESSION)
        if sub % 2 == 1:
            if sub not in self.security or len(request) != 2:
                raise _NrcError(NRC_SUBFUNCTION_NOT_SUPPORTED if sub not in self.security else NRC_BAD_LENGTH)
            if self.unlocked == sub:
                return bytes([0x67, sub]) + bytes(4)
            spec = self.security[sub]
            seed = spec.seed or self._seed_source(4)
            self._seed = (sub, seed)
            return bytes([0x67, sub]) + seed
        level = sub - 1
        if self._seed is None or self._seed[0] != level:
            raise _NrcError(NRC_SEQUENCE)
        spec = self.security[level]
        expected = resolve_callable(spec.algorithm)(level, self._seed[1], dict(spec.params))
        self._seed = None
        if bytes(expected) != request[2:]:
            raise _NrcError(NRC_INVALID_KEY)
        self.unlocked = level
        return bytes([0x67, sub])

    def _io_control(self, request: bytes) -> bytes:
        if len(request) < 4:
            raise _NrcError(NRC_BAD_LENGTH)
        did, control = int.from_bytes(request[1:3], "big"), request[3]
        if did not in self.io:
            raise _NrcError(NRC_OUT_OF_RANGE)
        if control == 3:
            if len(request) - 4 != len(self.values[did]):
                raise _NrcError(NRC_BAD_LENGTH)
            self.values[did] = request[4:]
        elif control in (0, 1):
            self.values[did] = self.defaults[did]
        elif control != 2:
            raise _NrcError(NRC_OUT_OF_RANGE)
        return b"\x6f" + request[1:4] + self.values[did]

    def _routine(self, request: bytes) -> bytes:
        sub, _ = self._sub(request, None)
        if len(request) < 4:
            raise _NrcError(NRC_BAD_LENGTH)
        routine = int.from_bytes(request[2:4], "big")
        if routine not in self.routines or sub not in (1, 2, 3):
            raise _NrcError(NRC_OUT_OF_RANGE)
        return bytes([0x71, sub]) + request[2:4] + self.routines[routine]

    def _tester_present(self, request: bytes) -> bytes | None:
        sub, suppress = self._sub(request)
        if sub != 0:
            raise _NrcError(NRC_SUBFUNCTION_NOT_SUPPORTED)
        return None if suppress else b"\x7e\x00"
