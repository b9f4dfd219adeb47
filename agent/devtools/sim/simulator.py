"""A set of simulated ECUs sharing one bus connection of their own (so they really talk over CAN)."""

from __future__ import annotations

import threading
from pathlib import Path

from agent.bus.owner import BusFactory, BusOwner
from agent.config.model import AgentConfig, BusConfig
from agent.devtools.sim.config import SimConfig, load_sim_config
from agent.devtools.sim.ecu import SimulatedEcu
from agent.devtools.sim.traffic import DEFAULT_FRAMES, VehicleTraffic


class Simulator:
    """Starts and stops the ECUs of a simulator config on the given bus."""

    def __init__(self, config: SimConfig, bus: BusConfig | None = None, factory: BusFactory | None = None,
                 journal: Path | None = None) -> None:
        bus_config = bus or config.bus
        if bus_config is None:
            raise ValueError("the simulator needs a bus: give one in its config or on the command line")
        self.owner = BusOwner(bus_config, factory=factory, name="sim-can")
        self._journal = journal.open("a", encoding="utf-8", buffering=1) if journal else None
        self._journal_lock = threading.Lock()
        record = self._record if self._journal else None
        self.ecus = {ecu.name: SimulatedEcu(ecu, self.owner, record) for ecu in config.ecus}
        self.traffic: VehicleTraffic | None = None  # the vehicle's periodic frames, once asked for
        functional: dict[tuple[int, bool], list[SimulatedEcu]] = {}
        for ecu in self.ecus.values():
            addressing = ecu.config.addressing
            if addressing.functional_id is not None:
                key = (addressing.functional_id, addressing.mode.endswith("29bit"))
                functional.setdefault(key, []).append(ecu)
        for (can_id, extended), listeners in functional.items():  # one sink per id: fan out to every ECU
            self.owner.subscribe(can_id, extended, lambda msg, ecus=tuple(listeners): [
                e.on_functional_frame(msg) for e in ecus])

    def _record(self, line: str) -> None:
        """Appends one executed request to the journal (line-buffered: survives the process being killed)."""
        assert self._journal is not None
        with self._journal_lock:
            self._journal.write(line + "\n")

    def start(self, wait: float = 2.0) -> bool:
        up = self.owner.start(wait)
        for ecu in self.ecus.values():
            ecu.start()
        return up

    def vehicle_traffic(self, period_s: float = 0.1,
                        frames: tuple[tuple[int, bytes], ...] = DEFAULT_FRAMES) -> VehicleTraffic:
        """Starts the vehicle's own periodic frames (awake); `.sleep()` / `.wake()` switch them off and on."""
        if self.traffic is None:
            self.traffic = VehicleTraffic(self.owner, frames, period_s)
            self.traffic.start()
        return self.traffic

    def stop(self) -> None:
        if self.traffic is not None:
            self.traffic.stop()
        for ecu in self.ecus.values():
            ecu.request_stop()
        for ecu in self.ecus.values():
            ecu.stop()
        self.owner.stop()
        if self._journal is not None:
            self._journal.close()

    def ecu(self, name: str) -> SimulatedEcu:
        return self.ecus[name]


def simulators_for(config: AgentConfig, factory: BusFactory | None = None,
                   journal: Path | None = None) -> list[Simulator]:
    """The simulators an agent config asks for (`simulate:`), on the agent's own bus."""
    return [Simulator(load_sim_config(path), bus=config.bus, factory=factory, journal=journal)
            for path in config.simulate]
