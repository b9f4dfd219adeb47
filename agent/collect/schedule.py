"""When each reading is due: one heap of due times for every plan, request budgets, backoff. Pure.

A plan becomes tasks: one task per request it needs. The DIDs of known length that one component reads
at one interval (across the plan's signals) are grouped into ReadDataByIdentifier requests of at most
`max_dids` each (a DID of unknown length goes alone: only the ECU knows where it ends); OBD-II PIDs into
service 0x01 requests of at most six; a fault watch is one ReadDTCInformation request (when it asks
for snapshots, the collector follows it with one job per DTC found: see `snapshot_task`).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from agent.wire import command as c
from agent.wire import obd
from agent.wire.plan import FaultWatch, Item, Plan, Signal

TaskKey = tuple[str, str, str, int]  # plan, component, "data" | "faults" | "snapshot", index


@dataclass(frozen=True)
class Task:
    key: TaskKey
    every_s: float
    params: c.Params
    items: tuple[tuple[Signal, Item], ...] = ()  # each value read, with the signal that asked for it
    watch: FaultWatch | None = None

    @property
    def plan(self) -> str:
        return self.key[0]

    @property
    def component(self) -> str:
        return self.key[1]


def _chunks(items: list[tuple[Signal, Item]], size: int) -> Iterator[list[tuple[Signal, Item]]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def plan_tasks(plan: Plan, max_dids: int) -> list[Task]:
    """Every request of a plan, each a Task: the values one component reads at one interval share requests."""
    tasks: list[Task] = []
    index = itertools.count()
    groups: dict[tuple[str, int], list[tuple[Signal, Item]]] = {}
    for signal in plan.signals:
        groups.setdefault((signal.component, signal.every_ms), []).extend((signal, i) for i in signal.items)
    for (component, every_ms), pairs in groups.items():
        every = every_ms / 1000
        fixed = [(s, i) for s, i in pairs if i.did is not None and i.did.length is not None]
        alone = [[(s, i)] for s, i in pairs if i.did is not None and i.did.length is None]
        for group in [*_chunks(fixed, max_dids), *alone]:
            params: c.Params = c.ReadData(tuple(i.did for _, i in group if i.did is not None))
            tasks.append(Task((plan.name, component, "data", next(index)), every, params, tuple(group)))
        pids = [(s, i) for s, i in pairs if i.pid is not None]
        for group in _chunks(pids, obd.MAX_PIDS_PER_REQUEST):
            params = c.Obd(pids=tuple(i.pid for _, i in group if i.pid is not None))
            tasks.append(Task((plan.name, component, "data", next(index)), every, params, tuple(group)))
    for watch in plan.faults:
        params = c.ReadFaults(status_mask=watch.status_mask)  # snapshots: one job per DTC afterwards
        tasks.append(Task((plan.name, watch.component, "faults", next(index)), watch.every_ms / 1000, params,
                          watch=watch))
    return tasks


def snapshot_task(watch_task: Task, dtc: int) -> Task:
    """The one-request reading of one DTC's snapshots that a fault watch's reading is followed by."""
    plan, component, _, index = watch_task.key
    return Task((plan, component, "snapshot", index), watch_task.every_s, c.ReadFaultSnapshot(dtc),
                watch=watch_task.watch)


class Schedule:
    """A heap of (due, key): `due(now)` pops what is due and puts each back one interval later.

    A task that fell behind (the agent was paused, the budget was short) is not run once per missed
    interval: its next due time is one interval from now.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TaskKey]] = []
        self._tasks: dict[TaskKey, Task] = {}
        self._next: dict[TaskKey, float] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._tasks)

    def set_plan(self, name: str, tasks: list[Task], now: float) -> None:
        """Replaces the tasks of plan `name`. One component's tasks are spread over their first interval (its
        requests queue behind each other anyway); different components start together, since their workers
        run in parallel and one scheduler pass serves them all (fewer wake-ups when idle)."""
        self.remove_plan(name)
        per_component: dict[str, list[Task]] = {}
        for task in tasks:
            per_component.setdefault(task.component, []).append(task)
        for mine in per_component.values():
            for n, task in enumerate(mine):
                self._tasks[task.key] = task
                self._push(task.key, now + task.every_s * n / len(mine))

    def remove_plan(self, name: str) -> None:
        for key in [k for k in self._tasks if k[0] == name]:
            del self._tasks[key]
            self._next.pop(key, None)  # its heap entries are skipped lazily

    def task(self, key: TaskKey) -> Task | None:
        return self._tasks.get(key)

    def _push(self, key: TaskKey, due: float) -> None:
        self._next[key] = due
        heapq.heappush(self._heap, (due, next(self._seq), key))

    def next_due(self) -> float | None:
        while self._heap and self._next.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # a removed plan's or a rescheduled task's old entry
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[Task]:
        out: list[Task] = []
        while (when := self.next_due()) is not None and when <= now:
            _, _, key = heapq.heappop(self._heap)
            task = self._tasks[key]
            out.append(task)
            following = when + task.every_s
            self._push(key, following if following > now else now + task.every_s)
        return out


class Budget:
    """A token bucket: at most `rate` requests per second, with a burst of one second's worth (at least 1)."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._tokens = 1.0
        self._at = now

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def ready_at(self, now: float) -> float:
        self._refill(now)
        return now if self._tokens >= 1.0 else now + (1.0 - self._tokens) / self.rate


class Backoff:
    """Per component: after n readings in a row without an answer, wait base * 2^(n-1) (at most `cap`)."""

    def __init__(self, base_s: float, cap_s: float) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}

    def failed(self, component: str, now: float) -> float:
        """Records a reading without answer; returns the wait before the next one."""
        n = self._failures.get(component, 0) + 1
        self._failures[component] = n
        wait = min(self.cap_s, self.base_s * 2.0 ** min(n - 1, 64))  # a float past 2**1023 overflows: capped
        self._until[component] = now + wait
        return wait

    def answered(self, component: str) -> bool:
        """Records an answer; True when the component was backed off until now."""
        self._until.pop(component, None)
        return self._failures.pop(component, 0) > 0

    def blocked_until(self, component: str, now: float) -> float | None:
        until = self._until.get(component)
        return until if until is not None and until > now else None

    def failures(self, component: str) -> int:
        return self._failures.get(component, 0)
