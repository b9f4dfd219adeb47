"""The simulated ECU's OBD-II side (SAE J1979): `obd:` config, moving PID values, 0x09 info, DTC lists. Pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.config.reader import InvalidValueError, Node, hex_bytes, integer, number, text
from agent.wire import obd
from agent.wire.dtc import parse_code

SERVICES = (0x01, 0x03, 0x07, 0x09, 0x0A)
NRC_SUBFUNCTION_NOT_SUPPORTED, NRC_BAD_LENGTH, NRC_OUT_OF_RANGE = 0x12, 0x13, 0x31


@dataclass(frozen=True)
class SimPid:
    """A PID's answer: fixed bytes, a fixed value, or a value moving between low and high (triangle wave)."""

    pid: int
    data: bytes | None = None
    low: float = 0.0
    high: float = 0.0
    period_s: float = 0.0

    def at(self, now: float) -> bytes:
        if self.data is not None:
            return self.data
        if self.period_s <= 0:
            return obd.encode_pid(self.pid, self.low)
        phase = (now % self.period_s) / self.period_s
        share = 2 * phase if phase < 0.5 else 2 - 2 * phase
        return obd.encode_pid(self.pid, self.low + (self.high - self.low) * share)


@dataclass(frozen=True)
class SimObd:
    pids: tuple[SimPid, ...] = ()
    vin: str | None = None  # default: the ECU's DID 0xF190
    calibration_ids: tuple[str, ...] = ()
    cvns: tuple[bytes, ...] = ()
    ecu_name: str | None = None
    stored: tuple[int, ...] | None = None  # 2-byte DTCs; default: the UDS DTCs with the confirmed bit
    pending: tuple[int, ...] | None = None  # default: the UDS DTCs with the pending bit
    permanent: tuple[int, ...] = ()


def parse_obd(node: Node | None) -> SimObd | None:
    if node is None:
        return None
    pids = tuple(_pid(Node(item, path, node.problems)) for path, item in node.items_of("pids"))

    def codes(key: str) -> tuple[int, ...] | None:
        if not node.has(key):
            node.raw(key)
            return None
        return tuple(c for p, v in node.items_of(key) if (c := node.check(p, v, _code)) is not None)

    config = SimObd(
        pids=tuple(p for p in pids if p is not None),
        vin=node.get("vin", text(r"[ -~]{1,17}", "at most 17 printable ASCII characters", max_len=17), None),
        calibration_ids=tuple(t for p, v in node.items_of("calibration_ids")
                              if (t := node.check(p, v, text(r"[ -~]{1,16}", "at most 16 characters", max_len=16)))),
        cvns=tuple(c for p, v in node.items_of("cvns") if (c := node.check(p, v, _cvn)) is not None),
        ecu_name=node.get("ecu_name", text(r"[ -~]{1,20}", "at most 20 characters", max_len=20), None),
        stored=codes("stored"), pending=codes("pending"), permanent=codes("permanent") or (),
    )
    node.finish()
    return config


def _code(value: object) -> int:
    try:
        dtc = parse_code(text()(value))
    except ValueError as err:
        raise InvalidValueError(str(err)) from None
    if dtc & 0xFF:
        raise InvalidValueError("OBD-II DTCs have no failure type byte")
    return dtc >> 8


def _cvn(value: object) -> bytes:
    data = hex_bytes(value)
    if len(data) != 4:
        raise InvalidValueError("a CVN is 4 bytes (8 hex digits)")
    return data


def _pid(node: Node) -> SimPid | None:
    def pid_ref(value: object) -> int:
        if isinstance(value, str) and not value.lower().startswith("0x"):
            spec = obd.PIDS_BY_NAME.get(value)
            if spec is None:
                raise InvalidValueError(f"no OBD-II PID named {value!r}")
            return spec.pid
        return integer(0, 0xFF, "a PID (0x00..0xFF)")(value)

    pid = node.get("pid", pid_ref)
    data = node.get("hex", hex_bytes, None)
    value = node.get("value", number(), None)
    low, high = node.get("min", number(), None), node.get("max", number(), None)
    period = node.get("period_s", number(0.1, 86400), 10.0)
    node.finish()
    if pid is None:
        return None
    spec = obd.PIDS.get(pid)
    linear = spec is not None and spec.kind == "linear"
    if pid in obd.BITMAP_PIDS:
        node.problems.add(node.path, "the supported-PID bitmaps are answered from the configured PIDs")
    elif data is not None:
        if spec is not None and len(data) != spec.length:
            node.problems.add(node.path, f"{spec.name} has {spec.length} bytes, got {len(data)}")
        return SimPid(pid, data=data)
    elif not linear:
        node.problems.add(node.path, "give hex for PIDs that are not a linear value")
    elif value is not None:
        return SimPid(pid, low=value)
    elif low is not None and high is not None:
        return SimPid(pid, low=low, high=high, period_s=period)
    else:
        node.problems.add(node.path, "give value, min and max (moving), or hex")
    return None


class ObdServer:
    """Answers services 0x01, 0x03, 0x07, 0x09 and 0x0A from the `obd:` config and the ECU's UDS state.

    `vin` and `dtcs` are read through callables so that UDS writes and clears show up here too.
    """

    def __init__(self, config: SimObd, vin: Callable[[], bytes | None],
                 dtcs: Callable[[], list[tuple[int, int]]]) -> None:
        self.config = config
        self._pids = {p.pid: p for p in config.pids}
        supported = set(self._pids) | {0x01}
        # Each bitmap PID is supported while any PID lies beyond it (J1979: 0x00 always).
        self._bitmaps = [b for b in obd.BITMAP_PIDS if b == 0 or any(p > b for p in supported)]
        self._supported = supported | {b for b in self._bitmaps if b}
        self._vin, self._dtcs = vin, dtcs

    def handle(self, request: bytes, now: float) -> bytes:
        sid = request[0]
        if sid == obd.CURRENT_DATA:
            return self._current_data(request, now)
        if sid == obd.VEHICLE_INFO:
            return self._info(request)
        if len(request) != 1:
            return bytes([0x7F, sid, NRC_BAD_LENGTH])
        return bytes([sid + 0x40]) + self._dtc_list(sid)

    def _current_data(self, request: bytes, now: float) -> bytes:
        pids = request[1:]
        if not 1 <= len(pids) <= obd.MAX_PIDS_PER_REQUEST:
            return bytes([0x7F, 0x01, NRC_BAD_LENGTH])
        out = bytearray([0x41])
        for pid in pids:
            data = self._pid(pid, now)
            if data is not None:
                out += bytes([pid]) + data
        return bytes(out) if len(out) > 1 else bytes([0x7F, 0x01, NRC_OUT_OF_RANGE])

    def _pid(self, pid: int, now: float) -> bytes | None:
        if pid in self._bitmaps:
            return obd.bitmap_for(pid, self._supported)
        if pid == 0x01 and pid not in self._pids:
            stored = self._stored()
            return bytes([(0x80 if stored else 0) | min(len(stored), 0x7F), 0x07, 0x00, 0x00])
        sim = self._pids.get(pid)
        return sim.at(now) if sim else None

    def _info(self, request: bytes) -> bytes:
        if len(request) != 2:
            return bytes([0x7F, 0x09, NRC_BAD_LENGTH])
        items = self._info_items()
        infotype = request[1]
        if infotype == 0x00:
            return bytes([0x49, 0x00]) + obd.bitmap_for(0x00, set(items))
        if infotype not in items:
            return bytes([0x7F, 0x09, NRC_OUT_OF_RANGE])
        values = items[infotype]
        return bytes([0x49, infotype, len(values)]) + b"".join(values)

    def _info_items(self) -> dict[int, list[bytes]]:
        c = self.config
        vin = c.vin.encode("ascii") if c.vin else self._vin()
        items = {0x02: [vin[:17].ljust(17, b"\0")] if vin else [],
                 0x04: [t.encode("ascii").ljust(16, b"\0") for t in c.calibration_ids],
                 0x06: list(c.cvns),
                 0x0A: [c.ecu_name.encode("ascii").ljust(20, b"\0")] if c.ecu_name else []}
        return {k: v for k, v in items.items() if v}

    def _stored(self) -> tuple[int, ...]:
        if self.config.stored is not None:
            return self.config.stored
        return tuple(dtc >> 8 for dtc, status in self._dtcs() if status & 0x08)

    def _dtc_list(self, sid: int) -> bytes:
        if sid == 0x03:
            codes = self._stored()
        elif sid == 0x07:
            pending = self.config.pending
            codes = pending if pending is not None else tuple(d >> 8 for d, s in self._dtcs() if s & 0x04)
        else:
            codes = self.config.permanent
        return bytes([len(codes)]) + b"".join(c.to_bytes(2, "big") for c in codes)
