"""A long life on the device: agent time that survives the loss of its state file, bounded growth of the
store's file over many days of commands, and nothing kept per command once it ended (threads, file
descriptors, the service's per-id maps). Days pass on injected clocks; counts are asserted, never timings."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from clock_support import Hands

from agent.bus.owner import wait_until
from agent.clock import RELEASE_DATE, Clock
from agent.config.model import StoreConfig
from agent.fleet.caller import Caller
from agent.fleet.intake import GROUP_MAX
from agent.fleet.outbox import Outbox
from agent.store.sqlite import WAL_SIZE_LIMIT, Entry, Outgoing, Store
from agent.system.service import CLOCK_FILE, STORE_FILE, Service

DAY = 86400.0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def agent_objects() -> Counter[str]:
    """Live objects of the agent's own classes (the test's backend client and simulator left out)."""
    gc.collect()
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        module = getattr(type(obj), "__module__", "")
        ours = isinstance(module, str) and module.startswith("agent.")
        if ours and not module.startswith(("agent.devtools", "agent.fleet.caller")):
            counts[f"{module}.{type(obj).__qualname__}"] += 1
    return counts


def per_command_state(svc: Service) -> dict[str, int]:
    """The sizes of every map the service keeps per command id, per message or per mid."""
    client = svc.link._client
    return {
        "service.entries": len(svc._entries), "service.started_at_intake": len(svc._started_at_intake),
        "service.marked_ahead": len(svc._marked_ahead), "intake.seen": len(svc.intake._seen),
        "intake.hold": len(svc.intake._hold), "intake.promised": len(svc.intake._promised),
        "outbox.by_mid": len(svc.outbox._by_mid), "outbox.retries": len(svc.outbox._retries),
        "outbox.taken_back": len(svc.outbox._taken_back), "link.unacked": len(svc.link._unacked),
        "link.status_mids": len(svc.link._status_mids), "paho.out": len(client._out_messages),
        "paho.in": len(client._in_messages), "workers.depth": sum(w.depth for w in svc.runtime.workers.values()),
        "store.deferred": svc.store.deferred,
    }


def run_commands(svc: Service, backend: Caller, prefix: str, n: int, wave: int = 4) -> None:
    """`n` reads, `wave` at a time (the engine's queue holds 4), each wave's finals stored before the next."""
    def finals() -> int:
        return svc.store.read("test", lambda db: db.execute(
            "SELECT COUNT(*) FROM ledger WHERE state = 'final' AND id LIKE ?", (prefix + "%",)).fetchone()[0])

    for start in range(0, n, wave):
        ids = [f"{prefix}{i}" for i in range(start, min(n, start + wave))]
        backend.send_all([json.dumps({"id": cid, "component": "engine", "command": "read_data",
                                      "params": {"data": "vin"}}).encode() for cid in ids])
        want = start + len(ids)
        assert wait_until(lambda: finals() >= want, 10), (want, finals())  # noqa: B023 (waited for here)


GROUP_SCOPED = ("intake.seen", "intake.promised")  # the last intake group's, replaced by the next group


def settled(svc: Service) -> bool:
    state = per_command_state(svc)
    return (svc.store.outbox_stats()[0] == 0 and not any(v for k, v in state.items() if k not in GROUP_SCOPED)
            and all(state[k] <= GROUP_MAX for k in GROUP_SCOPED))


def test_hundreds_of_commands_leave_no_thread_fd_or_per_command_state_behind(service, backend):
    """After a warm-up, hundreds more commands end with as many threads, file descriptors and agent objects
    as before, and every per-id map of intake, outbox, link and service empty again."""
    run_commands(service, backend, "warm-", 40)
    assert wait_until(lambda: settled(service), 10), per_command_state(service)
    objects = agent_objects()  # collects garbage first: what an earlier test left is closed before counting
    threads, fds = threading.active_count(), open_fds()
    run_commands(service, backend, "life-", 300)
    # and the refusal paths: duplicates of finished ids, invalid commands, unknown components, undecodable bytes
    for start in range(0, 100, 4):
        backend.send_all([json.dumps(body).encode() for i in range(start, start + 4) for body in (
            {"id": f"life-{i}", "component": "engine", "command": "read_data", "params": {"data": "vin"}},
            {"id": f"bad-{i}", "component": "engine", "command": "read_data", "params": {"data": 7}},
            {"id": f"nobody-{i}", "component": "nobody", "command": "read_data", "params": {"data": "vin"}})]
            + [b"\xff{not json"])
    assert wait_until(lambda: settled(service) and service.intake.stats.duplicates >= 100, 10), \
        per_command_state(service)
    now = agent_objects()
    assert threading.active_count() == threads
    assert open_fds() == fds
    # The intake keeps its last group's messages and decisions until the next group comes (at most GROUP_MAX
    # of each): bounded, whatever the number of commands; a per-command leak would count in the hundreds.
    grown = {name: count - objects[name] for name, count in now.items() if count > objects[name]}
    assert all(n <= GROUP_MAX for n in grown.values()), grown
    assert service.store.read("test", lambda db: db.execute(
        "SELECT COUNT(*) FROM ledger WHERE state = 'final' AND id LIKE 'life-%'").fetchone()[0]) == 300


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


def store_bytes(path: Path) -> tuple[int, int]:
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size, wal.stat().st_size if wal.exists() else 0


def a_day_of_commands(store: Store, day: int, commands: int = 200, size: int = 500) -> None:
    """A day's finished commands (their ids and finals in the ledger), their responses delivered and deleted."""
    for part in range(0, commands, 50):
        batch = store.batch()
        for i in range(part, part + 50):
            cid = f"day{day}-{i}"
            batch.add_command(Entry(cid, "final", {}, "t", None, 0.0, None, 2, {"id": cid, "result": "r" * size}))
            batch.publish(Outgoing("t", b"p" * size, None, cid))
        batch.commit()
    store.acknowledge([p.n for p in store.pending(0, 100_000)])
    store.flush()


def test_the_store_file_stops_growing_over_weeks_of_commands_and_after_a_burst(tmp_path):
    """Four weeks of 200 commands a day with a 7-day retention (days passing in agent time): once the
    ledger holds a week, the database file stops growing (freed pages are reused) and the WAL stays within
    its size limit after checkpoints. An outbox burst while offline grows the file once; the same burst
    again reuses its pages."""
    hands = Hands(wall=RELEASE_DATE + DAY)
    clock = Clock(tmp_path / CLOCK_FILE, wall=hands.wall, monotonic=hands.mono)
    path = tmp_path / STORE_FILE
    store = Store(path, now=clock.agent_now)
    outbox = Outbox(store, StoreConfig(), publish=lambda message, on_mid: None, connected=lambda: False,
                    now=clock.agent_now, wall=hands.wall)
    sizes = []
    try:
        for day in range(28):
            a_day_of_commands(store, day)
            hands.run(DAY)
            outbox.maintain()
            sizes.append(store_bytes(path))
        assert store.read("test", lambda db: db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]) == 7 * 200
        week_two = sizes[13][0]
        assert all(db <= week_two for db, _ in sizes[14:]), [db for db, _ in sizes]
        assert all(wal <= WAL_SIZE_LIMIT + 2 * 4096 * 1000 for _, wal in sizes), [wal for _, wal in sizes]
        def burst() -> None:
            batch = store.batch()
            for _ in range(2000):
                batch.publish(Outgoing("t", b"b" * 2000, None, None))
            batch.commit()
            store.acknowledge([p.n for p in store.pending(0, 100_000)])
            store.flush()
            store.read("test", lambda db: db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
        burst()
        after_one = store_bytes(path)[0]
        assert after_one > week_two  # the burst's pages: the file does not shrink by itself
        burst()
        assert store_bytes(path)[0] == after_one  # but a second burst reuses them
    finally:
        store.close()



def test_the_agent_time_file_has_one_writer_at_a_time(tmp_path):
    """Every thread that stamps a row asks for agent time, and one that crosses SAVE_EVERY_S writes the
    state file, while a stop (or another thread) may be saving it: two writers in the one temporary file
    interleave their bytes, and the next start finds a clock.json it cannot read. The wall clock, asked
    inside each write, holds the first writer until a second one arrives (or half a second passes)."""
    from agent.clock import SAVE_EVERY_S

    state = tmp_path / CLOCK_FILE
    at = {"mono": 1000.0}
    meeting = threading.Barrier(2, timeout=0.5)
    inside: list[int] = [0]
    most: list[int] = [0]
    lock = threading.Lock()

    def wall() -> float:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        with contextlib.suppress(threading.BrokenBarrierError):
            meeting.wait()  # a second writer in the file at the same time meets this one
        with lock:
            inside[0] -= 1
        return RELEASE_DATE

    clock = Clock(state, wall=lambda: RELEASE_DATE, monotonic=lambda: at["mono"])
    clock.wall = wall
    at["mono"] += SAVE_EVERY_S
    stamper = threading.Thread(target=clock.agent_now, name="stamper")  # crosses the interval: writes
    stamper.start()
    assert wait_until(lambda: inside[0] == 1, 5)
    clock.save()  # the stop's save meanwhile
    stamper.join(5)
    assert most[0] == 1
    assert json.loads(state.read_text())["agent_time"] == RELEASE_DATE + SAVE_EVERY_S


def test_collection_running_and_removed_again_leaves_no_thread_fd_or_object_behind(service, backend):
    """A plan collecting as fast as a plan may (every 100 ms, one sample a batch), removed once twenty
    batches went out; the same again: the second round ends with the threads, fds and agent objects the
    first ended with (nothing kept per batch, per reading or per plan version)."""
    topic = f"{backend.topics.base}/telemetry"
    signals = [{"component": "engine", "data": [name], "every_ms": 100} for name in ("engine_speed", "oil_temp")]

    def a_round(version: int) -> None:
        backend.publish_plan("fast", {"name": "fast", "version": version, "signals": signals,
                                      "batch": {"max_age_ms": 100, "max_samples": 1}})
        backend.wait_for(lambda s: s.topic == topic and s.json()["version"] == version, 15, count=20)
        backend.publish_plan("fast", None)
        assert wait_until(lambda: "fast" not in service.collection.collector.plans, 10)
        assert wait_until(lambda: service.collection.tables.telemetry_stats()[0] == 0 and settled(service), 10)

    a_round(1)
    objects = agent_objects()  # collects garbage first: what an earlier test left is closed before counting
    threads, fds = threading.active_count(), open_fds()
    a_round(2)
    now = agent_objects()
    assert threading.active_count() == threads
    assert open_fds() == fds
    grown = {name: count - objects[name] for name, count in now.items() if count > objects[name]}
    assert all(n <= GROUP_MAX for n in grown.values()), grown


def test_a_damaged_store_is_moved_aside_under_the_wall_clocks_date_not_agent_times(tmp_path):
    """Agent time began in 1970 on this Pi (its first start was before NTP); years later the store is found
    damaged: the moved file and the marker carry today's date, as the store_recovered event does."""
    from agent.store.recovery import marker_path, open_store

    path = tmp_path / STORE_FILE
    path.write_bytes(b"this is not a SQLite database at all, but long enough to have a header" * 20)
    today = RELEASE_DATE + 30 * DAY
    store, recovery = open_store(path, now=lambda: 10 * DAY + 3 * 365 * DAY, wall=lambda: today)
    store.close()
    assert recovery is not None and recovery.moved[0].startswith(
        "agent.db.damaged-" + time.strftime("%Y%m%d", time.gmtime(today)))
    assert json.loads(marker_path(path).read_text())["created_at"].startswith(
        time.strftime("%Y-%m-%d", time.gmtime(today)))


def test_agent_time_lost_then_a_failed_start_still_goes_on_from_the_store(mqtt_vehicle, sim, monkeypatch):
    """clock.json is lost; the next start fails before the store was opened (here: the store cannot be opened,
    as when it is locked or the card gives I/O errors: exit 73, systemd restarts). The clock of that failed
    start wrote the wall clock into clock.json at once, so the start after it read a sound file and never
    looked at the store's stamps: agent time decades away from the store's, every id forgotten at once."""
    import agent.system.service as service_module
    from agent.store.sqlite import StoreError

    state = mqtt_vehicle.state_dir
    first = Hands(wall=10 * DAY)  # a first life in 1970 (no RTC, before NTP)
    store = Store(state / STORE_FILE, now=Clock(state / CLOCK_FILE, wall=first.wall, monotonic=first.mono).agent_now)
    first.run(3600)
    finished(store, "done-1")
    stamped = store.read("test", lambda db: db.execute(
        "SELECT updated_at FROM ledger WHERE id = 'done-1'").fetchone()[0])
    store.close()
    (state / CLOCK_FILE).unlink()
    later = Hands(wall=RELEASE_DATE + DAY, mono=5.0)

    def locked(*args, **kwargs):
        raise StoreError("open", sqlite3.OperationalError("database is locked"))

    with monkeypatch.context() as patch:
        patch.setattr(service_module, "open_store", locked)
        with pytest.raises(StoreError):
            Service(mqtt_vehicle, clock=Clock(state / CLOCK_FILE, wall=later.wall, monotonic=later.mono))
    svc = Service(mqtt_vehicle, clock=Clock(state / CLOCK_FILE, wall=later.wall, monotonic=later.mono))
    svc.start()
    try:
        assert abs(svc.clock.agent_now() - stamped) < 60  # goes on from the store, not from 2026
    finally:
        svc.stop()
