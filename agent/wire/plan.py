"""Validates a collection Plan (protocol revision 1.1) against the config: pure, every problem with its path.

A signal names DIDs (`data`) or OBD-II service 0x01 PIDs (`pids`) of one component. A PID's samples
are named `obd.<pid name>` (e.g. `obd.coolant_temperature`), so they never clash with DID names, which
are plain lowercase words.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config.model import AgentConfig, DidSpec, EcuConfig
from agent.config.reader import InvalidValueError, Node, Problems, boolean, describe, integer, join, text
from agent.errors import AgentError
from agent.wire import obd
from agent.wire.parse import did_spec

PLAN_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
NAME = text(PLAN_NAME.pattern, "a plan name of 1-64 of A-Z a-z 0-9 . _ -", max_len=64)
MIN_EVERY_MS = 100  # the fastest a plan may poll one signal
MAX_EVERY_MS = 86_400_000  # a day
MAX_ITEMS = 512  # DIDs and PIDs in one plan, all signals together
MAX_FAULT_WATCHES = 64
MAX_VERSION = 2**53 - 1  # exact in every JSON reader
IDENTIFICATION_DIDS = range(0xF180, 0xF1A0)  # ISO 14229-1 identification DIDs (VIN 0xF190, part numbers...)
NUMERIC_CODECS = ("unsigned", "signed")
OBD_PREFIX = "obd."


class InvalidPlanError(AgentError, ValueError):
    """The plan cannot be applied as written; name and version are set when they could be read."""

    def __init__(self, problems: list[tuple[str, str]], name: str | None, version: int | None) -> None:
        self.problems = problems
        self.name = name
        self.version = version
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in problems))

    @property
    def errors(self) -> list[dict[str, str]]:
        """The `errors` of a plan_rejected Event."""
        return [{"path": p, "message": m} for p, m in self.problems]


@dataclass(frozen=True)
class Item:
    """One value a signal reads: a DID, or an OBD-II PID (then `did` is None)."""

    name: str  # the sample's `data`: the DID's name, or obd.<pid name>
    did: DidSpec | None = None
    pid: int | None = None
    unit: str | None = None

    @property
    def numeric(self) -> bool:
        if self.did is not None:
            return self.did.codec in NUMERIC_CODECS and self.did.id not in IDENTIFICATION_DIDS
        spec = obd.PIDS.get(self.pid if self.pid is not None else -1)
        return spec is not None and spec.kind == "linear"


@dataclass(frozen=True)
class Signal:
    component: str
    items: tuple[Item, ...]
    every_ms: int
    on_change: bool = False
    deadband: float = 0.0
    export: bool = False

    @property
    def obd(self) -> bool:
        return any(i.pid is not None for i in self.items)


@dataclass(frozen=True)
class FaultWatch:
    component: str
    every_ms: int
    status_mask: int = 0xFF
    snapshots: bool = False


@dataclass(frozen=True)
class Batch:
    max_age_ms: int = 10_000
    max_samples: int = 500


@dataclass(frozen=True)
class Plan:
    name: str
    version: int
    signals: tuple[Signal, ...] = ()
    faults: tuple[FaultWatch, ...] = ()
    batch: Batch = field(default_factory=Batch)
    requests_per_s: float = 20.0
    body: dict[str, Any] = field(default_factory=dict, compare=False)  # as received, for the store

    @property
    def components(self) -> set[str]:
        return {s.component for s in self.signals} | {f.component for f in self.faults}


def parse_plan(obj: Any, config: AgentConfig, name: str | None = None) -> Plan:
    """A Plan from a decoded JSON/YAML object; raises InvalidPlanError listing every problem.

    `name` is the plan's name from its topic: the body must carry the same one.
    """
    problems = Problems()
    node = Node(obj, "", problems)
    plan_name = node.get("name", NAME)
    version = node.get("version", integer(0, MAX_VERSION, "a version (an integer from 0)"))
    if name is not None and plan_name is not None and plan_name != name:
        problems.add("name", f"{plan_name!r} differs from the plan's topic name {name!r}")
    seen: dict[tuple[str, str], str] = {}
    signals = [s for path, raw in node.items_of("signals") if (s := _signal(Node(raw, path, problems), config, seen))]
    faults = [f for path, raw in node.items_of("faults") if (f := _faults(Node(raw, path, problems), config))]
    watched = [f.component for f in faults]
    for component in {c for c in watched if watched.count(c) > 1}:
        problems.add("faults", f"{component} is watched twice: one fault reading per component")
    if len(faults) > MAX_FAULT_WATCHES:
        problems.add("faults", f"at most {MAX_FAULT_WATCHES} entries")
    if sum(len(s.items) for s in signals) > MAX_ITEMS:
        problems.add("signals", f"at most {MAX_ITEMS} DIDs and PIDs in one plan")
    if not signals and not faults and node.ok and not problems:
        problems.add("signals", "a plan reads at least one signal or fault list")
    batch = _batch(node.child("batch"))
    budget = node.child("budget")
    rate = budget.get("requests_per_s", _rate, 20.0) if budget else 20.0
    if budget:
        budget.finish()
    node.finish()
    if problems:
        raise InvalidPlanError(problems.items, plan_name if isinstance(plan_name, str) else name,
                               version if isinstance(version, int) else None)
    body = dict(obj) if isinstance(obj, dict) else {}
    return Plan(plan_name, version, tuple(signals), tuple(faults), batch, rate, body)


def plan_identity(obj: Any) -> tuple[str | None, int | None]:
    """Name and version of a plan body as far as they can be read (for a rejection's Event)."""
    if not isinstance(obj, dict):
        return None, None
    name, version = obj.get("name"), obj.get("version")
    return (name if isinstance(name, str) and PLAN_NAME.fullmatch(name) else None,
            version if isinstance(version, int) and not isinstance(version, bool) else None)


def _component(config: AgentConfig) -> Callable[[Any], EcuConfig]:
    def convert(value: Any) -> EcuConfig:
        ecu = config.ecu(value) if isinstance(value, str) else None
        if ecu is None:
            known = ", ".join(e.name for e in config.ecus) or "none"
            raise InvalidValueError(f"no component named {value!r} in this vehicle's config (known: {known})"
                                    if isinstance(value, str) else f"expected a component name, got {describe(value)}")
        return ecu

    return convert


def _every(value: Any) -> int:
    return integer(MIN_EVERY_MS, MAX_EVERY_MS, f"an interval of {MIN_EVERY_MS}..{MAX_EVERY_MS} ms")(value)


def _rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 < value <= 1000:
        raise InvalidValueError(f"expected a rate of requests per second above 0 and at most 1000, got "
                                f"{describe(value)}")
    return float(value)


def _deadband(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise InvalidValueError(f"expected a finite number from 0, got {describe(value)}")
    return float(value)


def _signal(node: Node, config: AgentConfig, seen: dict[tuple[str, str], str]) -> Signal | None:
    ecu = node.get("component", _component(config))
    every = node.get("every_ms", _every)
    on_change = node.get("on_change", boolean, False)
    deadband = node.get("deadband", _deadband, 0.0)
    export = node.get("export", boolean, False)
    if node.has("data") == node.has("pids") and node.ok:
        node.problems.add(node.path, "name either data (DIDs) or pids (OBD-II PIDs), not both or neither")
    items: list[Item] = []
    if ecu is not None and node.has("data"):
        items = _listed(node, "data", _did(ecu))
        _allowed(node, ecu, "read_data", "data")
    elif ecu is not None and node.has("pids"):
        items = _listed(node, "pids", _pid)
        _allowed(node, ecu, "obd", "pids")
    node.raw("data"), node.raw("pids")  # both taken: "not both" was said above, not "unknown key" as well
    if deadband and not on_change:
        node.problems.add(join(node.path, "deadband"), "only used with on_change: true")
    key = "data" if node.has("data") else "pids"
    for i, item in enumerate(items):
        path = join(join(node.path, key), i)
        if ecu is not None and (ecu.name, item.name) in seen:
            node.problems.add(path, f"{item.name} of {ecu.name} is already read by {seen[(ecu.name, item.name)]}")
        elif ecu is not None:
            seen[(ecu.name, item.name)] = path
        if export and not item.numeric:
            node.problems.add(path, f"{item.name} is not a numeric measurement, so it cannot be exported "
                                    f"(identifiers such as the VIN never are)")
    node.finish()
    if ecu is None or every is None or not items:
        return None
    return Signal(ecu.name, tuple(items), every, on_change, deadband, export)


def _allowed(node: Node, ecu: EcuConfig, command: str, key: str) -> None:
    if command not in ecu.allow:
        node.problems.add(join(node.path, key), f"{command} is not enabled for {ecu.name} (config: allow)")


def _listed(node: Node, key: str, convert: Callable[[Any], Item]) -> list[Item]:
    raw = node.raw(key)
    if not isinstance(raw, list) or not raw:
        node.problems.add(join(node.path, key), f"expected a non-empty list, got {describe(raw)}")
        return []
    items = [node.check(join(join(node.path, key), i), value, convert) for i, value in enumerate(raw)]
    return [i for i in items if i is not None]


def _did(ecu: EcuConfig) -> Callable[[Any], Item]:
    named = did_spec(ecu)

    def convert(value: Any) -> Item:
        spec = named(value)
        return Item(spec.name, did=spec, unit=spec.unit)

    return convert


def _pid(value: Any) -> Item:
    number = obd.parse_pid(value)
    if number in obd.BITMAP_PIDS:
        raise InvalidValueError(f"{value} is a supported-PID bitmap, not a measurement")
    if number not in obd.PIDS:
        raise InvalidValueError(f"{value}: this agent cannot decode PID 0x{number:02X}, so it cannot collect it")
    return Item(OBD_PREFIX + obd.pid_name(number), pid=number, unit=obd.PIDS[number].unit)


def _faults(node: Node, config: AgentConfig) -> FaultWatch | None:
    ecu = node.get("component", _component(config))
    every = node.get("every_ms", _every)
    mask = node.get("status_mask", integer(1, 0xFF, "a status mask byte (0x01..0xFF)"), 0xFF)
    snapshots = node.get("snapshots", boolean, False)
    if ecu is not None:
        _allowed(node, ecu, "read_faults", "component")
    node.finish()
    if ecu is None or every is None:
        return None
    return FaultWatch(ecu.name, every, mask, snapshots)


def _batch(node: Node | None) -> Batch:
    if node is None:
        return Batch()
    batch = Batch(node.get("max_age_ms", integer(100, 3_600_000, "an age of 100..3600000 ms"), 10_000),
                  node.get("max_samples", integer(1, 10_000, "a count of 1..10000 samples"), 500))
    node.finish()
    return batch


def local_plan_problems(config: AgentConfig) -> list[tuple[str, str]]:
    """Every problem of the config's `collect.plans`, each path under collect.plans[i] (for check-config)."""
    found: list[tuple[str, str]] = []
    names: dict[str, int] = {}
    for index, body in enumerate(config.collect.plans):
        where = f"collect.plans[{index}]"
        try:
            plan = parse_plan(body, config)
        except InvalidPlanError as err:
            found += [(f"{where}.{path}" if path and not path.startswith("(") else where, message)
                      for path, message in err.problems]
            continue
        if plan.name in names:
            found.append((f"{where}.name", f"plan {plan.name!r} is also collect.plans[{names[plan.name]}]"))
        names.setdefault(plan.name, index)
    return found
