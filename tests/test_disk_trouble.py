"""The agent's state dir under real disk trouble, while it runs: its database file garbled, deleted or
truncated under it, its WAL overwritten. Every case is made on real files (no mock): what SQLite and the
kernel answer is what the agent meets on a failing SD card or at an operator's `rm`.

Promised: the store's failure is `storage_unavailable` for commands (spec rev 1.1), a metric and a log
line naming the path; nothing is acknowledged that was not recorded; a clean stop stays clean.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import DATA, ROOT

from agent.bus.owner import wait_until
from agent.system.service import Service


def read_vin() -> dict:
    return {"id": f"r-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data",
            "params": {"data": "vin"}}


@pytest.fixture
def running(mqtt_vehicle, sim, backend):
    """A started Service whose store has committed a command (its WAL holds frames)."""
    svc = Service(mqtt_vehicle)
    svc.start()
    stopped = []
    try:
        backend.wait_status("online", 10)
        first = read_vin()
        backend.send(first)
        assert backend.final(first["id"])["status"] == "completed"
        yield svc, backend, mqtt_vehicle.state_dir / "agent.db", stopped
    finally:
        if not stopped:
            svc.stop()


def garble_wal(db) -> None:
    wal = db.with_name(db.name + "-wal")
    size = wal.stat().st_size
    assert size > 0
    with wal.open("r+b") as f:
        f.write(os.urandom(size))


def test_a_clean_stop_with_a_failing_store_still_stops_everything(running, caplog):
    """A store that fails when the agent stops (its WAL garbled: SQLite answers SQLITE_NOTADB to every
    read) must not abort the stop half-way: the link goes offline, every thread ends, the store is closed,
    and the log says the outbox could not be flushed."""
    svc, backend, db, stopped = running
    garble_wal(db)
    refused = read_vin()
    backend.send(refused)
    assert backend.final(refused["id"])["error"]["code"] == "storage_unavailable"
    with caplog.at_level(logging.ERROR):
        svc.stop()  # raised StoreError from the outbox's flush: the threads below it were never stopped
    stopped.append(True)
    backend.wait_status("offline", 10)
    assert not svc.outbox.alive and not svc.link.alive
    assert any("outbox" in r.getMessage() and "SQLITE_NOTADB" in r.getMessage() for r in caplog.records)


def clear_faults() -> dict:
    """A mutating command: the ledger is what keeps a repeat of its id from running it again."""
    return {"id": f"cf-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "clear_faults"}


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_database_file_deleted_or_replaced_under_the_agent_is_storage_unavailable(running, mqtt_vehicle, sim,
                                                                                    backend, how, caplog):
    """`rm agent.db*` (or a copy moved over it) while the agent runs: SQLite in WAL mode goes on writing to
    the open, now nameless file, and everything recorded from then on is gone at the next start. A command
    answered `completed` then was "recorded" nowhere that lasts: after a restart the same id ran again.
    It must be refused `storage_unavailable` instead, with a log line naming the path, and counted."""
    svc, backend, db, stopped = running
    errors_before = svc.metrics.store_errors.labels("write")._value.get()
    if how == "deleted":
        for name in ("agent.db", "agent.db-wal", "agent.db-shm"):
            db.with_name(name).unlink(missing_ok=True)
    else:
        other = db.with_name("copy.db")
        other.write_bytes(db.read_bytes())
        other.replace(db)
    body = clear_faults()
    with caplog.at_level(logging.ERROR):
        backend.send(body)
        final = backend.final(body["id"])
    assert final["status"] == "rejected" and final["error"]["code"] == "storage_unavailable", final
    assert svc.store.trouble is not None
    assert any(str(db) in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert svc.metrics.store_errors.labels("write")._value.get() > errors_before
    # a restart cures it (a fresh store, reported store_recovered): what the systemd watchdog stops for
    assert any("deleted or replaced" in problem for problem in svc.wedged()), svc.wedged()
    svc.stop()
    stopped.append(True)
    again = Service(mqtt_vehicle)  # what the disk holds now: the command was never recorded, so may run now
    again.start()
    try:
        backend.send(body)
        later = backend.wait_replies(body["id"], 3, 10)  # the refusal before, accepted + final now
        assert [r["status"] for r in later[1:]] == ["accepted", "completed"]
    finally:
        again.stop()


@pytest.fixture
def failing_card(tmp_path):
    """A small ext4 file system on a loop device, mounted errors=remount-ro as an SD card is; `fail()` makes
    the kernel take it read-only exactly as it does after an I/O error (ext4's trigger_fs_error: the real
    error path, not a mock). Skipped where the test may not mount one (needs root with CAP_SYS_ADMIN)."""
    image, mountpoint = tmp_path / "card.img", tmp_path / "card"
    mountpoint.mkdir()
    with image.open("wb") as f:
        f.truncate(16 * 1024 * 1024)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make an ext4 image: {made.stderr.strip()}")
    mounted = subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(mountpoint)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop device here: {mounted.stderr.strip()}")
    source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mountpoint)], capture_output=True, text=True)
    trigger = Path("/sys/fs/ext4") / Path(source.stdout.strip()).name / "trigger_fs_error"

    def fail() -> None:
        if not trigger.exists():
            pytest.skip("this kernel has no ext4 trigger_fs_error")
        trigger.write_text("test: the card fails")

    try:
        yield mountpoint, fail
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_card_the_kernel_remounts_read_only_refuses_commands_and_the_next_start_exits_73(
        failing_card, mqtt_vehicle, sim, backend, caplog):
    """The SD card's commonest death: an I/O error, and ext4 remounts it read-only under the running agent.
    Commands are refused `storage_unavailable` (none runs: nothing acknowledged that was not recorded), the
    store says why; a start on the read-only card exits 73 with a line naming the state dir."""
    mountpoint, fail = failing_card
    config = dataclasses.replace(mqtt_vehicle, state_dir=mountpoint / "state")
    svc = Service(config)
    svc.start()
    try:
        backend.wait_status("online", 10)
        first = read_vin()
        backend.send(first)
        assert backend.final(first["id"])["status"] == "completed"
        fail()
        refused = clear_faults()
        with caplog.at_level(logging.ERROR):
            backend.send(refused)
            final = backend.final(refused["id"])
        assert final["error"]["code"] == "storage_unavailable", final
        assert svc.store.trouble is not None and "SQLITE_IOERR" in svc.store.trouble.error  # EROFS on write
        db = str(config.state_dir / "agent.db")
        assert any(db in r.getMessage() for r in caplog.records if r.name == "agent.store.group"), \
            [r.getMessage() for r in caplog.records]
    finally:
        svc.stop()
    assert backend.wait_status("offline", 10)
    config_file = mountpoint.parent / "agent.yaml"
    raw = yaml.safe_load((DATA / "vehicle.yaml").read_text())
    raw.update(state_dir=str(mountpoint / "state"), vehicle=mqtt_vehicle.vehicle)
    config_file.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "agent", "run", "-c", str(config_file), "--broker",
                           mqtt_vehicle.mqtt.broker], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 73, done.stderr
    assert str(mountpoint / "state") in done.stderr and "Traceback" not in done.stderr
    doctor = cli("doctor", "-c", str(config_file), "--broker", mqtt_vehicle.mqtt.broker)
    assert doctor.returncode == 1
    # access(2) and statvfs still say writable on a file system ext4 took read-only this way (recent kernels)
    assert re.search(rf"^state dir\s+FAIL\s+{re.escape(str(mountpoint / 'state'))} is on a file system that "
                     r"refuses writes: Read-only file system", doctor.stdout, re.M), doctor.stdout


# ---- at start: `sovd-edge run` and `sovd-edge doctor` on a broken state dir --------------------------

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def store_line(stdout: str) -> str:
    found = [line for line in stdout.splitlines() if line.startswith("store ")]
    assert len(found) == 1, stdout
    return " ".join(found[0].split())


def garbled_wal(state: Path) -> None:
    """A store whose WAL holds committed transactions behind a garbled frame (as test_store_recovery makes it)."""
    from agent.store.sqlite import Entry, Store

    store = Store(state / "agent.db")
    store._db.execute("PRAGMA wal_autocheckpoint=0")
    for i in range(4):
        batch = store.batch()
        batch.add_command(Entry(f"c-{i}", "queued", {"id": f"c-{i}"}, "r", None, 1.0, None, 1, None))
        batch.commit()
    wal = (state / "agent.db-wal").read_bytes()
    page = int.from_bytes(wal[8:12], "big")
    frame = 24 + page
    broken = bytearray(wal)
    broken[32 + frame + 30] ^= 0xFF  # the second frame's page: its checksum fails
    store._db.close()  # no checkpoint: the WAL stays as it is
    store._reader.close()
    (state / "agent.db-wal").write_bytes(bytes(broken))


BROKEN = {
    # name: (make it, doctor's verdict, `run`'s exit code: 73 it cannot start, None it starts (and recovers))
    "store_is_a_directory": (lambda s: (s / "agent.db").mkdir(), r"store FAIL .*agent\.db is not a file", 73),
    "store_is_garbage": (lambda s: (s / "agent.db").write_bytes(b"\x07" * 8192),
                         r"store warn .*agent\.db is not a SQLite database: the agent moves it aside", None),
    "store_vanished": (lambda s: (s / "agent.db.marker").write_text('{"created_at": "2026-01-01T00:00:00Z"}\n'),
                       r"store warn .*agent\.db is missing, but a store existed here since 2026-01-01", None),
    "wal_garbled": (garbled_wal, r"store warn .*agent\.db-wal: frame 2 is broken", None),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_doctor_says_what_run_will_meet_in_the_store(name, tmp_path, broker):
    """`run` refuses a store it cannot open (exit 73) and moves a damaged one aside (a fresh ledger, and a
    store_recovered event): `doctor` said `state dir ok` to both and looked no further. It reads the files
    (and changes nothing) and says FAIL for the first and warn for the second, naming the file."""
    make, verdict, code = BROKEN[name]
    state = tmp_path / "state"
    state.mkdir()
    make(state)
    before = sorted((p.name, p.stat().st_size) for p in state.iterdir())
    doctor = cli("doctor", "-c", "config/demo.yaml", "--broker", broker.url, "--state-dir", str(state))
    line = store_line(doctor.stdout)
    assert re.search(verdict, line), line
    assert str(state) in line
    assert doctor.returncode == (1 if code else 0), doctor.stdout
    assert sorted((p.name, p.stat().st_size) for p in state.iterdir()) == before  # it only looked
    if code is not None:
        config = yaml.safe_load((ROOT / "config/demo.yaml").read_text())
        config["mqtt"] = {"broker": broker.url}
        config["simulate"] = [str(ROOT / "config" / f) for f in config["simulate"]]
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
        run = cli("run", "-c", str(tmp_path / "agent.yaml"), "--state-dir", str(state))
        assert run.returncode == code and str(state) in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_doctor_on_a_sound_store_and_on_none(tmp_path, broker):
    state = tmp_path / "state"
    state.mkdir()
    doctor = cli("doctor", "-c", "config/demo.yaml", "--broker", broker.url, "--state-dir", str(state))
    assert re.search(r"store ok .*no store yet", store_line(doctor.stdout))
    from agent.store.recovery import open_store

    store, _ = open_store(state / "agent.db")
    store.close()
    doctor = cli("doctor", "-c", "config/demo.yaml", "--broker", broker.url, "--state-dir", str(state))
    assert re.search(r"store ok .*agent\.db: \d+ bytes", store_line(doctor.stdout)), doctor.stdout
    assert doctor.returncode == 0, doctor.stdout


# ---- writes kept in memory while the store failed, at a clean stop ------------------------------------

def deferred_final(tmp_path: Path):
    """A store holding a started command whose final could not be stored (full: SQLite's own SQLITE_FULL via
    max_page_count, as test_store_trouble.py makes it) and waits in memory."""
    from agent.store.sqlite import Entry, Outgoing, Store, StoreError

    store = Store(tmp_path / "agent.db")
    seeded = store.batch()
    seeded.add_command(Entry("c-1", "started", {"id": "c-1"}, "r/c-1", None, 1.0, None, 1, None))
    seeded.commit()
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    final = store.batch()
    final.publish(Outgoing("r/c-1", b"z" * 20_000, None, "c-1"))
    final.set_state("c-1", "final", seq=2, final_message={"status": "completed"})
    with pytest.raises(StoreError):
        final.commit(defer=True)
    assert store.deferred == 1
    return store


def test_a_final_kept_in_memory_is_stored_at_a_clean_stop_once_the_disk_has_room(tmp_path):
    """The disk has room again, but no write came since: close() committed what waited in `_pending` only,
    and the final kept in memory was dropped without a word. After the restart the command was reported
    `interrupted` although its final (`completed`) had been published around the store."""
    from agent.store.sqlite import Store

    store = deferred_final(tmp_path)
    store._db.execute("PRAGMA max_page_count = 1073741823")
    store.close()
    again = Store(tmp_path / "agent.db")
    try:
        assert again.get("c-1").state == "final"
        assert [p.message.topic for p in again.pending(0, 10)] == ["r/c-1"]
    finally:
        again.close()


def test_a_final_that_cannot_be_stored_at_a_clean_stop_is_reported_lost(tmp_path, caplog):
    store = deferred_final(tmp_path)
    with caplog.at_level(logging.ERROR):
        store.close()
    lost = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "lost" in r.getMessage()]
    assert lost and "1 write" in lost[0] and str(tmp_path / "agent.db") in lost[0], caplog.text


def test_an_outbox_that_cannot_read_the_store_says_so_once_not_every_second(running, caplog):
    """The outbox thread reads the store at least every IDLE_WAIT_S: with the store failing, each pass logged
    a WARNING, one or two a second for as long as the disk stays broken (onto that same card). The first
    failure is logged; the next ones are not, until a pass works again."""
    svc, _, db, _ = running
    garble_wal(db)
    with caplog.at_level(logging.WARNING, logger="agent.fleet.outbox"):
        for _ in range(4):  # four passes of the outbox thread, each one failing
            beat = svc.outbox.heartbeat
            assert wait_until(lambda b=beat: svc.outbox.heartbeat > b, 10)
    failed = [r for r in caplog.records if r.name == "agent.fleet.outbox" and "outbox pass failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in failed]
    assert svc.store.errors["read"] >= 3  # the passes did fail, each counted by the store (its metric)


WAL_DELETED_THEN_KILLED = r'''
import os, signal, sys
from pathlib import Path
from agent.store.sqlite import Entry, Store, StoreError

store = Store(Path(sys.argv[1]))
def command(name):
    batch = store.batch()
    batch.add_command(Entry(name, "queued", {"id": name}, "r", None, 1.0, None, 1, None))
    batch.commit()
command("before")  # committed, and so acknowledged (its PUBACK goes after this)
os.unlink(sys.argv[1] + "-wal")
try:
    command("after")
    print("after: committed")
except StoreError as err:
    print(f"after: {err.code} {err.unavailable}")
sys.stdout.flush()
os.kill(os.getpid(), signal.SIGKILL)
'''


def test_a_wal_deleted_under_the_store_loses_nothing_acknowledged_across_a_crash(tmp_path):
    """`rm agent.db-wal` while the agent runs: SQLite goes on committing to the open, nameless WAL, and a crash
    (or the watchdog's SIGABRT) then loses every transaction not yet checkpointed, those acknowledged before
    the `rm` too. The store must save what it committed into the database file, and refuse new writes
    (storage trouble) rather than commit them where no start will find them. A real SIGKILL in a child."""
    from agent.store.sqlite import Store

    db = tmp_path / "agent.db"
    child = subprocess.run([sys.executable, "-c", WAL_DELETED_THEN_KILLED, str(db)], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
    assert child.returncode == -9, child.stderr
    assert child.stdout.strip() == "after: SQLITE_READONLY_DBMOVED True", child.stdout + child.stderr
    again = Store(db)
    try:
        assert again.get("before") is not None  # committed before the rm: still there
        assert again.get("after") is None
    finally:
        again.close()


def test_telemetry_a_failing_store_cannot_take_is_counted_each_time_and_logged_once(running, caplog):
    """A collection plan batches every 300 ms; with the store failing, every batch and every state write
    logged a full traceback (three a second, onto the failing card). Each lost batch is counted (the
    `not_stored` metric); the log says it once while the store fails."""
    svc, backend, db, stopped = running
    plan = {"name": "pt", "version": 1, "signals": [{"component": "engine", "data": ["engine_speed"],
                                                     "every_ms": 100}],
            "batch": {"max_age_ms": 300, "max_samples": 50}}
    backend.publish_plan("pt", plan)
    try:
        topic = f"{backend.topics.base}/telemetry"
        backend.wait_for(lambda s: s.topic == topic, 15)
        db.unlink()  # every write is refused from here on (storage trouble, SQLITE_READONLY_DBMOVED)
        lost = svc.collection.metrics.telemetry_dropped.labels("not_stored")
        with caplog.at_level(logging.WARNING, logger="agent.collect"):
            before = lost._value.get()
            assert wait_until(lambda: lost._value.get() >= before + 4, 15)  # four batches the store refused
        flood = [r for r in caplog.records if r.name.startswith("agent.collect") and "could not be queued" in
                 r.getMessage()]
        assert 1 <= len(flood) <= 2, [r.getMessage() for r in flood]  # one for batches, one for states at most
    finally:  # the agent stopped first: a removal it took while stopping logged onto a closed test stream
        svc.stop()
        stopped.append(True)
        backend.publish_plan("pt", None)


def test_doctor_fails_a_lock_file_run_cannot_open(tmp_path, broker):
    """`run` exits 73 'cannot lock the state directory' when agent.lock is not a file; doctor said ok."""
    state = tmp_path / "state"
    (state / "agent.lock").mkdir(parents=True)
    doctor = cli("doctor", "-c", "config/demo.yaml", "--broker", broker.url, "--state-dir", str(state))
    assert re.search(rf"^state dir\s+FAIL\s+{re.escape(str(state / 'agent.lock'))} is not a file", doctor.stdout,
                     re.M), doctor.stdout
    assert doctor.returncode == 1


def test_a_store_sqlite_finds_damaged_stays_in_trouble_though_some_writes_work(running, caplog):
    """A garbled WAL: SQLite's write connection goes on appending (it keeps the WAL's state in memory), the
    read connection answers SQLITE_NOTADB to some queries and not to others. Every operation that worked
    cleared `trouble`, the next failing one set it again: health flapped between 'store unavailable' and
    fine, two log lines a second, and telemetry went on being written to a WAL the next start moves aside.
    Damage (SQLITE_NOTADB, SQLITE_CORRUPT) now lasts until a restart: writes are refused, and the watchdog
    is told (a restart's recovery mends it)."""
    svc, backend, db, stopped = running
    plan = {"name": "pt", "version": 1, "signals": [{"component": "engine", "data": ["engine_speed"],
                                                     "every_ms": 100}],
            "batch": {"max_age_ms": 300, "max_samples": 50}}
    backend.publish_plan("pt", plan)  # telemetry batches: writes several times a second
    try:
        backend.wait_for(lambda s: s.topic == f"{backend.topics.base}/telemetry", 15)
        with caplog.at_level(logging.INFO, logger="agent.store.group"):
            garble_wal(db)
            assert wait_until(lambda: svc.store.trouble is not None, 10)  # the outbox's next read fails
            writes = svc.store.writes
            for _ in range(4):
                beat = svc.outbox.heartbeat
                assert wait_until(lambda b=beat: svc.outbox.heartbeat > b, 10)
                assert svc.store.trouble is not None, caplog.text[-1500:]
            lines = [r.getMessage() for r in caplog.records if r.name == "agent.store.group"]
        assert svc.store.writes == writes  # nothing more written to the damaged store
        assert len([line for line in lines if line.startswith("store failing")]) == 1, lines
        assert not [line for line in lines if line.startswith("store works again")], lines
        assert any("store damaged" in problem for problem in svc.wedged()), svc.wedged()
    finally:  # the agent stopped first: a removal it took while stopping logged onto a closed test stream
        svc.stop()
        stopped.append(True)
        backend.publish_plan("pt", None)
