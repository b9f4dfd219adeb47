"""The ISO-TP links and the bus owner at their edges: P2 bounds only the first frame in both links, no
busy-wait, FC.WAIT, bit-rate switch, a transient send error retried, sends serialised where needed.

The ECU here is built on can-isotp's own threaded stack in the test itself, not on our simulator.
This machine has no AF_CAN, so the kernel link runs over a stand-in for its CAN_ISOTP socket (the
same calls, can-isotp behind them); what is under test is the kernel link's own waiting logic, and
tests/test_vcan.py runs the real kernel socket in the VM lane.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import threading
import time

import can
import isotp
import pytest

from agent.bus.isotp_link import IsoTpLink
from agent.bus.kernel_isotp import KernelIsoTpLink, await_pdu
from agent.bus.owner import BusOwner, wait_until
from agent.config.model import Addressing, BusConfig, IsoTpConfig
from agent.config.transport import isotp_address
from agent.errors import BusDownError, TransportTimeoutError

ADDRESSING = Addressing(mode="normal_11bit", request_id=0x7E0, response_id=0x7E8)
SLOW_ANSWER = bytes([0x62, 0xF1, 0x90]) + bytes(range(97))  # 100 bytes: a first frame and 14 consecutive ones


class CanIsotpEcu:
    """An ECU on can-isotp's threaded stack and its own virtual bus: answers each request with `answer(req)`."""

    def __init__(self, channel: str, answer, fd: bool = False) -> None:
        self.bus = can.Bus(interface="virtual", channel=channel, fd=fd)
        self.stack = isotp.CanStack(self.bus, address=isotp_address(ADDRESSING, server=True),
                                    params={"blocking_send": True, "tx_padding": 0xCC})
        self.requests: list[bytes] = []
        self._answer = answer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="can-isotp-ecu", daemon=True)

    def __enter__(self) -> CanIsotpEcu:
        self.stack.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.stack.stop()
        self.bus.shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            request = self.stack.recv(block=True, timeout=0.05)
            if request is None:
                continue
            self.requests.append(bytes(request))
            for response in self._answer(bytes(request)):
                self.stack.send(response, send_timeout=5)


class StandInKernelSocket:
    """Stands in for `isotp.socket` (the kernel's CAN_ISOTP socket): same calls, can-isotp behind them."""

    def __init__(self, channel: str) -> None:
        self._channel = channel
        self._params: dict[str, object] = {"blocking_send": True}
        self._timeout: float | None = None
        self.stack: isotp.CanStack | None = None

    def set_opts(self, txpad: int | None = None, rxpad: int | None = None) -> None:
        self._params["tx_padding"] = txpad

    def set_fc_opts(self, bs: int | None = None, stmin: int | None = None) -> None:
        self._params.update(blocksize=bs, stmin=stmin)

    def set_ll_opts(self, **kwargs: object) -> None:
        raise AssertionError("classic CAN only here")

    def bind(self, interface: str, address: isotp.Address) -> None:
        self._bus = can.Bus(interface="virtual", channel=self._channel)
        self.stack = isotp.CanStack(self._bus, address=address, params=self._params)
        self.stack.start()

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def send(self, payload: bytes) -> None:
        self.stack.send(payload, send_timeout=self._timeout)

    def recv(self, size: int = 4096) -> bytes:
        if self._timeout == 0:
            data = self.stack.recv(block=False)
            if data is None:
                raise BlockingIOError(errno.EAGAIN, "nothing queued")
            return bytes(data)
        data = self.stack.recv(block=True, timeout=self._timeout)
        if data is None:
            raise TimeoutError("timed out")  # what socket.recv raises on a socket timeout (errno None)
        return bytes(data)

    def close(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            self._bus.shutdown()


@pytest.fixture
def owner(channel):
    bus_owner = BusOwner(BusConfig(interface="virtual", channel=channel))
    assert bus_owner.start()
    yield bus_owner
    bus_owner.stop()


def make_link(kind: str, owner, channel, config: IsoTpConfig, sockets: list):
    """The userspace link, or the kernel one on the stand-in socket, to the ECU at ADDRESSING.

    One at a time: the owner routes each CAN id to one sink, as it does for one link per ECU."""
    def factory() -> StandInKernelSocket:
        sockets.append(StandInKernelSocket(channel))
        return sockets[-1]

    address = isotp_address(ADDRESSING)
    if kind == "userspace":
        return IsoTpLink(owner, address, config, name="userspace")
    return KernelIsoTpLink(channel, address, config, name="kernel", owner=owner, socket_factory=factory)


def exchange(link, request: bytes, p2: float, limit_s: float = 5.0) -> tuple[bytes | None, float]:
    link.flush()
    started = time.monotonic()
    link.send(request, timeout=1.0)
    data = link.recv(p2, time.monotonic() + limit_s)
    return data, time.monotonic() - started


# ---- P2 bounds the first frame only, in both links -------------------------------------------------

def test_both_links_agree_on_a_slow_multi_frame_answer(owner, channel):
    """STmin 50 ms asked of the ECU makes a 100-byte answer take ~0.7 s, far beyond P2 (0.2 s)."""
    answer = {bytes.fromhex("22f190"): [SLOW_ANSWER]}
    results, silent, sockets = {}, {}, []
    with CanIsotpEcu(channel, lambda request: answer.get(request, [])):
        try:
            for kind in ("userspace", "kernel"):
                link = make_link(kind, owner, channel, IsoTpConfig(st_min=50, padding=0xCC), sockets)
                results[kind] = exchange(link, bytes.fromhex("22f190"), p2=0.2)
                silent[kind] = exchange(link, bytes.fromhex("220000"), p2=0.2)
        finally:
            for sock in sockets:
                sock.close()
    for name, (data, took) in results.items():
        assert data == SLOW_ANSWER, name
        assert took > 0.5, (name, took)  # it did outlast P2: only the first frame was bounded by it
    for name, (data, took) in silent.items():
        assert data is None and 0.19 < took < 1.0, (name, took)  # no first frame: P2 ends the wait


def test_await_pdu_bounds_only_the_first_frame():
    """The kernel link's waiting logic on a scripted clock: no bus, no threads, exact times."""
    now = [0.0]
    events = []

    def clock():
        return now[0]

    def reader(script):
        def read(wait):
            events.append(("read", round(now[0], 3), round(wait, 3)))
            step, data = script.pop(0)
            now[0] += wait if data is None else step
            return data
        return read

    # nothing starts within P2: None at P2
    assert await_pdu(reader([(0, None)]), lambda: False, timeout=0.2, limit=10, clock=clock) is None
    assert now[0] == pytest.approx(0.2)
    # a first frame seen before P2 ends: the wait goes on past P2 until the PDU is complete
    now[0], events[:] = 0.0, []
    started = [False]

    def read_slow(wait):
        events.append(("read", round(now[0], 3), round(wait, 3)))
        if now[0] < 0.2:
            started[0] = True  # the first frame arrived at 0.1 s; the PDU completes at 0.9 s
            now[0] = 0.2
            return None
        now[0] = 0.9
        return b"whole"

    assert await_pdu(read_slow, lambda: started[0], timeout=0.2, limit=10, clock=clock) == b"whole"
    assert events == [("read", 0.0, 0.2), ("read", 0.2, 9.8)]
    # started but never complete: the command deadline ends it, as an ISO-TP timeout
    now[0] = 0.0
    with pytest.raises(TransportTimeoutError):
        await_pdu(reader([(0, None), (0, None)]), lambda: True, timeout=0.2, limit=3, clock=clock)
    assert now[0] == pytest.approx(3.0)
    # the deadline caps the first-frame wait too
    now[0] = 0.0
    assert await_pdu(reader([(0, None)]), lambda: False, timeout=5, limit=1, clock=clock) is None
    assert now[0] == pytest.approx(1.0)


def test_kernel_link_notes_first_frames_on_the_raw_bus(owner, channel):
    link = KernelIsoTpLink(channel, isotp_address(ADDRESSING), IsoTpConfig(), name="k", owner=owner)
    spy = can.Bus(interface="virtual", channel=channel)
    try:
        spy.send(can.Message(arbitration_id=0x7E8, data=bytes.fromhex("037f2278"), is_extended_id=False))
        spy.send(can.Message(arbitration_id=0x7E9, data=bytes.fromhex("1014620000000000"), is_extended_id=False))
        time.sleep(0.1)
        assert link._first_frame is False  # a single frame, and a first frame of another ECU
        spy.send(can.Message(arbitration_id=0x7E8, data=bytes.fromhex("1014620000000000"), is_extended_id=False))
        assert wait_until(lambda: link._first_frame, 2)
        link.flush()  # before a request: nothing has started yet
        assert link._first_frame is False
    finally:
        spy.shutdown()


# ---- no busy-wait -------------------------------------------------------------------------------------

def test_waiting_out_a_flow_control_timeout_costs_no_cpu(owner, channel):
    """The defect: with a complete PDU already buffered, send() spun while waiting for flow control
    (0.96 s of CPU in a 1 s timeout). The thread's CPU time must be a small fraction of the wait."""
    link = IsoTpLink(owner, isotp_address(ADDRESSING), IsoTpConfig(), name="tester")
    peer = can.Bus(interface="virtual", channel=channel)
    try:
        peer.send(can.Message(arbitration_id=0x7E8, data=bytes.fromhex("023e00"), is_extended_id=False))
        assert wait_until(lambda: link._frames.qsize() == 1, 2)  # a whole PDU waits in the link
        cpu, wall = time.thread_time(), time.monotonic()
        with pytest.raises(TransportTimeoutError, match="send timed out"):
            link.send(bytes(100), timeout=0.5)  # a first frame, and nobody sends flow control
        cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
    finally:
        peer.shutdown()
    assert wall >= 0.5
    assert cpu < 0.1 * wall, f"{cpu:.3f} s of CPU while waiting {wall:.3f} s"


def test_waiting_out_a_stalled_reception_costs_no_cpu(owner, channel):
    """A first frame and then nothing: the link waits for consecutive frames until the limit, idle."""
    link = IsoTpLink(owner, isotp_address(ADDRESSING), IsoTpConfig(), name="tester")
    peer = can.Bus(interface="virtual", channel=channel)
    try:
        link.flush()
        peer.send(can.Message(arbitration_id=0x7E8, data=bytes.fromhex("1064620000000000"), is_extended_id=False))
        cpu, wall = time.thread_time(), time.monotonic()
        with pytest.raises(TransportTimeoutError, match="not complete"):
            link.recv(0.3, time.monotonic() + 0.8)
        cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
    finally:
        peer.shutdown()
    assert wall >= 0.8
    assert cpu < 0.1 * wall, f"{cpu:.3f} s of CPU while waiting {wall:.3f} s"


# ---- the bus owner: a transient send error, serialised sends ------------------------------------------

class FlakyBus(can.BusABC):
    """A virtual bus whose send fails `failures` times first (e.g. ENOBUFS), and that notes overlapping sends."""

    def __init__(self, channel: str, failures: int = 0, hold_s: float = 0.0) -> None:
        self._inner = can.Bus(interface="virtual", channel=channel)
        self.failures = failures
        self.hold_s = hold_s
        self.inside = 0
        self.overlaps = 0
        self.sent = 0
        super().__init__(channel=channel)

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        self.inside += 1
        try:
            if self.inside > 1:
                self.overlaps += 1
            if self.failures:
                self.failures -= 1
                raise can.CanOperationError("Failed to transmit: No buffer space available", error_code=errno.ENOBUFS)
            time.sleep(self.hold_s)
            self._inner.send(msg, timeout)
            self.sent += 1
        finally:
            self.inside -= 1

    def _recv_internal(self, timeout: float | None):
        return self._inner._recv_internal(timeout)

    def shutdown(self) -> None:
        self._inner.shutdown()
        super().shutdown()


def test_one_transient_send_error_is_retried(channel):
    buses: list[FlakyBus] = []
    owner = BusOwner(BusConfig(interface="virtual", channel=channel),
                     factory=lambda: buses.append(FlakyBus(channel, failures=1)) or buses[-1])
    assert owner.start()
    try:
        owner.send(can.Message(arbitration_id=0x7E0, data=b"\x02\x3e\x00", is_extended_id=False))
        assert owner.is_up and owner.counters.send_errors == 1 and buses[0].sent == 1
        buses[0].failures = 2  # twice in a row: that is a broken bus
        with pytest.raises(BusDownError):
            owner.send(can.Message(arbitration_id=0x7E0, data=b"\x02\x3e\x00", is_extended_id=False))
        assert owner.counters.send_errors == 3
        assert wait_until(lambda: owner.counters.rebuilds == 1, 3)
    finally:
        owner.stop()


@pytest.mark.parametrize(("interface", "serialised"), [("pcan", True), ("slcan", True), ("socketcan", False)])
def test_sends_are_serialised_unless_the_interface_is_thread_safe(channel, interface, serialised):
    buses: list[FlakyBus] = []
    config = BusConfig(interface=interface, channel=channel)
    owner = BusOwner(config, factory=lambda: buses.append(FlakyBus(channel, hold_s=0.002)) or buses[-1])
    assert owner.start()
    try:
        def sender() -> None:
            for _ in range(20):
                owner.send(can.Message(arbitration_id=0x7E0, data=b"\x01", is_extended_id=False))

        threads = [threading.Thread(target=sender, name=f"sender-{i}") for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        owner.stop()
    assert buses[0].sent == 120
    if serialised:
        assert buses[0].overlaps == 0
    else:
        assert buses[0].overlaps > 0  # the control: without the lock, these sends do overlap


# ---- ISO-TP parameters on the wire: FC.WAIT and bit-rate switch ----------------------------------------

def test_bitrate_switch_when_the_bus_has_a_data_bitrate(channel):
    owner = BusOwner(BusConfig(interface="virtual", channel=channel, fd=True))
    assert owner.start()
    spy = can.Bus(interface="virtual", channel=channel, fd=True)
    try:
        for brs in (False, True):
            config = IsoTpConfig(fd=True, data_length=64, bitrate_switch=brs)
            addressing = dataclasses.replace(ADDRESSING, request_id=0x740 + brs, response_id=0x748 + brs)
            link = IsoTpLink(owner, isotp_address(addressing), config, name=f"fd-{brs}")
            with pytest.raises(TransportTimeoutError):
                link.send(bytes(200), timeout=0.1)  # a first frame is enough to look at
            frame = spy.recv(2)
            assert frame.arbitration_id == 0x740 + brs and frame.is_fd and frame.bitrate_switch is brs
    finally:
        spy.shutdown()
        owner.stop()



def test_frame_queue_counts_what_it_drops_and_drains_for_both_links():
    """The one queue and drain both links use (flush before a request; the functional collector's
    take-what-has-arrived): a full queue drops and counts, a wake-up marker is not counted."""
    from agent.bus.frames import FrameQueue
    from agent.bus.owner import BusCounters

    counters = BusCounters()
    frames: FrameQueue[int] = FrameQueue(counters, "test", size=3)
    assert [frames.put(i) for i in range(4)] == [True, True, True, False]
    assert counters.dropped == 1
    assert frames.put(-1, counted=False) is False and counters.dropped == 1
    taken: list[int] = []
    assert frames.drain(taken.append) == 3 and taken == [0, 1, 2]
    assert frames.get(0) is None and frames.get(0.01) is None
    frames.put(7)
    assert frames.drain() == 1 and frames.drain() == 0


def test_frames_a_full_queue_drops_are_logged_not_only_counted(caplog):
    """A dropped frame breaks the answer it belonged to: the log says so at once, then at most once a minute
    (with the number dropped meanwhile), never a line per frame from the notifier thread."""
    from agent.bus import frames as f
    from agent.bus.owner import BusCounters

    counters = BusCounters()
    queue: f.FrameQueue[int] = f.FrameQueue(counters, "engine", size=1)
    with caplog.at_level(logging.WARNING, logger="agent.bus.frames"):
        for i in range(50):
            queue.put(i)
    lines = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(lines) == 1 and "engine" in lines[0].getMessage() and counters.dropped == 49


def test_a_bus_fault_is_raised_once_to_a_reader_that_never_sends(owner):
    """A reader that only listens (the simulator's ECUs) got BusDownError from every recv after a fault, for
    good: nothing reset the fault it had seen, and a simulator on vcan0 went deaf after `ip link set down/up`
    (the VM lane found it). The exchange that saw the fault hears of it once."""
    link = IsoTpLink(owner, isotp_address(ADDRESSING), IsoTpConfig(), name="listener")
    owner.report_fault("receive failed: [Errno 100] Network is down")
    with pytest.raises(BusDownError, match="Network is down"):
        link.recv(0.01)
    assert link.recv(0.01) is None


def test_a_kernel_links_socket_failures_are_counted_with_the_buss(owner, channel):
    """A kernel ISO-TP socket sends and receives by itself, around the bus owner: its failures (the interface
    went down) raised bus_error but were counted nowhere, while sovd_can_send_errors_total said it counts
    every failed send. They are counted in the owner's counters now; the socket is opened again next time."""

    class DownSocket(StandInKernelSocket):
        def send(self, payload: bytes) -> None:
            raise OSError(errno.ENETDOWN, "Network is down")

        def recv(self, size: int = 4096) -> bytes:
            raise OSError(errno.ENETDOWN, "Network is down")

    sockets: list[StandInKernelSocket] = []

    def factory() -> StandInKernelSocket:
        sockets.append(DownSocket(channel))
        return sockets[-1]

    link = KernelIsoTpLink(channel, isotp_address(ADDRESSING), IsoTpConfig(), name="kernel", owner=owner,
                           socket_factory=factory)
    with pytest.raises(BusDownError, match="send failed"):
        link.send(b"\x22\xf1\x90", timeout=1.0)
    with pytest.raises(BusDownError, match="receive failed"):
        link.recv(0.1)
    assert (owner.counters.send_errors, owner.counters.recv_errors) == (1, 1)
    assert len(sockets) == 2  # each failure closed its socket: the next use opened a new one
    for sock in sockets:
        sock.close()
