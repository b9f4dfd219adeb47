"""The bus breaking under the agent: send and receive failures give bus_error results, then recovery.

A python-can virtual bus cannot fail by itself, so FaultyBus (a VirtualBus whose send/recv raise
on demand, as socketcan's do with "Network is down") stands in for a failing interface. Everything
else - notifier, ISO-TP, executor, supervisor, simulator - is the real thing.
"""

import threading

import can
import pytest
from can.interfaces.virtual import VirtualBus

from agent.bus.owner import wait_until
from agent.system.local import LocalSession
from agent.wire.command import FUNCTIONAL, ErrorCode, Status


class Faults:
    def __init__(self):
        self.send = 0
        self.recv = 0
        self.open = 0
        self.opened = 0
        self.recv_after_send = 0  # sends after which the bus's next receive fails
        self.lock = threading.Lock()

    def take(self, kind):
        with self.lock:
            left = getattr(self, kind)
            if left > 0:
                setattr(self, kind, left - 1)
            return left > 0


class FaultyBus(VirtualBus):
    def __init__(self, faults, **kwargs):
        if faults.take("open"):
            raise can.CanInitializationError("No such device")
        super().__init__(**kwargs)
        faults.opened += 1
        self.faults = faults
        self.recv_fails = threading.Event()

    def send(self, msg, timeout=None):
        if self.faults.take("send"):
            raise can.CanOperationError("Failed to transmit: [Errno 100] Network is down")
        if self.faults.take("recv_after_send"):
            self.recv_fails.set()  # before the frame leaves: its answer can only meet a failing receive
        super().send(msg, timeout)

    def _recv_internal(self, timeout):
        if self.faults.take("recv"):
            raise can.CanOperationError("Error receiving: [Errno 100] Network is down")
        got = super()._recv_internal(timeout)
        if self.recv_fails.is_set():  # checked after the wait, so a frame that came meanwhile is lost too
            raise can.CanOperationError("Error receiving: [Errno 100] Network is down")
        return got


@pytest.fixture
def faults():
    return Faults()


@pytest.fixture
def faulty_agent(vehicle, sim, faults):
    def factory():
        return FaultyBus(faults, channel=vehicle.bus.channel, fd=True)

    with LocalSession(vehicle, bus_factory=factory) as session:
        yield session


def read_vin(session):
    return session.run("engine", "read_data", {"data": "vin"})


def test_send_failure_is_bus_error_then_recovers(faulty_agent, faults):
    owner = faulty_agent.runtime.owner
    faults.send = 2  # one failed send is retried; two in a row are a broken bus
    failed = read_vin(faulty_agent)
    assert (failed.status, failed.outcome.error.code) == (Status.FAILED, ErrorCode.BUS_ERROR)
    assert "Network is down" in failed.outcome.error.message
    assert wait_until(lambda: owner.counters.rebuilds >= 1 and owner.is_up, 5)
    assert read_vin(faulty_agent).status is Status.COMPLETED
    assert faults.opened == 2 and owner.counters.send_errors == 2


def test_one_send_failure_is_retried_without_a_rebuild(faulty_agent, faults):
    owner = faulty_agent.runtime.owner
    faults.send = 1  # e.g. ENOBUFS: the transmit queue was full for a moment
    assert read_vin(faulty_agent).status is Status.COMPLETED
    assert owner.counters.send_errors == 1 and owner.counters.rebuilds == 0 and faults.opened == 1


def test_commands_during_outage_fail_fast_as_bus_error(faulty_agent, faults):
    owner = faulty_agent.runtime.owner
    faults.send, faults.open = 2, 3  # a broken bus (two failed sends), unopenable for a few backoff rounds
    first = read_vin(faulty_agent)
    during = read_vin(faulty_agent)
    assert first.outcome.error.code is ErrorCode.BUS_ERROR
    assert during.outcome.error.code is ErrorCode.BUS_ERROR and during.duration_ms < 100
    assert "down" in during.outcome.error.message
    assert wait_until(lambda: owner.is_up, 10)
    assert read_vin(faulty_agent).status is Status.COMPLETED


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_receive_failure_ends_notifier_and_is_rebuilt(faulty_agent, faults):
    owner = faulty_agent.runtime.owner
    faults.recv = 1
    assert wait_until(lambda: owner.counters.recv_errors >= 1, 5)
    assert wait_until(lambda: owner.counters.rebuilds >= 1 and owner.is_up, 5)
    assert read_vin(faulty_agent).status is Status.COMPLETED
    assert faults.opened == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_bus_that_fails_while_an_answer_is_awaited_gives_bus_error_not_timeout(faulty_agent, faults):
    """The answer was lost with the bus: the ECU may well have answered, so `timeout` would blame it."""
    owner = faulty_agent.runtime.owner
    faults.recv_after_send = 1
    # a one-frame answer: a multi-frame one would leave the simulator waiting out N_Bs for flow control
    failed = faulty_agent.run("engine", "read_data", {"data": "engine_speed"})
    assert (failed.status, failed.outcome.error.code) == (Status.FAILED, ErrorCode.BUS_ERROR)
    assert "Network is down" in failed.outcome.error.message
    assert wait_until(lambda: owner.counters.rebuilds >= 1 and owner.is_up, 5)
    assert read_vin(faulty_agent).status is Status.COMPLETED


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_bus_that_fails_while_functional_answers_are_collected_gives_bus_error(faulty_agent, faults):
    """Answers went with the bus: neither "nobody answered" nor a short list of answers would be true."""
    faults.recv_after_send = 1
    command_id, _ = faulty_agent.submit("engine", "read_data", {"data": "engine_speed"}, addressing=FUNCTIONAL)
    failed = faulty_agent.wait(command_id, 10)
    assert (failed.status, failed.outcome.error.code) == (Status.FAILED, ErrorCode.BUS_ERROR), failed.outcome
    assert "Network is down" in failed.outcome.error.message


def test_bus_that_never_opens_reports_unavailable(vehicle):
    from agent.system.local import BusUnavailableError

    faults = Faults()
    faults.open = 10**6

    def factory():
        return FaultyBus(faults, channel=vehicle.bus.channel, fd=True)

    with pytest.raises(BusUnavailableError, match="No such device"), LocalSession(vehicle, bus_factory=factory):
        pass


def test_a_frame_handler_that_raises_loses_its_frame_not_the_bus(vehicle, sim, caplog):
    """A bug in one frame handler (an ISO-TP link's sink, a functional collection's tap) went to python-can's
    on_error: the reader stopped, the bus was rebuilt, and every ECU's exchange under way ended bus_error.
    Now the frame is lost to that handler alone: counted, its traceback logged once per handler."""
    import logging

    from agent.bus.owner import RxFilter

    def broken_sink(msg):
        raise KeyError("a bug in a sink")

    class Collector:
        def on_frame(self, msg):
            raise ValueError("a bug in a tap")

    with LocalSession(vehicle) as session, can.Bus(interface="virtual", channel=vehicle.bus.channel) as other:
        owner = session.runtime.owner
        owner.subscribe(0x123, False, broken_sink)
        owner.admit(RxFilter(0x124, False))
        tap = Collector().on_frame
        with caplog.at_level(logging.DEBUG, logger="agent.bus.owner"):
            owner.tap(tap)
            for can_id in (0x123, 0x123, 0x124):
                other.send(can.Message(arbitration_id=can_id, data=b"\x01", is_extended_id=False))
            assert wait_until(lambda: owner.counters.handler_errors >= 5, 5)  # sink twice, tap three times
            assert read_vin(session).status is Status.COMPLETED  # the tap fails on these frames too
            owner.untap(tap)
        assert owner.counters.recv_errors == 0 and owner.counters.rebuilds == 0 and owner.is_up
        logged = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(logged) == 2, [r.getMessage() for r in logged]  # once per handler, however often it fails
        assert {r.exc_info[0] for r in logged} == {KeyError, ValueError}
        reading = session.runtime.owner.counters
        assert reading.handler_errors > 5  # the tap failed on the read's frames as well


def test_a_raising_handler_of_an_unhashable_object_loses_its_frame_not_the_bus(vehicle, sim, caplog):
    """The handler's key for logging once was its bound method's object, put in a set: an object that defines
    __eq__ without __hash__ (a plain @dataclass) is unhashable, and the TypeError of that lookup left the
    router as the handler's exception did before: python-can's on_error, the bus rebuilt."""
    import dataclasses
    import logging

    from agent.bus.owner import RxFilter

    @dataclasses.dataclass
    class Collector:  # eq=True: __hash__ is None
        name: str

        def on_frame(self, msg):
            raise ValueError("a bug in a tap")

    with LocalSession(vehicle) as session, can.Bus(interface="virtual", channel=vehicle.bus.channel) as other:
        owner = session.runtime.owner
        owner.admit(RxFilter(0x124, False))
        tap = Collector("x").on_frame
        with caplog.at_level(logging.DEBUG, logger="agent.bus.owner"):
            owner.tap(tap)
            for _ in range(2):
                other.send(can.Message(arbitration_id=0x124, data=b"\x01", is_extended_id=False))
            assert wait_until(lambda: owner.counters.handler_errors >= 2, 5)
            owner.untap(tap)
        assert read_vin(session).status is Status.COMPLETED
        assert owner.counters.recv_errors == 0 and owner.counters.rebuilds == 0 and owner.is_up
        logged = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert [r.exc_info[0] for r in logged] == [ValueError]


def test_a_new_failing_handler_per_collection_is_logged_once_and_kept_by_nothing(vehicle, caplog):
    """A tap made afresh for every collection (a lambda, a partial, a method of a new object each time) that
    fails: the log-once memory kept every one of them (and what it holds) for the agent's life and logged a
    traceback per collection. It is logged once per failing code, and nothing of the handler is kept."""
    import functools
    import gc
    import logging
    import weakref

    from agent.bus.owner import BusOwner, _Router

    class Collection:
        def on_frame(self, msg):
            raise ValueError("a bug in a tap")

    frame = can.Message(arbitration_id=0x124, data=b"\x01", is_extended_id=False)
    owner = BusOwner(vehicle.bus)  # not started: no notifier of its own hands frames to these taps meanwhile
    router = _Router(owner)
    gone = []
    with caplog.at_level(logging.ERROR, logger="agent.bus.owner"):
        for _ in range(50):
            collection = Collection()
            gone.append(weakref.ref(collection))
            for handler in (collection.on_frame, lambda msg, c=collection: c.on_frame(msg),
                            functools.partial(Collection.on_frame, collection)):
                owner.taps = (handler,)
                router.on_message_received(frame)
            owner.taps = ()
            del collection, handler
    gc.collect()
    assert owner.counters.handler_errors == 150
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) <= 3  # not one per collection
    assert not any(ref() is not None for ref in gone[1:])  # the first: in the logged traceback's frames
