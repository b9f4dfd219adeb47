"""Time that cannot step: the clock's synchronization sources, agent time across restarts and wall-clock
steps, retention and outbox age in agent time, and the daemon booting in 1970 before NTP steps the
clock forward. The wall clock is injected (this machine's own cannot be stepped in a test)."""

import dataclasses
import json
import time
import uuid

import pytest
from clock_support import Hands

from agent.bus.owner import wait_until
from agent.clock import RELEASE_DATE, SAVE_EVERY_S, SYNC_CACHE_S, Clock
from agent.config.model import StoreConfig
from agent.devtools.sim.config import fault_from_dict
from agent.fleet.outbox import Outbox
from agent.store.sqlite import Entry, Outgoing, Store
from agent.system.service import Service

DAY = 86400.0
YEAR = 365 * DAY


def test_synchronized_from_timesyncd_kernel_or_release_date(tmp_path):
    hands = Hands(wall=10 * DAY)  # a Pi without RTC, just booted
    timesync = tmp_path / "timesync"
    kernel = {"synced": None}
    clock = Clock(wall=hands.wall, monotonic=hands.mono, kernel=lambda: kernel["synced"], timesync_dir=timesync)
    assert not clock.synchronized()  # no time daemon here, and 1970 is before the release date
    hands.wall_at = RELEASE_DATE + DAY
    hands.run(SYNC_CACHE_S)
    assert clock.synchronized()  # no daemon: later than the release date is the best one can know
    timesync.mkdir()  # systemd-timesyncd runs: its word counts, not the date
    hands.run(SYNC_CACHE_S)
    assert not clock.synchronized()
    (timesync / "synchronized").touch()
    assert not clock.synchronized()  # cached for SYNC_CACHE_S
    hands.run(SYNC_CACHE_S)
    assert clock.synchronized()
    (timesync / "synchronized").unlink()
    kernel["synced"] = True  # chrony or ntpd cleared STA_UNSYNC
    hands.run(SYNC_CACHE_S)
    assert clock.synchronized()


def test_agent_time_counts_running_time_only_and_ignores_wall_steps(tmp_path):
    state = tmp_path / "clock.json"
    hands = Hands(wall=RELEASE_DATE)
    clock = Clock(state, wall=hands.wall, monotonic=hands.mono)
    start = clock.agent_now()
    assert start == RELEASE_DATE  # the first start's wall clock
    hands.run(100)
    hands.wall_at -= 56 * YEAR  # stepped back to 1970
    assert clock.agent_now() == start + 100
    hands.wall_at += 80 * YEAR  # NTP overshoots forward
    hands.run(SAVE_EVERY_S)
    assert clock.agent_now() == start + 100 + SAVE_EVERY_S  # and it was saved on the way
    assert json.loads(state.read_text())["agent_time"] == start + 100 + SAVE_EVERY_S
    clock.save()
    # power off for a year; the next boot has a new monotonic clock and a wall clock in 1970
    later = Hands(wall=5 * DAY, mono=3.0)
    again = Clock(state, wall=later.wall, monotonic=later.mono)
    assert again.agent_now() == start + 100 + SAVE_EVERY_S  # resumes: downtime is not counted
    later.run(7)
    assert again.agent_now() == start + 107 + SAVE_EVERY_S


def test_unreadable_agent_time_is_logged_and_restarted_from_the_wall_clock(tmp_path, caplog):
    state = tmp_path / "clock.json"
    state.write_text('{"agent_time": NaN}')
    clock = Clock(state, wall=lambda: 1234.0, monotonic=lambda: 1.0)
    assert clock.agent_now() == 1234.0
    assert any(r.levelname == "ERROR" and "agent time state unreadable" in r.getMessage() for r in caplog.records)
    # not rewritten with the wall clock before the service asked the store where agent time left off: a start
    # that fails before that must leave the next one a clock that knows its state was lost
    assert state.read_text() == '{"agent_time": NaN}'
    assert Clock(state, wall=lambda: 1234.0, monotonic=lambda: 1.0).restarted
    clock.continue_from(999.0)
    assert json.loads(state.read_text())["agent_time"] == 999.0


def test_a_clock_whose_state_is_missing_writes_none_until_it_is_settled_or_saved(tmp_path):
    """A clock without its state file began at the wall clock; writing that at once would make the next start
    believe it (restarted False) and never go on from the store's stamps, if this start fails before the
    service asks the store (a config or store error: exit 78, 73). It is written by continue_from, by the
    periodic save and by the stop's save."""
    state = tmp_path / "clock.json"
    hands = Hands(wall=RELEASE_DATE)
    clock = Clock(state, wall=hands.wall, monotonic=hands.mono)
    assert clock.restarted and not state.exists()
    assert Clock(state, wall=hands.wall, monotonic=hands.mono).restarted  # the next start knows it still
    hands.run(SAVE_EVERY_S)
    clock.agent_now()
    assert json.loads(state.read_text())["agent_time"] == RELEASE_DATE + SAVE_EVERY_S
    assert not Clock(state, wall=hands.wall, monotonic=hands.mono).restarted


@pytest.mark.parametrize("step", [-56 * YEAR, +60 * YEAR, +30 * DAY])
def test_wall_clock_step_never_forgets_an_id_early_nor_drops_an_undelivered_response(tmp_path, step):
    hands = Hands(wall=RELEASE_DATE + DAY)
    clock = Clock(tmp_path / "clock.json", wall=hands.wall, monotonic=hands.mono)
    store = Store(tmp_path / "agent.db", now=clock.agent_now)
    config = StoreConfig(ledger_retention_s=7 * 86400, outbox_max_messages=100, outbox_max_age_s=7 * 86400)
    outbox = Outbox(store, config, publish=lambda message, on_mid: None, connected=lambda: False)
    batch = store.batch()
    batch.add_command(Entry("old-1", "final", {}, "t", None, hands.wall(), None, 2, {"id": "old-1"}))
    batch.publish(Outgoing("sovd/V/responses/old-1", b"{}", None, "old-1"))
    batch.commit()
    hands.run(DAY)
    hands.wall_at += step
    outbox.maintain()
    assert store.get("old-1") is not None
    assert store.outbox_stats()[0] == 1
    hands.run(6 * DAY - 60)  # just under 7 days of running time in all
    outbox.maintain()
    assert store.get("old-1") is not None and store.outbox_stats()[0] == 1
    hands.run(120)  # 7 days of running time have passed: now it may go
    outbox.maintain()
    assert store.get("old-1") is None and store.outbox_stats()[0] == 0
    assert outbox.dropped == 1
    store.close()


def command(**fields):
    return {"id": f"k-{uuid.uuid4().hex[:10]}", "component": "engine", "command": "read_data",
            "params": {"data": "vin"}, **fields}


def test_boot_in_1970_then_ntp_steps_forward(mqtt_vehicle, sim, backend, tmp_path):
    """The daemon starts with its wall clock in 1970 and no sync; later NTP steps it to the present."""
    offset = {"s": 10 * DAY - time.time()}  # wall = 1970-01-11 + elapsed
    timesync = tmp_path / "timesync"
    timesync.mkdir()  # systemd-timesyncd is there, not yet synchronized
    clock = Clock(mqtt_vehicle.state_dir / "clock.json", wall=lambda: time.time() + offset["s"],
                  kernel=lambda: False, timesync_dir=timesync)
    svc = Service(mqtt_vehicle, clock=clock)
    svc.start()
    try:
        assert svc.link.wait_connected(10), svc.link.last_error
        backend.wait_status("online", 10)
        hour_ago = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
        stale = command(expires_at=hour_ago)
        backend.send(stale)
        refused = backend.final(stale["id"])
        assert refused["status"] == "rejected" and refused["error"]["code"] == "clock_unsynchronized"
        assert refused["clock"] == "unsynchronized" and refused["received_at"].startswith("1970-01-11")
        assert svc.store.get(stale["id"]) is None  # transient: not remembered
        plain = command()
        backend.send(plain)
        done = backend.final(plain["id"])
        assert done["status"] == "completed" and done["clock"] == "unsynchronized"
        # MQTT 5 Message Expiry is relative, so it works on an unsynchronized clock: one expires in line
        sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "pending": 70})])
        slow, quick = command(), command(params={"data": "oil_temp"})
        backend.send(slow)
        backend.send(quick, expiry_s=1)
        assert backend.final(slow["id"])["status"] == "completed"
        assert backend.final(quick["id"])["status"] == "expired"
        sim.ecu("engine").set_faults([])
        ran = sim.ecu("engine").server.executed[0x22]
        assert ran == 2  # plain and slow; never the stale one, never the expired one

        offset["s"] = 0.0  # NTP steps the clock forward by 56 years, and says it is synchronized
        (timesync / "synchronized").touch()
        assert wait_until(clock.synchronized, 5)
        svc.outbox.maintain()  # a retention pass right after the step: nothing is older than 7 days
        assert svc.store.get(plain["id"]) is not None and svc.store.get(slow["id"]) is not None
        backend.send(plain)  # the same id again: its final answer, not a second run
        backend.wait_for(lambda s: s.topic == backend.topics.responses(plain["id"]) and b'"duplicate"' in s.payload,
                         10)
        backend.send(stale)  # the id was not remembered: now judged on a synchronized clock
        finals = backend.wait_for(lambda s: s.topic == backend.topics.responses(stale["id"])
                                  and b'"final":true' in s.payload, 10, count=2)
        again = finals[1].json()
        assert again["status"] == "expired" and "clock" not in again
        assert sim.ecu("engine").server.executed[0x22] == ran
    finally:
        svc.stop()


def test_queued_command_with_an_expiry_is_not_run_after_a_restart_on_an_unsynchronized_clock(
        mqtt_vehicle, sim, tmp_path, backend):
    """A command recorded before a power loss, with an expiry, and a reboot into 1970: whether it
    expired cannot be judged, so it is answered, not run. clock_unsynchronized is transient (like
    busy): the id is forgotten, so the same command sent again once the clock is set is a fresh attempt."""
    store = Store(mqtt_vehicle.state_dir / "agent.db")
    body = command(expires_at="2099-01-01T00:00:00Z")
    batch = store.batch()
    batch.add_command(Entry(body["id"], "queued", body, f"sovd/{mqtt_vehicle.vehicle}/responses/{body['id']}",
                            None, time.time(), 4070908800.0, 1, None))
    batch.commit()
    store.close()
    clock = Clock(mqtt_vehicle.state_dir / "clock.json", wall=lambda: 10 * DAY, kernel=lambda: False,
                  daemon_present=lambda: True)
    svc = Service(dataclasses.replace(mqtt_vehicle, metrics=dataclasses.replace(mqtt_vehicle.metrics,
                                                                                enabled=False)), clock=clock)
    svc.start()
    try:
        final = backend.final(body["id"], timeout=10)
        assert final["status"] == "rejected" and final["error"]["code"] == "clock_unsynchronized"
        assert svc.store.get(body["id"]) is None  # transient: not remembered
        assert sim.ecu("engine").server.executed[0x22] == 0
    finally:
        svc.stop()
