"""Assembles the agent from its config: bus owner, ISO-TP links, executors, per-component workers."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from agent.bus.functional import FunctionalLink, known_responders
from agent.bus.isotp_link import IsoTpLink
from agent.bus.kernel_isotp import KernelIsoTpLink, kernel_isotp_available, kernel_isotp_max_pdu
from agent.bus.owner import NOTIFIER_STOP_S, SUPERVISOR_STOP_S, BusFactory, BusOwner
from agent.config.model import AgentConfig, BusConfig, EcuConfig
from agent.config.transport import isotp_address
from agent.core.worker import AheadHook, ComponentWorker, ResultSink, StartHook
from agent.policy.admission import Admission, refusal_reason
from agent.uds.executor import Executor
from agent.uds.transaction import Link
from agent.wire.command import Command

log = logging.getLogger(__name__)


class Companion(Protocol):
    """Something that shares the agent's lifetime around the bus, e.g. simulated ECUs wired in by the CLI."""

    def start(self, wait: float = 2.0) -> bool: ...

    def stop(self) -> None: ...


BUS_STOP_S = SUPERVISOR_STOP_S + NOTIFIER_STOP_S  # the bus supervisor's join and the notifier's stop, together


def choose_transport(bus: BusConfig) -> str:
    """'kernel' or 'userspace' for this bus: kernel ISO-TP when asked or when auto and available."""
    if bus.isotp == "userspace" or bus.interface != "socketcan":
        return "userspace"
    if bus.isotp == "kernel" or kernel_isotp_available():
        return "kernel"
    return "userspace"


class Runtime:
    """The CAN half of the agent. `submit` takes validated commands; results go to the sink."""

    def __init__(self, config: AgentConfig, sink: ResultSink, on_start: StartHook | None = None,
                 bus_factory: BusFactory | None = None, companions: Sequence[Companion] = (),
                 on_bus_change: Callable[[bool, str], None] | None = None,
                 on_probe: Callable[[str, bool], None] | None = None,
                 wall: Callable[[], float] = time.time, on_ahead: AheadHook | None = None) -> None:
        self.config = config
        self.transport = choose_transport(config.bus)
        self.owner = BusOwner(config.bus, factory=bus_factory, on_change=on_bus_change)
        self.companions = list(companions)
        self.workers: dict[str, ComponentWorker] = {}
        self.transports: dict[str, str] = {}  # per ECU: "kernel" or "userspace"
        self._stopping = threading.Event()
        links = {ecu.name: self._link(ecu) for ecu in config.ecus}

        def passive(name: str) -> bool:  # a bound kernel socket sends that ECU's flow control itself
            link = links.get(name)
            return isinstance(link, KernelIsoTpLink) and link.bound

        def busy(name: str) -> bool:  # that ECU's worker has an exchange of its own on the bus now
            worker = self.workers.get(name)
            return worker is not None and worker.on_bus

        responders = known_responders(list(config.ecus), passive, busy)
        for ecu in config.ecus:
            functional = FunctionalLink(self.owner, ecu, responders) if ecu.addressing.functional_id is not None \
                else None
            executor = Executor(ecu, links[ecu.name], functional)
            self.workers[ecu.name] = ComponentWorker(ecu, executor, sink, on_start, clock=wall, on_ahead=on_ahead,
                                                     probe_interval_s=config.metrics.reachability_interval_s,
                                                     on_probe=on_probe)
        log.info("runtime assembled", extra={"ecus": len(config.ecus), "transport": self.transport,
                                             "transports": self.transports})

    def _link(self, ecu: EcuConfig) -> Link:
        address = isotp_address(ecu.addressing)
        self.transports[ecu.name] = self.transport
        needed = max((d.length + 3 for d in ecu.dids if d.length is not None), default=0)
        if self.transport == "kernel" and needed > (limit := kernel_isotp_max_pdu()):
            # e.g. Debian 12's 6.1 kernel: 4095-byte PDUs at most; a 4095-byte DID needs 4098
            self.transports[ecu.name] = "userspace"
            log.info("ECU %s uses userspace ISO-TP: its DIDs need %d-byte PDUs, kernel ISO-TP takes %d",
                     ecu.name, needed, limit, extra={"component": ecu.name, "transport": "userspace"})
        if self.transports[ecu.name] == "kernel":
            # The raw bus still sees the ECU's responses: frame counters, and first frames for P2.
            return KernelIsoTpLink(self.config.bus.channel, address, ecu.isotp, name=ecu.name, owner=self.owner)
        return IsoTpLink(self.owner, address, ecu.isotp, name=ecu.name)

    def start(self, wait: float = 2.0) -> bool:
        """Starts companions, bus and workers; True when the bus came up within `wait` seconds."""
        for companion in self.companions:
            companion.start(wait)
        up = self.owner.start(wait)
        for worker in self.workers.values():
            worker.start()
        return up

    def check(self, command: Command, reserved: int = 0) -> Admission:
        """Would `submit` queue this command, with `reserved` more already promised to its component?"""
        if self._stopping.is_set():
            return Admission.STOPPING
        worker = self.workers.get(command.component)
        if worker is None:
            return Admission.UNKNOWN_COMPONENT
        reason = refusal_reason(worker.ecu, command)
        if reason is not None:
            return Admission.denied(reason)
        return Admission.QUEUED if worker.depth + reserved < worker.ecu.queue_size else Admission.BUSY

    def idle(self, component: str) -> bool:
        """`component`'s worker has nothing submitted and unfinished: a command submitted now runs next."""
        worker = self.workers.get(component)
        return worker is not None and worker.idle and not self._stopping.is_set()

    def submit(self, command: Command) -> Admission:
        admission = self.check(command)
        if admission is not Admission.QUEUED:
            return admission
        return Admission.QUEUED if self.workers[command.component].submit(command) else Admission.BUSY

    def revive_dead_workers(self) -> list[str]:
        """Restarts any worker whose thread died (it should not); returns their names."""
        dead = [name for name, w in self.workers.items() if not w.alive and not self._stopping.is_set()]
        for name in dead:
            log.error("worker thread died, restarting", extra={"component": name})
            self.workers[name].start()
        return dead

    def stop(self, grace: float = 5.0, until: float | None = None) -> None:
        """Stops taking commands, lets in-flight ones finish within `grace`, then closes the bus: within
        BUS_STOP_S, and never past `until` (monotonic; the caller's stop budget) when given.

        Queued commands are dropped from memory only: the ledger still holds them as `queued`, and the
        next start runs them.
        """
        self._stopping.set()
        end = time.monotonic() + grace
        for worker in self.workers.values():
            worker.drain()
        for worker in self.workers.values():
            if not worker.stop(max(0.1, end - time.monotonic())):
                log.error("worker did not stop in time", extra={"component": worker.ecu.name})
        bus_stop = BUS_STOP_S if until is None else max(0.0, min(BUS_STOP_S, until - time.monotonic()))
        self.owner.stop(bus_stop)
        for companion in self.companions:
            companion.stop()
