"""One worker thread per component: runs its commands one at a time, in arrival order."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from agent.config.model import EcuConfig
from agent.uds.executor import DEFAULT_SESSION, Executor
from agent.wire.command import PHYSICAL, Command, ErrorCode, Outcome, Params, Result, Status, command_fields

log = logging.getLogger(__name__)

ResultSink = Callable[[Result], None]
StartHook = Callable[[Command], None]
# Marks a command started ahead of its turn, without waiting; returns a wait for that mark (which returns
# the error that kept it from being stored, TakenBackError, or None), or None when this command cannot be marked ahead.
AheadHook = Callable[[Command], "Callable[[], BaseException | None] | None"]


class TakenBackError(Exception):
    """What a mark's wait returns, or `on_start` raises, when the command's owner took it back meanwhile
    (a stop that gave up waiting for the worker queued it again): the worker neither runs nor answers it."""


class StartNotRecordedError(Exception):
    """What a mark's wait returns, or `on_start` raises, when the store could not take the start mark
    (a full or failing disk): the command does not run, and is answered `storage_unavailable` ("not now")."""


@dataclass(frozen=True)
class Job:
    """One collection reading for a worker: the request's params, and where its outcome goes.

    `done(outcome, seconds)` runs on the worker thread: it must only hand the outcome over.
    """

    params: Params
    done: Callable[[Outcome, float], None]


class ComponentWorker:
    """Owns one component's queue and executor; keeps non-default sessions alive with TesterPresent.

    `on_start` runs just before a command executes (the durable ledger hooks in there): a command whose
    start it could not record never runs (StartNotRecordedError: answered `storage_unavailable`; any other
    exception is a bug: logged with its traceback, answered `failed`/`internal`). `sink` receives every
    final Result; a sink that raises is logged, never fatal to the worker.

    With `on_ahead`, while a command runs the worker takes the next one from its queue and hands its
    start mark to the store meanwhile (to ride another component's commit while one is busy); when its
    turn comes the worker waits for that mark (committing it then if no commit carried it).

    Collection readings (`offer`) wait behind every command: one runs only when no command is queued or
    taken ahead and the component is in its default session, so a command waits at most for the one
    reading already on the bus.
    """

    def __init__(self, ecu: EcuConfig, executor: Executor, sink: ResultSink,
                 on_start: StartHook | None = None, clock: Callable[[], float] = time.time,
                 probe_interval_s: float = 0.0, on_probe: Callable[[str, bool], None] | None = None,
                 on_ahead: AheadHook | None = None) -> None:
        self.ecu = ecu
        self.executor = executor
        self._sink = sink
        self._on_start = on_start
        self._clock = clock
        self._commands: deque[Command | None] = deque()  # None: the stop marker
        self._job: Job | None = None  # at most one collection reading waits, behind every command
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None
        self.in_flight: Command | None = None
        self.busy_since: float | None = None  # monotonic start of the command in flight
        # The executor is in a physical exchange with its ECU (a command, a reading, a keepalive or probe): what
        # the ECU sends now is for this worker's link, never an answer to another component's functional request.
        # Not while it runs a functional command: its own link is idle then, the collector takes the answers.
        self.on_bus = False
        self._probe_interval = probe_interval_s
        self._on_probe = on_probe
        self._outstanding = 0  # submitted and not yet finished (queued, or being taken, or running)
        self._on_ahead = on_ahead
        self._next: tuple[Command, Callable[[], BaseException | None] | None] | None = None  # taken ahead
        self._halting = False  # stop() was called: a command taken ahead is not run
        self._stop_next = False  # the stop marker was taken ahead
        self._idle_failing = False  # the last keepalive or probe raised (logged once until one works)

    @property
    def depth(self) -> int:
        with self._ready:
            return self._queued() + (self._next is not None)

    def _queued(self) -> int:
        return sum(1 for c in self._commands if c is not None)

    @property
    def idle(self) -> bool:
        """No command submitted and unfinished: the next one submitted is the next to run."""
        return self._outstanding == 0

    def submit(self, command: Command) -> bool:
        """Queues a command; False when the queue is full (the caller answers `busy`)."""
        with self._ready:
            if self._queued() >= self.ecu.queue_size:
                return False
            self._commands.append(command)
            self._outstanding += 1
            self._ready.notify()
        return True

    def _finished(self) -> None:
        with self._ready:
            self._outstanding -= 1

    def offer(self, job: Job) -> bool:
        """Hands over one collection reading; False while another one still waits."""
        with self._ready:
            if self._job is not None:
                return False
            self._job = job
            self._ready.notify()
        return True

    def withdraw(self) -> Job | None:
        """Takes back the reading not yet started (collection paused, plan removed)."""
        with self._ready:
            job, self._job = self._job, None
        return job

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"worker-{self.ecu.name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float) -> bool:
        """Lets the command in flight finish (up to `timeout`); queued ones stay unrun. True if joined."""
        if self._thread is None:
            return True
        self._halting = True
        with self._ready:
            self._commands.append(None)
            self._job = None
            self._ready.notify()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def drain(self) -> list[Command]:
        """Removes and returns the commands still waiting (for an orderly shutdown)."""
        with self._ready:
            left = [c for c in self._commands if c is not None]
            stop = any(c is None for c in self._commands)
            self._commands.clear()
            if stop:
                self._commands.append(None)
            self._outstanding -= len(left)
        return left

    def _take(self, timeout: float | None) -> Command | Job | bool | None:
        """The next command, else a collection job (default session only); None: stop; False: timed out."""
        with self._ready:
            end = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._commands:
                    return self._commands.popleft()
                if self._job is not None and self.executor.session == DEFAULT_SESSION:
                    job, self._job = self._job, None
                    return job
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._ready.wait(left)

    def _run(self) -> None:
        keepalive_s = self.ecu.timing.s3_keepalive_ms / 1000
        while not self._stop_next:
            waits = [keepalive_s] if self.executor.session != DEFAULT_SESSION else []
            if self._probe_interval > 0:
                waits.append(self._probe_interval)
            ahead, self._next = self._next, None
            if ahead is not None and self._halting:  # stopping: it stays unrun (the owner puts it back)
                self._finished()
                ahead = None
            if ahead is not None:
                command, mark = ahead
            else:
                mark = None
                item = self._take(min(waits) if waits else None)
                if item is False:
                    self._keepalive_or_probe()
                    continue
                if item is None:
                    return
                if isinstance(item, Job):
                    self._collect(item)
                    continue
                assert isinstance(item, Command)
                command = item
            try:
                self._execute(command, mark)
            except Exception:  # never let one command end the worker
                log.exception("worker %s failed on a command", self.ecu.name,
                              extra=command_fields(command.id, command.component, command.command))
            finally:
                self._finished()

    def _collect(self, job: Job) -> None:
        """One collection reading: one request (at most), its outcome to the job's callback."""
        started = time.monotonic()
        self.busy_since = started
        self.on_bus = True
        try:
            outcome = self.executor.execute(job.params, started + self.ecu.timing.request_ms / 1000)
        except Exception as err:  # the executor promises not to raise; a reading still never ends the worker
            log.exception("collection reading on %s failed", self.ecu.name, extra={"component": self.ecu.name})
            outcome = Outcome.failure(Status.FAILED, ErrorCode.INTERNAL, f"{type(err).__name__}: {err}")
        finally:
            self.busy_since = None
            self.on_bus = False
        self._guard(lambda o: job.done(o, time.monotonic() - started), outcome)

    def _keepalive_or_probe(self) -> None:
        """Nothing else to do: `_hold_session_or_probe`, whose bug must not end the worker: logged with its
        traceback once until it works again (it runs every S3 or probe interval: a line each time would
        flood the card)."""
        try:
            self._hold_session_or_probe()
        except Exception:
            if not self._idle_failing:
                log.exception("keepalive or probe of %s failed; the worker goes on", self.ecu.name,
                              extra={"component": self.ecu.name})
            self._idle_failing = True
        else:
            self._idle_failing = False

    def _hold_session_or_probe(self) -> None:
        """Nothing to do for a while: hold a non-default session (S3), or probe reachability."""
        self.on_bus = True
        try:
            if self.executor.session != DEFAULT_SESSION:
                self.executor.keepalive()
            elif self._probe_interval > 0 and self._on_probe is not None:
                answered = self.executor.probe()
                self.on_bus = False
                self._guard(lambda ok: self._on_probe(self.ecu.name, ok), answered)
        finally:
            self.on_bus = False

    def _take_ahead(self) -> None:
        """Takes the next queued command and has its start mark written while the current one runs."""
        with self._ready:
            if not self._commands:
                return
            command = self._commands.popleft()
        if command is None:  # the stop marker: the worker ends after the command in flight
            self._stop_next = True
            return
        mark = None
        try:
            mark = self._on_ahead(command) if self._on_ahead is not None else None
        except Exception:
            log.exception("marking a command started ahead failed; it is marked in its turn",
                          extra=command_fields(command.id, command.component, command.command))
        self._next = (command, mark)

    def _execute(self, command: Command, mark: Callable[[], BaseException | None] | None = None) -> None:
        now = self._clock()
        expired = "expires_at" if command.expires_at is not None and now > command.expires_at else \
            "its MQTT Message Expiry Interval" if command.deadline is not None and time.monotonic() > command.deadline \
            else None
        if expired is not None:
            self._emit(command, Outcome.failure(Status.EXPIRED, ErrorCode.EXPIRED, f"not started before {expired}"),
                       None)
            return
        error = self._record_start(command, mark)
        if isinstance(error, TakenBackError):
            log.warning("%s was queued again by the stop before it started: not run", command.id,
                        extra=command_fields(command.id, command.component, command.command))
            return
        if error is not None:  # unrecorded start: running it could break exactly-once, so it never runs
            fields = command_fields(command.id, command.component, command.command)
            if isinstance(error, StartNotRecordedError):
                log.error("could not record the start of %s: %s", command.id, error, extra=fields)
                outcome = Outcome.failure(Status.REJECTED, ErrorCode.STORAGE_UNAVAILABLE,
                                          f"could not record the start durably, not run: {error}")
            else:  # a bug in the start hook, not the disk: not to be taken for a full one
                log.error("recording the start of %s failed; not run", command.id, exc_info=error, extra=fields)
                outcome = Outcome.failure(Status.FAILED, ErrorCode.INTERNAL,
                                          f"the agent could not record the start, not run: {type(error).__name__}")
            self._emit(command, outcome, None)
            return
        self.in_flight, self.busy_since = command, time.monotonic()
        started = self._clock()
        budget_ms = command.timeout_ms or self.ecu.timing.request_ms
        if self._on_ahead is not None and self._next is None and not self._halting:
            self._take_ahead()
        self.on_bus = command.addressing == PHYSICAL
        try:
            outcome = self.executor.execute(command.params, time.monotonic() + budget_ms / 1000, command.addressing)
        except Exception as err:  # the executor promises not to raise: a bug still ends in a final, not in silence
            log.exception("executing %s failed", command.id,
                          extra=command_fields(command.id, command.component, command.command))
            outcome = Outcome.failure(Status.FAILED, ErrorCode.INTERNAL, f"{type(err).__name__}: {err}")
        finally:
            self.in_flight, self.busy_since, self.on_bus = None, None, False
        self._emit(command, outcome, started)

    def _record_start(self, command: Command, mark: Callable[[], BaseException | None] | None) -> BaseException | None:
        """Its start on the disk (the mark written ahead, waited for; else `on_start`): None, or what kept it
        from being recorded (TakenBackError: its owner took it back)."""
        if mark is not None:
            return mark()
        if self._on_start is not None:
            try:
                self._on_start(command)
            except Exception as err:
                return err
        return None

    def _emit(self, command: Command, outcome: Outcome, started: float | None) -> None:
        result = Result(command_id=command.id, component=command.component, command=command.command,
                        outcome=outcome, received_at=command.received_at, started_at=started,
                        finished_at=self._clock())
        self._guard(self._sink, result)  # the final on its way first: the log line is not on its path
        log.info("command %s", result.status, extra={
            **command_fields(command.id, command.component, command.command),
            "status": str(result.status), "duration_ms": result.duration_ms,
        })

    def _guard(self, callback: Callable | None, arg: object) -> None:
        if callback is None:
            return
        try:
            callback(arg)
        except Exception:
            log.exception("callback %r failed", callback)
