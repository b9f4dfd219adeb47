"""What moves in a simulated ECU: DID values following a waveform, DTC statuses following a schedule. Pure.

A `wave:` on a simulated DID makes its value a function of the time since the simulator started:

    - {id: 0xF40C, wave: {shape: sine, min: 750, max: 3200, period_s: 20, codec: unsigned, length: 2, scale: 0.25}}
    - {id: 0xF405, wave: {shape: steps, values: [80, 85, 90], step_s: 2, length: 1, offset: -40}}

`shape` is `sine` (starts at min), `triangle` (min -> max -> min), `ramp` (min -> max, then back to
min) or `steps` (each of `values` for `step_s`, then again from the first, or held at the last with
`repeat: false`). The value is encoded like the agent's DID config describes one: `codec`
(`unsigned`, the default, or `signed`), `length` in bytes, `scale`, `offset`.

A `schedule:` on a simulated DTC changes its status at given times (seconds since the start):

    - {code: P0171, schedule: [{at_s: 2, status: 0x09}, {at_s: 6, status: 0x08}, {at_s: 10, status: 0}]}

Status 0 means the ECU no longer stores the DTC. The DTC's `status` is its status before the first
step (default 0: not there yet). With `every_s` the schedule starts over every `every_s` seconds.
A step takes effect once, when its time comes: a ClearDiagnosticInformation in between stays in
force until the next step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.config.model import DidSpec
from agent.config.reader import InvalidValueError, Node, boolean, choice, integer, join, number
from agent.wire.codecs import encode

SHAPES = ("sine", "triangle", "ramp", "steps")
MAX_STEPS = 1000


@dataclass(frozen=True)
class Wave:
    """A DID value over time: `at(t)` gives its bytes `t` seconds after the start."""

    shape: str
    spec: DidSpec  # how a value becomes bytes
    low: float = 0.0
    high: float = 0.0
    period_s: float = 10.0
    values: tuple[float, ...] = ()
    step_s: float = 1.0
    repeat: bool = True

    def value_at(self, t: float) -> float:
        t = max(0.0, t)
        if self.shape == "steps":
            index = int(t // self.step_s)
            index = index % len(self.values) if self.repeat else min(index, len(self.values) - 1)
            return self.values[index]
        phase = (t % self.period_s) / self.period_s
        if self.shape == "sine":
            share = (1 - math.cos(2 * math.pi * phase)) / 2
        elif self.shape == "triangle":
            share = 2 * phase if phase < 0.5 else 2 - 2 * phase
        else:  # ramp
            share = phase
        return self.low + (self.high - self.low) * share

    def at(self, t: float) -> bytes:
        """The encoded value (every value a wave can take was checked to encode when it was parsed)."""
        return encode(self.spec, self.value_at(t))


@dataclass(frozen=True)
class StatusStep:
    at_s: float
    status: int  # 0: the ECU no longer stores the DTC


@dataclass(frozen=True)
class Schedule:
    """A DTC's status steps, sorted by time; repeated every `every_s` seconds when given."""

    steps: tuple[StatusStep, ...]
    every_s: float | None = None

    def current(self, t: float) -> tuple[int, int] | None:
        """(the number of the step in force at `t`, counting repetitions, its status); None before the first."""
        cycle = 0
        if self.every_s:
            cycle, t = divmod(max(0.0, t), self.every_s)
        due = [i for i, step in enumerate(self.steps) if step.at_s <= t]
        if due:
            index = due[-1]
        elif cycle:  # before this cycle's first step: the previous cycle's last one is in force
            cycle, index = cycle - 1, len(self.steps) - 1
        else:
            return None
        return int(cycle) * len(self.steps) + index, self.steps[index].status


def parse_wave(node: Node, did: int) -> Wave | None:
    """The `wave:` of a simulated DID; problems are recorded with their paths."""
    shape = node.get("shape", choice(*SHAPES))
    codec = node.get("codec", choice("unsigned", "signed"), "unsigned")
    spec = DidSpec(name=f"0x{did:04X}", id=did, codec=codec or "unsigned",
                   length=node.get("length", integer(1, 8, "a length of 1..8 bytes")),
                   scale=node.get("scale", _nonzero, 1.0), offset=node.get("offset", number(), 0.0))
    steps = shape == "steps"
    low = node.get("min", number()) if not steps else 0.0
    high = node.get("max", number()) if not steps else 0.0
    period = node.get("period_s", number(0.01, 86400 * 365), 10.0) if not steps else 10.0
    values: list[float] = []
    if steps:
        values = [v for p, item in node.items_of("values") if (v := node.check(p, item, number())) is not None]
        if not node.has("values") or not values:
            node.problems.add(join(node.path, "values"), "steps need a list of values")
        elif len(values) > MAX_STEPS:
            node.problems.add(join(node.path, "values"), f"at most {MAX_STEPS} values")
    step_s = node.get("step_s", number(0.01, 86400 * 365), 1.0) if steps else 1.0
    repeat = node.get("repeat", boolean, True) if steps else True
    node.finish()
    if shape is None or spec.length is None or low is None or high is None or (steps and not values):
        return None
    for value in (values if steps else [low, high]):
        try:
            encode(spec, value)
        except ValueError as err:
            node.problems.add(node.path, f"{value:g} cannot be encoded in {spec.length} {codec} byte(s): {err}")
            return None
    return Wave(shape, spec, low, high, period, tuple(values), step_s, repeat)


def parse_schedule(node: Node) -> Schedule | None:
    """A DTC's `schedule:` (a list of {at_s, status}) and `every_s`, taken from the DTC's node."""
    steps = []
    for path, item in node.items_of("schedule"):
        step = Node(item, path, node.problems)
        at_s = step.get("at_s", number(0, 86400 * 365))
        status = step.get("status", integer(0, 0xFF, "a status byte"))
        step.finish()
        if at_s is not None and status is not None:
            steps.append(StatusStep(at_s, status))
    every = node.get("every_s", number(0.01, 86400 * 365), None)
    if not steps:
        if every is not None:
            node.problems.add(join(node.path, "every_s"), "every_s repeats a schedule: give one")
        return None
    steps.sort(key=lambda s: s.at_s)
    if len({s.at_s for s in steps}) != len(steps):
        node.problems.add(join(node.path, "schedule"), "two steps at the same time")
    if every is not None and steps[-1].at_s >= every:
        node.problems.add(join(node.path, "every_s"), f"must be after the last step ({steps[-1].at_s:g} s)")
    return Schedule(tuple(steps), every)


def _nonzero(value: object) -> float:
    scale = number()(value)
    if scale == 0:
        raise InvalidValueError("a scale of 0 encodes nothing")
    return scale
