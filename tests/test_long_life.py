"""A long life on the device: agent time that survives the loss of its state file, bounded growth of the
store's file over many days of commands, and nothing kept per command once it ended (threads, file
descriptors, the service's per-id maps). Days pass on injected clocks; counts are asserted, never timings."""

from __future__ import annotations

import pytest

from agent.clock import RELEASE_DATE, Clock
from agent.store.sqlite import Entry, Store
from agent.system.service import CLOCK_FILE, STORE_FILE, Service

DAY = 86400.0


class Hands:
    """A wall clock and a monotonic clock the test moves by hand."""

    def __init__(self, wall: float, mono: float = 1000.0) -> None:
        self.wall_at, self.mono_at = wall, mono

    def wall(self) -> float:
        return self.wall_at

    def mono(self) -> float:
        return self.mono_at

    def run(self, seconds: float) -> None:
        self.wall_at += seconds
        self.mono_at += seconds


def finished(store: Store, cid: str) -> None:
    batch = store.batch()
    batch.add_command(Entry(cid, "final", {}, "t", None, store.now(), None, 2, {"id": cid, "status": "completed"}))
    batch.commit()


@pytest.mark.parametrize("before, after", [(10 * DAY, RELEASE_DATE + DAY), (RELEASE_DATE + DAY, 10 * DAY)],
                         ids=["first-life-in-1970", "first-life-in-2026"])
@pytest.mark.parametrize("lost", ["deleted", "unreadable"])
def test_agent_time_whose_state_was_lost_goes_on_from_the_store(mqtt_vehicle, sim, before, after, lost):
    """Agent time counted from a first start in 1970 (a Pi without RTC, before NTP), or in the present; its
    state file is then lost (or the store was written by an agent before agent time: no file at all), and
    the next start has the wall clock decades away. An id finished a minute before must be kept 7 days of
    running time from then, neither forgotten at once nor kept for decades."""
    state = mqtt_vehicle.state_dir
    first = Hands(wall=before)
    store = Store(state / STORE_FILE, now=Clock(state / CLOCK_FILE, wall=first.wall, monotonic=first.mono).agent_now)
    first.run(3600)
    finished(store, "done-1")
    store.close()
    if lost == "deleted":
        (state / CLOCK_FILE).unlink()
    else:
        (state / CLOCK_FILE).write_text('{"agent_time": NaN}')
    later = Hands(wall=after, mono=5.0)
    svc = Service(mqtt_vehicle, clock=Clock(state / CLOCK_FILE, wall=later.wall, monotonic=later.mono))
    svc.start()
    try:
        later.run(60)
        svc.outbox.maintain()
        assert svc.store.get("done-1") is not None  # not forgotten at once
        later.run(7 * DAY - 120)
        svc.outbox.maintain()
        assert svc.store.get("done-1") is not None
        later.run(120)  # 7 days of running time since it finished
        svc.outbox.maintain()
        assert svc.store.get("done-1") is None  # nor kept for decades
    finally:
        svc.stop()
