"""A set of simulated ECUs sharing one bus connection of their own (so they really talk over CAN)."""

from __future__ import annotations

from agent.bus.owner import BusFactory, BusOwner
from agent.config.model import BusConfig
from agent.sim.config import SimConfig
from agent.sim.ecu import SimulatedEcu


class Simulator:
    """Starts and stops the ECUs of a simulator config on the given bus."""

    def __init__(self, config: SimConfig, bus: BusConfig | None = None, factory: BusFactory | None = None) -> None:
        bus_config = bus or config.bus
        if bus_config is None:
            raise ValueError("the simulator needs a bus: give one in its config or on the command line")
        self.owner = BusOwner(bus_config, factory=factory, name="sim-can")
        self.ecus = {ecu.name: SimulatedEcu(ecu, self.owner) for ecu in config.ecus}

    def start(self, wait: float = 2.0) -> bool:
        up = self.owner.start(wait)
        for ecu in self.ecus.values():
            ecu.start()
        return up

    def stop(self) -> None:
        for ecu in self.ecus.values():
            ecu.request_stop()
        for ecu in self.ecus.values():
            ecu.stop()
        self.owner.stop()

    def ecu(self, name: str) -> SimulatedEcu:
        return self.ecus[name]
