"""A scripted stand-in for an ISO-TP link, so executor tests can check exact request and response bytes."""

from __future__ import annotations

import time

from agent.config.model import AgentConfig
from agent.wire.command import Outcome
from agent.wire.parse import parse_command


class ScriptedLink:
    """Records every request and replays canned response PDUs (hex), one per `recv`.

    `None` in the script stands for a `recv` that times out; an exhausted script times out every
    `recv`, sleeping its timeout as a real link would.
    """

    def __init__(self, *responses: str | None) -> None:
        self.responses = list(responses)
        self.sent: list[bytes] = []
        self.flushes = 0

    def send(self, payload: bytes, timeout: float) -> None:
        self.sent.append(bytes(payload))

    def recv(self, timeout: float, limit: float | None = None) -> bytes | None:
        if not self.responses or self.responses[0] is None:
            if self.responses:
                self.responses.pop(0)
            time.sleep(timeout)  # what a link does when nothing arrives: it waits out the timeout
            return None
        return bytes.fromhex(self.responses.pop(0))

    def flush(self) -> None:
        self.flushes += 1


def run(vehicle: AgentConfig, command: str, params: dict, *responses: str | None, component: str = "engine",
        executor: object = None) -> tuple[list[str], Outcome]:
    """Runs one command through an Executor over a ScriptedLink; returns (requests sent as hex, outcome)."""
    from agent.uds.executor import Executor

    parsed = parse_command({"id": "x", "component": component, "command": command, "params": params}, vehicle, 0)
    link = ScriptedLink(*responses)
    if executor is None:
        executor = Executor(vehicle.ecu(component), link)
    else:
        executor.link = link
    outcome = executor.execute(parsed.params, time.monotonic() + 2)
    return [s.hex() for s in link.sent], outcome
