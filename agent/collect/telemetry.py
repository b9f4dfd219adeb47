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
SEQ_ROOM = 10**15  # a batch's size is counted with a seq this long: the seq never makes it outgrow the limit


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
    base: int  # encoded bytes of the batch message without samples (with room for any seq)
    samples: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0  # encoded bytes of the batch message as it stands
    opened: float | None = None  # monotonic time of its first sample


class Telemetry:
    """Holds each plan's open batch, the last published value of each on-change signal, and the state."""

    def __init__(self, max_bytes: int = 256 * 1024) -> None:
        self.max_bytes = max_bytes  # no batch message is larger (the payload limit); see `set_limit`
        self.too_large = 0  # samples left out: alone they make a batch larger than max_bytes
        self._full: list[dict[str, Any]] = []  # batches cut because the next sample would not fit
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
        """Starts (or restarts) a plan's batches after batch `seq`; returns the old version's last batch.

        That last batch takes the next number, so the new version carries on after it (never `seq` again:
        the backend deduplicates by plan and seq, and would drop the new version's first batch)."""
        last = self.close(plan.name)
        if last is not None:
            seq = max(seq, last["seq"])
        base = len(m.encode(m.telemetry_message(plan.name, plan.version, SEQ_ROOM, [])))
        self._open[plan.name] = _Open(plan.version, plan.batch.max_age_ms / 1000, plan.batch.max_samples, seq, base,
                                      size=base)
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
        """One value read; True when it became a sample (on_change may leave it out, and a sample too large
        for any batch is left out and counted in `too_large`). A batch the sample would take past `max_bytes`
        is cut first: `cut()` hands it over."""
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
        if self._stamp[0] != at:
            self._stamp = (at, format_rfc3339(at))
        entry = m.sample(signal.component, item.name, value, self._stamp[1])
        size = len(m.encode(entry))
        if batch.base + size > self.max_bytes:
            self.too_large += 1
            return False
        self._last[key] = value
        self._add(plan, batch, entry, size, now)
        return True

    def _add(self, name: str, batch: _Open, entry: dict[str, Any], size: int, now: float) -> None:
        """Appends a sample that fits in an empty batch, cutting the batch first if it would not fit now."""
        if batch.samples and batch.size + 1 + size > self.max_bytes and (full := self.take(name)) is not None:
            self._full.append(full)
        if batch.opened is None:
            batch.opened = now
        batch.size += size + (1 if batch.samples else 0)
        batch.samples.append(entry)

    def set_limit(self, max_bytes: int, now: float) -> list[dict[str, Any]]:
        """A new payload limit (the broker announced another maximum packet size): open batches that no
        longer fit are cut again; the samples that alone no longer fit are left out, counted and returned."""
        shrunk = max_bytes < self.max_bytes
        self.max_bytes = max_bytes
        dropped: list[dict[str, Any]] = []
        if not shrunk:
            return dropped
        for name, batch in self._open.items():
            if batch.size <= max_bytes:
                continue
            samples, opened = batch.samples, batch.opened
            batch.samples, batch.opened, batch.size = [], None, batch.base
            for entry in samples:
                size = len(m.encode(entry))
                if batch.base + size > max_bytes:
                    self.too_large += 1
                    dropped.append(entry)
                    continue
                self._add(name, batch, entry, size, now)
            if batch.samples and opened is not None:
                batch.opened = opened  # the batch's age is that of its oldest sample
        return dropped

    def flush(self) -> list[dict[str, Any]]:
        """Every batch holding samples, cut ones first (collection pauses or stops)."""
        return [*self.cut(), *(batch for name in list(self._open) if (batch := self.take(name)) is not None)]

    def cut(self) -> list[dict[str, Any]]:
        """The batches cut since the last call (in seq order): to be sent before anything else of their plan."""
        out, self._full = self._full, []
        return out

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
        """The batches to send now: cut by size, full (max_samples) or old enough (max_age_ms)."""
        ready = [name for name, b in self._open.items()
                 if b.samples and (len(b.samples) >= b.max_samples
                                   or (b.opened is not None and now >= b.opened + b.max_age_s))]
        return [*self.cut(), *(batch for name in ready if (batch := self.take(name)) is not None)]

    def take(self, name: str) -> dict[str, Any] | None:
        """A plan's open batch as a message (emptied, seq advanced); None if it holds no samples."""
        batch = self._open.get(name)
        if batch is None or not batch.samples:
            return None
        batch.seq += 1
        message = m.telemetry_message(name, batch.version, batch.seq, batch.samples)
        batch.samples, batch.opened, batch.size = [], None, batch.base
        return message

    def states(self) -> list[tuple[str, dict[str, Any]]]:
        """The state of every component read since the last call (at most one per component)."""
        out = [(c, m.state_message(c, self._read_at[c], dict(self._values.get(c, {})), self._faults.get(c)))
               for c in sorted(self._dirty)]
        self._dirty.clear()
        return out

    def forget_faults(self, watched: set[str]) -> None:
        """Drops the fault lists of components no plan watches any more: a state shows only watched faults."""
        for component in [c for c in self._faults if c not in watched]:
            del self._faults[component]
            self._dirty.add(component)
            self._read_at.setdefault(component, 0.0)

    def forget_values(self, keep: set[tuple[str, str]]) -> None:
        """Drops state values no plan reads any more ((component, data) pairs to keep)."""
        for component, values in self._values.items():
            for name in [n for n in values if (component, n) not in keep]:
                del values[name]
                self._dirty.add(component)
                self._read_at.setdefault(component, 0.0)

