"""Client-side figures taken inside one process, next to the same simulator as the agent uses.

    python -m bench.inproc executor|udsoncan COUNT   # read `vin` from the demo engine, COUNT times
    python -m bench.inproc link|isotp COUNT          # fetch a 4000-byte DID (575 CAN frames), COUNT times
    python -m bench.inproc stacks COUNT              # COUNT idle bare can-isotp stacks, until stdin closes

The first four print one JSON line. `client_cpu_ns` is the process's CPU time minus that of the
simulator's threads (identified when it starts, read from /proc/self/task/TID/schedstat), so it is
the client's share alone: the caller plus whatever threads its stack runs (bus notifier, can-isotp's
relay and main threads). Frames are counted by the simulator's bus owner (what it sent and received).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import can
import isotp
import udsoncan
from udsoncan.client import Client
from udsoncan.connections import PythonIsoTpConnection

from agent.bus.isotp_link import IsoTpLink
from agent.bus.owner import BusOwner
from agent.config import load_config
from agent.config.model import AgentConfig, BusConfig, EcuConfig
from agent.config.parse import parse_config
from agent.config.transport import isotp_address, isotp_params
from agent.devtools.sim.config import load_sim_config
from agent.devtools.sim.simulator import Simulator
from agent.uds.executor import Executor
from agent.wire.parse import parse_command
from bench.configs import DEMO, DEMO_SIM, FRAMES_SIM, VIN, fleet_ecus, unique
from bench.probe import thread_cpu_ns

BLOCK_DID, BLOCK_LENGTH = 0x0200, 4000
WARMUP = 5


class Peer:
    """The simulator, with the ids of the threads it started (their CPU is not the client's)."""

    def __init__(self, sim_path: Any, bus: BusConfig) -> None:
        before = {t.native_id for t in threading.enumerate()}
        self.sim = Simulator(load_sim_config(sim_path), bus=bus)
        if not self.sim.start():
            raise RuntimeError("simulator bus did not come up")
        self.tids = [t.native_id for t in threading.enumerate() if t.native_id not in before and t.native_id]

    def cpu_ns(self) -> int:
        return thread_cpu_ns(self.tids)

    def frames(self) -> int:
        counters = self.sim.owner.counters
        return counters.frames_rx + counters.frames_tx


def _demo() -> tuple[AgentConfig, EcuConfig]:
    config = load_config(DEMO)
    config = dataclasses.replace(config, bus=dataclasses.replace(config.bus, channel=unique("bench-inproc-")))
    return config, config.ecus[0]


def _frames() -> tuple[AgentConfig, EcuConfig]:
    config = parse_config({
        "vehicle": "FRAMES", "bus": {"interface": "virtual", "channel": unique("bench-frames-")},
        "ecus": [{"name": "engine", "addressing": {"mode": "normal_11bit", "request_id": 0x7E0, "response_id": 0x7E8},
                  "isotp": {"padding": 0xCC},
                  "dids": [{"name": "block", "id": BLOCK_DID, "codec": "raw", "length": BLOCK_LENGTH}]}],
    })
    return config, config.ecus[0]


def _agent_link(config: AgentConfig, ecu: EcuConfig) -> tuple[IsoTpLink, Callable[[], None]]:
    owner = BusOwner(config.bus, name="client-can")
    link = IsoTpLink(owner, isotp_address(ecu.addressing), ecu.isotp, name=ecu.name)
    if not owner.start():
        raise RuntimeError("client bus did not come up")
    return link, lambda: (link.close(), owner.stop())


def _bare_stack(config: AgentConfig, ecu: EcuConfig) -> tuple[isotp.NotifierBasedCanStack, Callable[[], None]]:
    bus = can.Bus(interface="virtual", channel=config.bus.channel, fd=config.bus.fd, ignore_config=True)
    notifier = can.Notifier(bus, [])
    stack = isotp.NotifierBasedCanStack(bus, notifier, address=isotp_address(ecu.addressing),
                                        params=isotp_params(ecu.isotp))
    return stack, lambda: (notifier.stop(), bus.shutdown())


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"wrong answer: {what}")


def run(mode: str, count: int) -> dict[str, Any]:
    """Sets up the client of `mode` next to its simulator, times `count` exchanges, tears down."""
    config, ecu = _demo() if mode in ("executor", "udsoncan") else _frames()
    peer = Peer(DEMO_SIM if mode in ("executor", "udsoncan") else FRAMES_SIM, config.bus)
    closers: list[Callable[[], Any]] = []
    try:
        one = _client(mode, config, ecu, closers)
        for _ in range(WARMUP):
            one()
        frames0, cpu0, peer0 = peer.frames(), time.process_time_ns(), peer.cpu_ns()
        latencies = []
        for _ in range(count):
            start = time.perf_counter()
            one()
            latencies.append((time.perf_counter() - start) * 1000)
        peer_cpu = peer.cpu_ns() - peer0
        client_cpu = time.process_time_ns() - cpu0 - peer_cpu
        return {"mode": mode, "n": count, "latency_ms": latencies, "client_cpu_ns": client_cpu,
                "peer_cpu_ns": peer_cpu, "frames": peer.frames() - frames0}
    finally:
        for close in reversed(closers):
            close()
        peer.sim.stop()


def _client(mode: str, config: AgentConfig, ecu: EcuConfig, closers: list[Callable[[], Any]]) -> Callable[[], None]:
    """One exchange of `mode`, checked (a wrong answer ends the run)."""
    if mode == "executor":
        link, close = _agent_link(config, ecu)
        closers.append(close)
        executor = Executor(ecu, link)
        params = parse_command({"id": "bench", "component": ecu.name, "command": "read_data",
                                "params": {"data": "vin"}}, config, time.time()).params

        def executor_one() -> None:
            outcome = executor.execute(params, time.monotonic() + 5)
            _expect(outcome.result == {"values": {"vin": VIN}}, repr(outcome))
        return executor_one
    if mode == "udsoncan":
        stack, close = _bare_stack(config, ecu)
        closers.append(close)
        client = Client(PythonIsoTpConnection(stack),
                        config={**udsoncan.configs.default_client_config,
                                "data_identifiers": {0xF190: udsoncan.AsciiCodec(17)}})
        client.open()
        closers.append(client.close)

        def udsoncan_one() -> None:
            value = client.read_data_by_identifier([0xF190]).service_data.values[0xF190]
            _expect(value == VIN, repr(value))
        return udsoncan_one
    request = bytes([0x22]) + BLOCK_DID.to_bytes(2, "big")
    if mode == "link":
        link, close = _agent_link(config, ecu)
        closers.append(close)

        def link_one() -> None:
            link.flush()
            link.send(request, 1.0)
            data = link.recv(2.0)
            _expect(data is not None and len(data) == 3 + BLOCK_LENGTH, f"{len(data or b'')} bytes")
        return link_one
    if mode == "isotp":
        stack, close = _bare_stack(config, ecu)
        closers.append(close)
        stack.start()
        closers.append(stack.stop)

        def isotp_one() -> None:
            stack.send(request)
            data = stack.recv(block=True, timeout=2.0)
            _expect(data is not None and len(data) == 3 + BLOCK_LENGTH, f"{len(data or b'')} bytes")
        return isotp_one
    raise ValueError(f"unknown mode {mode!r}")


def idle_stacks(count: int) -> None:
    """`count` started can-isotp stacks on one bus and notifier, idle until stdin closes."""
    bus = can.Bus(interface="virtual", channel=unique("bench-stacks-"), ignore_config=True)
    notifier = can.Notifier(bus, [])
    config = parse_config({"vehicle": "STACKS", "bus": {"interface": "virtual", "channel": "x"},
                           "ecus": fleet_ecus(count)})
    stacks = [isotp.NotifierBasedCanStack(bus, notifier, address=isotp_address(e.addressing),
                                          params=isotp_params(e.isotp)) for e in config.ecus]
    for stack in stacks:
        stack.start()
    print("ready", flush=True)
    sys.stdin.read()
    for stack in stacks:
        stack.stop()
    notifier.stop()
    bus.shutdown()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit() or int(argv[1]) < 1:
        print(__doc__, file=sys.stderr)
        return 2
    mode, count = argv[0], int(argv[1])
    if mode == "stacks":
        idle_stacks(count)
        return 0
    if mode not in ("executor", "udsoncan", "link", "isotp"):
        print(f"unknown mode {mode!r}\n{__doc__}", file=sys.stderr)
        return 2
    print(json.dumps(run(mode, count)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
