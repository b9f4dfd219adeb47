"""Runs commands in-process and waits for their results: the engine behind `uds` and `demo`."""

from __future__ import annotations

import threading
import time
import uuid
from types import TracebackType
from typing import Any

from agent.config.model import AgentConfig
from agent.core.runtime import Runtime
from agent.policy.admission import Admission
from agent.wire.command import Command, Result
from agent.wire.parse import parse_command


def validate(config: AgentConfig, component: str, command: str, params: dict[str, Any] | None = None,
             received_at: float | None = None, **fields: Any) -> Command:
    """The command as the agent would run it, with a new local id; raises InvalidCommandError or
    UnknownComponentError. No I/O: `uds` calls it before it opens the bus."""
    body: dict[str, Any] = {"id": f"local-{uuid.uuid4().hex[:12]}", "component": component, "command": command}
    if params:
        body["params"] = params
    body.update({k: v for k, v in fields.items() if v is not None})
    return parse_command(body, config, time.time() if received_at is None else received_at)


class BusUnavailableError(RuntimeError):
    """The CAN bus did not come up."""


class LocalSession:
    """Starts the runtime (and any configured simulators), runs commands one by one, stops it."""

    def __init__(self, config: AgentConfig, **runtime_kwargs: Any) -> None:
        self._results: dict[str, Result] = {}
        self._done = threading.Condition()
        self.runtime = Runtime(config, self._sink, **runtime_kwargs)
        self.config = config

    def _sink(self, result: Result) -> None:
        with self._done:
            self._results[result.command_id] = result
            self._done.notify_all()

    def __enter__(self) -> LocalSession:
        if not self.runtime.start(wait=3.0):
            self.runtime.stop(0.5)
            bus = self.config.bus
            raise BusUnavailableError(self.runtime.owner.last_error
                                      or f"{bus.interface}:{bus.channel} did not come up within 3 s")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.runtime.stop()

    def submit(self, component: str, command: str, params: dict[str, Any] | None = None,
               **fields: Any) -> tuple[str, Admission]:
        """Validates (raising InvalidCommandError/UnknownComponentError) and queues; returns (id, admission).

        A command that was not queued gets its refusal as its result at once.
        """
        now = time.time()
        parsed = validate(self.config, component, command, params, now, **fields)
        admission = self.runtime.submit(parsed)
        if admission is not Admission.QUEUED:
            self._sink(Result(parsed.id, component, command, admission.refusal(component, command),
                              now, None, time.time()))
        return parsed.id, admission

    def wait(self, command_id: str, timeout: float | None = None) -> Result:
        """The final Result of a submitted command; TimeoutError if none arrives in time."""
        wait_s = timeout if timeout is not None else self.config.max_command_timeout_ms / 1000 + 5
        with self._done:
            if not self._done.wait_for(lambda: command_id in self._results, wait_s):
                raise TimeoutError(f"no result for {command_id} within {wait_s:.0f} s")
            return self._results.pop(command_id)

    def run(self, component: str, command: str, params: dict[str, Any] | None = None,
            timeout_ms: int | None = None) -> Result:
        """Submits one command and waits for its result."""
        command_id, _ = self.submit(component, command, params, timeout_ms=timeout_ms)
        return self.wait(command_id)
