"""A damaged store is recovered, visibly: damaged files made the way power loss and bad SD cards make
them (zero length, garbled header, garbled pages, garbled WAL), opened by open_store, by the service
(a `store_recovered` event through a real Mosquitto) and by `sovd-edge run` as a process."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import ROOT
from mqtt_support import validate_published
from test_mqtt_process import backends, setup  # noqa: F401  (fixtures)

from agent.store.recovery import check_wal, marker_path, open_store
from agent.store.sqlite import Entry, Outgoing, Store, StoreError


def seed(store: Store, n: int = 5, prefix: str = "c") -> None:
    """n commands, one transaction each (as intake writes them): a queued ledger row and an outbox message."""
    for i in range(n):
        batch = store.batch()
        batch.add_command(Entry(f"{prefix}-{i}", "queued", {"id": f"{prefix}-{i}"}, "r", None, 1.0, None, 1, None))
        batch.publish(Outgoing("r", b"response %d" % i, None, f"{prefix}-{i}"))
        batch.commit()


def healthy(directory: Path) -> Path:
    """A store that was opened, written and closed cleanly (checkpointed, no WAL left)."""
    path = directory / "agent.db"
    store, recovery = open_store(path)
    assert recovery is None
    seed(store, 200)
    store.close()
    return path


def power_cut(directory: Path, n: int = 5) -> Path:
    """A store as a power cut leaves it: the last commits only in the WAL (copied while still open)."""
    source = directory / "live"
    source.mkdir()
    store, _ = open_store(source / "agent.db")
    store.close()  # the marker and an empty checkpointed database
    store = Store(source / "agent.db")
    seed(store, n)
    target = directory / "state"
    target.mkdir()
    for name in ("agent.db", "agent.db-wal", "agent.db.marker"):
        shutil.copy(source / name, target / name)
    store.close()
    return target / "agent.db"


def garble(path: Path, offset: int, length: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + length] = bytes((i * 37 + 11) & 0xFF for i in range(length))
    path.write_bytes(bytes(data))


def reopen(path: Path):
    store, recovery = open_store(path)
    ids = [e.id for e in store.entries("queued")]
    pending = len(store.pending(0, 1000))
    store.close()
    return recovery, ids, pending


def test_first_start_and_clean_restart_report_nothing(tmp_path):
    path = healthy(tmp_path)
    assert marker_path(path).exists()
    recovery, ids, pending = reopen(path)
    assert recovery is None and len(ids) == 200 and pending == 200


def test_a_power_cut_leaves_a_wal_that_is_read_in_full(tmp_path):
    path = power_cut(tmp_path)
    recovery, ids, pending = reopen(path)
    assert recovery is None and ids == [f"c-{i}" for i in range(5)] and pending == 5


def test_a_torn_last_frame_is_not_damage(tmp_path):
    """A power cut while the last (never acknowledged) transaction was written."""
    path = power_cut(tmp_path)
    wal = path.with_name("agent.db-wal")
    wal.write_bytes(wal.read_bytes()[:-1000])
    recovery, ids, _ = reopen(path)
    assert recovery is None and ids == [f"c-{i}" for i in range(4)]


@pytest.mark.parametrize("how", ["zero_length", "missing"])
def test_a_store_that_shrank_to_nothing_is_reported(tmp_path, how):
    path = healthy(tmp_path)
    if how == "zero_length":
        path.write_bytes(b"")
    else:
        path.unlink()
    recovery, ids, pending = reopen(path)
    assert recovery is not None and recovery.reason == "vanished" and (ids, pending) == ([], 0)
    assert ("empty (0 bytes)" if how == "zero_length" else "missing") in recovery.detail
    assert all((tmp_path / name).exists() for name in recovery.moved)
    assert reopen(path)[0] is None  # reported once: the fresh store is a store again


def test_an_empty_file_without_our_marker_is_a_first_start(tmp_path):
    (tmp_path / "agent.db").write_bytes(b"")
    recovery, ids, _ = reopen(tmp_path / "agent.db")
    assert recovery is None and ids == []


def test_a_garbled_header_is_moved_aside_with_a_timestamp(tmp_path):
    path = healthy(tmp_path)
    garble(path, 0, 100)
    recovery, ids, pending = reopen(path)
    assert recovery is not None and recovery.reason == "unreadable" and "not a database" in recovery.detail
    assert (ids, pending) == ([], 0)
    assert len(recovery.moved) == 1 and recovery.moved[0].startswith("agent.db.damaged-20")
    assert (tmp_path / recovery.moved[0]).read_bytes()[:100] != b"SQLite format 3\0"[:100]


def test_garbled_pages_fail_quick_check(tmp_path):
    path = healthy(tmp_path)
    garble(path, 9 * 4096 + 2000, 100)  # inside a b-tree page: the schema still reads
    recovery, ids, _ = reopen(path)
    assert recovery is not None and recovery.reason == "damaged" and "quick_check" in recovery.detail
    assert ids == []


def test_a_garbled_wal_header_is_damage_not_an_empty_ledger(tmp_path):
    """SQLite skips a WAL whose header it cannot read: without this check, the agent started with an
    empty ledger and outbox and said nothing."""
    path = power_cut(tmp_path)
    garble(path.with_name("agent.db-wal"), 0, 32)
    recovery, ids, pending = reopen(path)
    assert recovery is not None and recovery.reason == "torn_wal" and "header" in recovery.detail
    assert len(recovery.moved) == 2 and recovery.moved[1].endswith("-wal")
    assert (ids, pending) == ([], 0)


def test_committed_transactions_behind_a_broken_wal_frame_are_damage(tmp_path):
    path = power_cut(tmp_path)
    wal = path.with_name("agent.db-wal")
    garble(wal, 32 + 24 + 500, 64)  # inside the first frame's page
    assert "committed transactions after it" in check_wal(wal.read_bytes())
    recovery, _, _ = reopen(path)
    assert recovery is not None and recovery.reason == "torn_wal"


def test_a_store_that_cannot_be_opened_is_left_alone(tmp_path):
    """Not being able to get at a store (here: a directory where the file should be) is not damage:
    nothing is moved, the error says why."""
    (tmp_path / "agent.db").mkdir()
    with pytest.raises(StoreError) as info:
        open_store(tmp_path / "agent.db")
    assert info.value.code == "SQLITE_CANTOPEN" and (tmp_path / "agent.db").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.db"]


def test_the_service_publishes_store_recovered_and_keeps_serving(mqtt_vehicle, sim, backend):
    from agent.system.service import Service

    state = mqtt_vehicle.state_dir
    healthy(state)
    garble(state / "agent.db", 0, 100)
    svc = Service(dataclasses.replace(mqtt_vehicle))
    svc.start()
    try:
        event = backend.wait_for(lambda s: s.topic == backend.topics.events and b"store_recovered" in s.payload,
                                 10)[0].json()
        assert event["reason"] == "unreadable" and event["moved_to"][0].startswith("agent.db.damaged-")
        assert svc.registry.get_sample_value("sovd_store_recoveries_total", {"reason": "unreadable"}) == 1
        body = {"id": f"after-{uuid.uuid4().hex[:6]}", "component": "engine", "command": "read_data",
                "params": {"data": "vin"}}
        backend.send(body)
        assert backend.final(body["id"])["status"] == "completed"
    finally:
        svc.stop()


def test_sovd_edge_run_recovers_without_a_traceback_or_a_crash_loop(setup, broker, backends):  # noqa: F811
    agent, vehicle, tmp = setup
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    healthy(state)
    garble(state / "agent.db", 0, 100)
    backend = backends(broker, vehicle)
    agent.start()
    event = backend.wait_for(lambda s: s.topic == backend.topics.events and b"store_recovered" in s.payload, 15)
    assert event[0].json()["reason"] == "unreadable"
    body = {"id": f"run-{uuid.uuid4().hex[:6]}", "component": "engine", "command": "read_data",
            "params": {"data": "vin"}}
    backend.send(body)
    assert backend.final(body["id"], timeout=15)["status"] == "completed"
    assert agent.terminate() == 0
    lines = [json.loads(line) for line in agent.log.read_text().splitlines() if line.startswith("{")]
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert any("store unreadable" in line["message"] for line in errors), errors
    assert "Traceback" not in agent.log.read_text()
    agent.start()  # the next start finds a sound store: nothing more to report
    assert agent.terminate() == 0
    assert agent.log_count("store unreadable") == 1
    validate_published(backend.seen, backend.topics.base)


def test_sovd_edge_run_exits_73_when_the_store_cannot_be_opened(setup):  # noqa: F811
    agent, _, tmp = setup
    (tmp / "state").mkdir(exist_ok=True)
    (tmp / "state" / "agent.db").mkdir()
    done = subprocess.run(agent.args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 73, done.stderr
    assert "cannot open the store" in done.stderr and "Traceback" not in done.stderr
