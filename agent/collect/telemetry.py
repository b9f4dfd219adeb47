"""Readings into telemetry batches and last-known state: on-change filtering, batch ages and sizes. Pure.

Times are passed in: `now` is monotonic seconds (batch ages), `at` is wall-clock epoch seconds (what
the messages show).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.wire import messages as m
from agent.wire.plan import Item, Plan, Signal
from agent.wire.timefmt import format_rfc3339

StateValues = dict[str, tuple[Any, float]]


def changed(previous: Any, value: Any, deadband: float) -> bool:
    """Whether `value` is news after `previous` (numbers: beyond the deadband; anything else: not equal)."""
    numeric = (isinstance(value, int | float) and not isinstance(value, bool)
               and isinstance(previous, int | float) and not isinstance(previous, bool))
    if numeric:
        return abs(value - previous) > deadband if deadband > 0 else value != previous
    return value != previous


@dataclass
class _Open:
    """The batch a plan is filling."""

    version: int
    max_age_s: float
    max_samples: int
    seq: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0  # encoded bytes of the samples so far
    opened: float | None = None  # monotonic time of its first sample


class Telemetry:
    """Holds each plan's open batch, the last published value of each on-change signal, and the state."""

    def __init__(self, max_bytes: int = 256 * 1024) -> None:
        self.max_bytes = max_bytes  # a batch is sent once its samples reach this size (the broker's limit)
        self._open: dict[str, _Open] = {}
        self._last: dict[tuple[str, str, str], Any] = {}
        self._values: dict[str, StateValues] = {}
        self._faults: dict[str, list[dict[str, Any]]] = {}
        self._read_at: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._stamp: tuple[float, str] = (-1.0, "")  # the last `at` formatted: the values of one request share it
        self.suppressed = 0  # on-change readings that were not news

    # ---- plans ---------------------------------------------------------------------------------
    def set_plan(self, plan: Plan, seq: int) -> dict[str, Any] | None:
        """Starts (or restarts) a plan's batches after batch `seq`; returns the old version's last batch."""
        last = self.close(plan.name)
        self._open[plan.name] = _Open(plan.version, plan.batch.max_age_ms / 1000, plan.batch.max_samples, seq)
        for key in [k for k in self._last if k[0] == plan.name]:
            del self._last[key]  # a new version starts with fresh on-change baselines
        return last

    def close(self, name: str) -> dict[str, Any] | None:
        """Ends a plan's batches; returns its open batch if it holds samples."""
        batch = self.take(name)
        self._open.pop(name, None)
        for key in [k for k in self._last if k[0] == name]:
            del self._last[key]
        return batch

    def seq(self, name: str) -> int:
        return self._open[name].seq if name in self._open else 0

    # ---- readings ------------------------------------------------------------------------------
    def reading(self, plan: str, signal: Signal, item: Item, value: Any, at: float, now: float) -> bool:
        """One value read; True when it became a sample (on_change may leave it out)."""
        values = self._values.setdefault(signal.component, {})
        values[item.name] = (value, at)
        self._read_at[signal.component] = at
        self._dirty.add(signal.component)
        batch = self._open.get(plan)
        if batch is None:
            return False
        key = (plan, signal.component, item.name)
        if signal.on_change and key in self._last and not changed(self._last[key], value, signal.deadband):
            self.suppressed += 1
            return False
        self._last[key] = value
        if batch.opened is None:
            batch.opened = now
        if self._stamp[0] != at:
            self._stamp = (at, format_rfc3339(at))
        entry = m.sample(signal.component, item.name, value, self._stamp[1])
        batch.samples.append(entry)
        batch.size += _size(entry)
        return True

    def faults(self, component: str, faults: list[dict[str, Any]], at: float) -> None:
        """A fault reading: it becomes part of the component's state."""
        self._faults[component] = faults
        self._read_at[component] = at
        self._dirty.add(component)

    # ---- batches and state ---------------------------------------------------------------------
    def next_due(self) -> float | None:
        """Monotonic time at which the oldest open batch reaches its max age."""
        ages = [b.opened + b.max_age_s for b in self._open.values() if b.opened is not None]
        return min(ages) if ages else None

    def due(self, now: float) -> list[dict[str, Any]]:
        """The batches to send now: full (max_samples) or old enough (max_age_ms)."""
        ready = [name for name, b in self._open.items()
                 if b.samples and (len(b.samples) >= b.max_samples or b.size >= self.max_bytes
                                   or (b.opened is not None and now >= b.opened + b.max_age_s))]
        return [batch for name in ready if (batch := self.take(name)) is not None]

    def take(self, name: str) -> dict[str, Any] | None:
        """A plan's open batch as a message (emptied, seq advanced); None if it holds no samples."""
        batch = self._open.get(name)
        if batch is None or not batch.samples:
            return None
        batch.seq += 1
        message = m.telemetry_message(name, batch.version, batch.seq, batch.samples)
        batch.samples, batch.opened, batch.size = [], None, 0
        return message

    def states(self) -> list[tuple[str, dict[str, Any]]]:
        """The state of every component read since the last call (at most one per component)."""
        out = [(c, m.state_message(c, self._read_at[c], dict(self._values.get(c, {})), self._faults.get(c)))
               for c in sorted(self._dirty)]
        self._dirty.clear()
        return out

    def forget_values(self, keep: set[tuple[str, str]]) -> None:
        """Drops state values no plan reads any more ((component, data) pairs to keep)."""
        for component, values in self._values.items():
            for name in [n for n in values if (component, n) not in keep]:
                del values[name]
                self._dirty.add(component)
                self._read_at.setdefault(component, 0.0)


def _size(sample: dict[str, Any]) -> int:
    """The encoded size of a sample, closely enough to close a batch below the payload limit (which keeps a
    margin): JSON encoding every sample would cost more than the rest of a reading."""
    value = sample["value"]
    shown = len(value) * 2 + 2 if isinstance(value, str) else len(m.encode(value)) if isinstance(value, dict | list) \
        else len(str(value))
    return 48 + len(sample["component"]) + len(sample["data"]) + len(sample["at"]) + shown
