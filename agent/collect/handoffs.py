"""What other threads hand the collector thread on its one queue: a frozen type per kind, no tuples.

The collector's state is touched by its own thread only; the MQTT loop (plans), the workers (readings
done), the bus notifier (a vehicle frame) and the service (start, stop, tests waiting) reach it through
these. Each names its fields, where a tuple's `event[3]` said nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent.collect.schedule import Task
from agent.wire.command import Outcome


@dataclass(frozen=True)
class Load:
    """Apply the stored plans, then the config's (at start)."""


@dataclass(frozen=True)
class Stop:
    """Flush what was collected so far and end the thread."""


@dataclass(frozen=True)
class Wake:
    """A frame of the vehicle's own traffic: a pause for bus silence ends."""


@dataclass(frozen=True)
class PlanMessage:
    """A message on `plans/{name}` (empty: remove the plan), acknowledged (`ack`) once decided."""

    name: str
    payload: bytes
    ack: Callable[[], None]


@dataclass(frozen=True)
class Reading:
    """A scheduled reading ended on its worker: for plan version `version`, at wall time `at`."""

    task: Task
    version: int
    outcome: Outcome
    at: float


@dataclass(frozen=True)
class Recheck:
    """The sleep condition's DID was read again while collection was paused by it."""

    outcome: Outcome


@dataclass(frozen=True)
class Mark:
    """Set `done` once everything handed over before it was handled (tests, the demo)."""

    done: threading.Event


Handoff = Load | Stop | Wake | PlanMessage | Reading | Recheck | Mark
