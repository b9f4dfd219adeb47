"""Owns the one can.Bus and can.Notifier, routes frames to ISO-TP links, rebuilds the bus when it breaks."""

from __future__ import annotations

import functools
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import can

from agent.config.model import BusConfig
from agent.errors import BusDownError

log = logging.getLogger(__name__)

FrameSink = Callable[[can.Message], None]
# How long the notifier's recv blocks: bounds how fast stop() returns; idle cost is one wake-up per poll.
NOTIFIER_POLL_S = 0.25
SUPERVISOR_STOP_S = 3.0  # the longest a stop waits for the supervisor thread
NOTIFIER_STOP_S = 2.0  # the longest a teardown waits for the notifier thread (stuck in a frame handler: no longer)
RECEIVE_BUFFER_BYTES = 1 << 20
OPEN_LOG_EVERY_S = 60.0  # a bus that stays unopenable is logged again at most this often
BusFactory = Callable[[], can.BusABC]
SEND_TIMEOUT_S = 0.2
SEND_RETRY_PAUSE_S = 0.005
# python-can interfaces whose send() several threads may call at once (one syscall / a locked queue);
# every other interface gets a lock around send().
THREAD_SAFE_SEND = frozenset({"socketcan", "virtual"})


@dataclass(frozen=True)
class RxFilter:
    """Response ids the agent listens to (a kernel CAN filter on socketcan): one id, or a range by mask."""

    can_id: int
    extended: bool
    mask: int | None = None  # None: this id exactly


@dataclass
class BusCounters:
    """Plain counters the metrics sink reads; written by the notifier and senders."""

    frames_rx: int = 0
    frames_tx: int = 0
    bytes_rx: int = 0
    bytes_tx: int = 0
    send_errors: int = 0
    recv_errors: int = 0
    rebuilds: int = 0
    dropped: int = 0
    handler_errors: int = 0  # exceptions the agent's own frame handlers raised (a bug; the bus carries on)


def open_bus(config: BusConfig) -> can.BusABC:
    """Opens the configured python-can bus, ignoring any python-can config files on the machine."""
    kwargs: dict[str, object] = {"fd": config.fd, **dict(config.options)}
    if config.interface == "socketcand":  # python-can would retry for 10 s in a busy loop, logging each try
        address = (str(kwargs.get("host", "")), int(str(kwargs.get("port", 29536))))
        try:
            socket.create_connection(address, timeout=2.0).close()
        except OSError as err:
            raise OSError(f"socketcand hub {address[0]}:{address[1]} unreachable: {err.strerror or err}") from err
    if config.interface != "virtual":
        kwargs["bitrate"] = config.bitrate
        if config.data_bitrate:
            kwargs["data_bitrate"] = config.data_bitrate
    else:
        kwargs["receive_own_messages"] = config.receive_own_messages
    bus = can.Bus(interface=config.interface, channel=config.channel, ignore_config=True, **kwargs)
    raw = getattr(bus, "socket", None)
    if raw is not None:
        # A multi-frame response arrives in a burst (vcan has no bitrate at all); a small receive buffer
        # drops frames while the notifier is busy. The kernel caps the request at net.core.rmem_max.
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        except OSError as err:
            log.debug("cannot enlarge the CAN receive buffer: %s", err)
    return bus


def _code_of(handler: Callable[..., object]) -> object:
    """What a frame handler runs: the function under a bound method or a partial (its code object), or the
    class of a callable object. Never the handler itself nor its object: a new lambda or object per
    collection would be kept for the agent's life, and an object's own __hash__ may raise (a dataclass)."""
    try:
        while isinstance(handler, functools.partial):
            handler = handler.func
        function = getattr(handler, "__func__", handler)
        return getattr(function, "__code__", None) or type(function)
    except Exception:  # a __getattr__ of its own that raises: still one key per class
        return type(handler)


class _Router(can.Listener):
    """The one notifier listener: hands each frame to the sink registered for its id (a dict lookup).

    A handler that raises is a bug in that handler: the frame is lost to it alone, counted, and logged
    with its traceback (once per handler's code). Left to python-can, the exception would go to `on_error` and
    stop the reader, and every ECU's exchange would end `bus_error` for one handler's bug."""

    def __init__(self, owner: BusOwner) -> None:
        self._owner = owner
        self._logged: set[object] = set()  # code of the handlers whose exception was logged with its traceback

    def on_message_received(self, msg: can.Message) -> None:
        counters = self._owner.counters
        counters.frames_rx += 1
        counters.bytes_rx += msg.dlc
        if msg.is_error_frame or msg.is_remote_frame:
            return
        # A handler that never returns stops every frame after it, and nothing else would notice:
        # the workers only see timeouts. The watchdog reads this (BusOwner.dispatch_stuck_s).
        self._owner.dispatching_since = time.monotonic()
        try:
            sink = self._owner.sinks.get((msg.arbitration_id, msg.is_extended_id))
            if sink is not None:
                self._hand(sink, msg)
            for tap in self._owner.taps:  # empty unless a functional request is collecting answers
                self._hand(tap, msg)
        finally:
            self._owner.dispatching_since = None

    def _hand(self, handler: FrameSink, msg: can.Message) -> None:
        try:
            handler(msg)
        except Exception:
            self._owner.counters.handler_errors += 1
            key = _code_of(handler)
            if key in self._logged:
                log.debug("frame handler %r failed again on 0x%X", handler, msg.arbitration_id)
                return
            self._logged.add(key)
            log.exception("frame handler %r failed on a frame from 0x%X; the frame is lost to it, the bus "
                          "carries on (further failures of this handler are counted: "
                          "sovd_can_handler_errors_total)", handler, msg.arbitration_id,
                          extra={"interface": self._owner.config.channel})

    def on_error(self, exc: Exception) -> None:
        # Report, then re-raise: a handled error would make the Notifier spin on a broken bus.
        self._owner.report_fault(f"receive failed: {exc}", recv=True)
        raise exc


class FaultMark:
    """A reader's place in its bus owner's count of faults. Frames went with a broken bus, so a reader
    waiting on would end in a timeout that blames an ECU which may well have answered: `check` raises
    BusDownError instead, once per fault (a reader that only listens, like a simulated ECU, is told,
    then listens again)."""

    def __init__(self, owner: BusOwner) -> None:
        self._owner = owner
        self._seen = owner.breaks

    def reset(self) -> None:
        """Faults before now are not this reader's concern (a new exchange begins)."""
        self._seen = self._owner.breaks

    def check(self, reader: str, during: str) -> None:
        """Raises BusDownError if the bus broke since the last check or reset."""
        breaks = self._owner.breaks
        if breaks != self._seen:
            self._seen = breaks
            raise BusDownError(f"{reader}: CAN bus {self._owner.config.channel} broke {during}: "
                               f"{self._owner.last_error}")


class BusOwner:
    """The single owner of the CAN bus. Nothing else calls bus.recv(); sends go through `send`, except a
    kernel ISO-TP link's: its own socket sends and receives, and counts its failures in `counters`.

    A supervisor thread rebuilds bus and notifier with exponential backoff after a send failure or
    when the notifier's thread has died; meanwhile `send` raises BusDownError at once.
    """

    def __init__(self, config: BusConfig, filters: list[RxFilter] | None = None,
                 factory: BusFactory | None = None, name: str = "can",
                 on_change: Callable[[bool, str], None] | None = None) -> None:
        self.config = config
        self.name = name
        self.counters = BusCounters()
        self.sinks: dict[tuple[int, bool], FrameSink] = {}
        self.taps: tuple[FrameSink, ...] = ()  # see every frame the filters let through, while tapped
        # One functional collection at a time: two at once would each send flow control to every
        # multi-frame answer (and each take the other's answers for its own).
        self.collecting = threading.Lock()
        self._filters = list(filters or [])
        self._factory = factory or (lambda: open_bus(config))
        self._on_change = on_change
        self._bus: can.BusABC | None = None
        self._notifier: can.Notifier | None = None
        self._lock = threading.Lock()
        self._send_lock = None if config.interface in THREAD_SAFE_SEND else threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._up = threading.Event()
        self._fault: str | None = None
        self._supervisor: threading.Thread | None = None
        self.last_error: str | None = None
        self.dispatching_since: float | None = None  # the notifier thread is in a frame handler since then
        self.breaks = 0  # faults so far (FaultMark: a reader that saw another number lost what came since)
        self._watchers: tuple[Callable[[str], None], ...] = ()
        self.heartbeat = time.monotonic()
        self._failures = 0  # open attempts failed in a row
        self._logged_at = 0.0

    # ---- wiring --------------------------------------------------------------------------------
    def subscribe(self, can_id: int, extended: bool, sink: FrameSink) -> None:
        """Routes frames with this id to `sink` (called on the notifier thread; must not block)."""
        self.sinks[(can_id, extended)] = sink
        self.admit(RxFilter(can_id, extended))

    def admit(self, rx_filter: RxFilter) -> None:
        """Lets frames matching `rx_filter` through the bus filters (for taps: no sink of their own)."""
        if rx_filter not in self._filters:
            self._filters.append(rx_filter)
            bus = self._bus
            if bus is not None:
                bus.set_filters(self._can_filters())

    def tap(self, sink: FrameSink) -> None:
        """Also hands every frame that passes the filters to `sink`, until `untap` (notifier thread).
        Tapping a sink that is already tapped changes nothing (a frame is never handed over twice)."""
        with self._lock:
            if sink not in self.taps:
                self.taps = (*self.taps, sink)

    def untap(self, sink: FrameSink) -> None:
        """Stops handing frames to `sink`. Compared by equality, not identity: each `obj.method` is a
        new bound-method object, so `is` would never match one and every tap would stay for good."""
        with self._lock:
            self.taps = tuple(t for t in self.taps if t != sink)

    def watch_faults(self, on_fault: Callable[[str], None]) -> None:
        """Calls `on_fault(reason)` each time the bus breaks (on the thread that saw it; must not block),
        so a link waiting for an answer that went with the bus stops waiting at once."""
        with self._lock:
            self._watchers = (*self._watchers, on_fault)

    def _can_filters(self) -> list[can.typechecking.CanFilter]:
        return [
            {"can_id": f.can_id, "can_mask": f.mask if f.mask is not None else 0x1FFFFFFF if f.extended else 0x7FF,
             "extended": f.extended}
            for f in self._filters
        ]

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, wait: float = 2.0) -> bool:
        """Starts the supervisor, which opens the bus; True once the bus is up within `wait` seconds."""
        self._supervisor = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor", daemon=True)
        self._supervisor.start()
        return self._up.wait(wait)

    def stop(self, timeout: float = SUPERVISOR_STOP_S + NOTIFIER_STOP_S) -> None:
        """Stops the supervisor and closes the bus; waits at most `timeout` seconds for both threads
        (the supervisor, then the notifier, which may be stuck in a frame handler)."""
        end = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        if self._supervisor is not None:
            self._supervisor.join(min(SUPERVISOR_STOP_S, timeout))
            if self._supervisor.is_alive():
                log.error("bus supervisor did not stop", extra={"interface": self.config.channel})
        self._teardown(max(0.0, min(NOTIFIER_STOP_S, end - time.monotonic())))

    @property
    def supervisor_alive(self) -> bool:
        return self._supervisor is not None and self._supervisor.is_alive()

    def dispatch_stuck_s(self) -> float:
        """How long the notifier thread has been inside one frame's handlers (0: not in one now)."""
        since = self.dispatching_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    # ---- I/O -----------------------------------------------------------------------------------
    def send(self, msg: can.Message) -> None:
        """Sends one frame; raises BusDownError (and schedules a rebuild) when the bus cannot send.

        One failed send (a full transmit queue: ENOBUFS) is retried after a short pause; only a
        second failure in a row counts as a broken bus. Both failures are counted in `send_errors`.
        """
        bus = self._bus
        if bus is None or not self._up.is_set():
            raise BusDownError(f"CAN bus {self.config.channel} is down: {self.last_error or 'not open'}")
        try:
            self._send(bus, msg)
        except (can.CanError, OSError, ValueError) as first:
            self.counters.send_errors += 1
            log.info("CAN send failed, retrying once: %s", first, extra={"interface": self.config.channel})
            time.sleep(SEND_RETRY_PAUSE_S)
            try:
                self._send(bus, msg)
            except (can.CanError, OSError, ValueError) as err:
                self.counters.send_errors += 1
                self.report_fault(f"send failed: {err}")
                raise BusDownError(f"CAN bus {self.config.channel}: send failed: {err}") from err
        self.counters.frames_tx += 1
        self.counters.bytes_tx += msg.dlc

    def _send(self, bus: can.BusABC, msg: can.Message) -> None:
        if self._send_lock is None:
            bus.send(msg, timeout=SEND_TIMEOUT_S)
            return
        with self._send_lock:
            bus.send(msg, timeout=SEND_TIMEOUT_S)

    def report_fault(self, reason: str, recv: bool = False) -> None:
        """Marks the bus broken and wakes the supervisor to rebuild it."""
        if recv:
            self.counters.recv_errors += 1
        with self._lock:
            if self._fault is None:
                self._fault = reason
            self.breaks += 1
            watchers = self._watchers
        self._up.clear()
        self.last_error = reason
        self._wake.set()
        for on_fault in watchers:
            try:
                on_fault(reason)
            except Exception:
                log.exception("bus fault listener failed")

    # ---- supervision ---------------------------------------------------------------------------
    def _supervise(self) -> None:
        delay = 0.1
        while not self._stopping.is_set():
            self.heartbeat = time.monotonic()
            if self._bus is None:
                if self._open():
                    delay = 0.1
                else:
                    self._stopping.wait(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, 5.0)
                continue
            self._wake.wait(1.0)
            self._wake.clear()
            notifier = self._notifier
            if notifier is not None and notifier.exception is not None and self._fault is None:
                self.report_fault(f"notifier stopped: {notifier.exception}", recv=True)
            if self._fault is not None and not self._stopping.is_set():
                log.warning("CAN bus fault, rebuilding: %s", self._fault,
                            extra={"interface": self.config.channel})
                self._teardown()
                self.counters.rebuilds += 1
                self._emit(False, self._fault)

    def _open(self) -> bool:
        try:
            bus = self._factory()
            bus.set_filters(self._can_filters())
            notifier = can.Notifier(bus, [_Router(self)], timeout=NOTIFIER_POLL_S)
        except (can.CanError, OSError, ValueError, ImportError) as err:
            error = f"cannot open {self.config.interface}:{self.config.channel}: {err}"
            self._failures += 1
            now = time.monotonic()
            if error != self.last_error or now - self._logged_at >= OPEN_LOG_EVERY_S:  # bounded log rate
                log.warning("%s (attempt %d; retrying with backoff)", error, self._failures,
                            extra={"interface": self.config.channel, "kind": self.config.interface})
                self._logged_at = now
            self.last_error = error
            return False
        self._failures = 0
        with self._lock:
            self._bus, self._notifier, self._fault = bus, notifier, None
        self._up.set()
        log.info("CAN bus open", extra={"interface": self.config.channel, "kind": self.config.interface})
        self._emit(True, "open")
        return True

    def _teardown(self, notifier_timeout: float = NOTIFIER_STOP_S) -> None:
        self._up.clear()
        with self._lock:
            bus, notifier = self._bus, self._notifier
            self._bus = self._notifier = None
        if notifier is not None:
            try:
                notifier.stop(timeout=notifier_timeout)
            except Exception:  # a dead notifier may fail to stop; the bus is shut down anyway
                log.debug("notifier stop failed", exc_info=True)
        if bus is not None:
            try:
                bus.shutdown()
            except Exception:
                log.debug("bus shutdown failed", exc_info=True)

    def _emit(self, up: bool, reason: str) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(up, reason)
        except Exception:
            log.exception("bus state listener failed")


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    """Polls `predicate` until true or `timeout`; for start-up and tests, never on a hot path."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
