"""The audit log file and trail on their own: records, rotation by size, a damaged last line after a power
loss, a disk that refuses writes (a real /dev/full), and the `audit` Events that go with each record."""

import json
import os

import pytest
from conftest import DATA
from mqtt_support import VALIDATORS

from agent.config import load_config
from agent.fleet.topics import Topics
from agent.store.audit import AUDIT_FILE, AuditLog, read_records
from agent.store.sqlite import Entry, Store
from agent.system.audit import AuditTrail, AuditUnavailableError
from agent.wire.command import Command, ErrorCode, Outcome, Reset, Result, Status


def test_records_are_lines_of_json(tmp_path):
    log = AuditLog(tmp_path, max_bytes=1 << 20, keep=2)
    assert log.open() is None
    log.append({"phase": "started", "id": "a", "params": {"value": "é"}})
    log.append({"phase": "finished", "id": "a"})
    log.close()
    assert read_records(tmp_path / AUDIT_FILE) == [{"phase": "started", "id": "a", "params": {"value": "é"}},
                                                  {"phase": "finished", "id": "a"}]
    assert (tmp_path / AUDIT_FILE).stat().st_mode & 0o777 == 0o640


def test_rotation_by_size_keeps_n_files_and_every_record_whole(tmp_path):
    log = AuditLog(tmp_path, max_bytes=1000, keep=3)
    log.open()
    for n in range(100):
        log.append({"n": n, "pad": "x" * 80})
    log.close()
    files = log.files()
    assert [f.name for f in files] == [AUDIT_FILE, f"{AUDIT_FILE}.1", f"{AUDIT_FILE}.2", f"{AUDIT_FILE}.3"]
    assert all(f.stat().st_size <= 1000 for f in files)
    kept = [r["n"] for f in reversed(files) for r in read_records(f)]
    assert kept == list(range(100 - len(kept), 100))  # newest kept, in order, nothing torn
    assert not (tmp_path / f"{AUDIT_FILE}.4").exists()


def test_reopening_after_a_restart_appends(tmp_path):
    for n in range(3):
        log = AuditLog(tmp_path, max_bytes=1 << 20, keep=2)
        assert log.open() is None
        log.append({"n": n})
        log.close()
    assert [r["n"] for r in read_records(tmp_path / AUDIT_FILE)] == [0, 1, 2]


def test_truncated_last_line_is_reported_kept_and_closed(tmp_path):
    (tmp_path / AUDIT_FILE).write_bytes(b'{"n": 0}\n{"n": 1, "par')  # power lost mid-write
    log = AuditLog(tmp_path, max_bytes=1 << 20, keep=2)
    damage = log.open()
    assert (damage.kind, damage.bytes) == ("truncated", len(b'{"n": 1, "par'))
    log.append({"n": 2})
    log.close()
    assert read_records(tmp_path / AUDIT_FILE) == [{"n": 0}, None, {"n": 2}]
    assert b'{"n": 1, "par\n' in (tmp_path / AUDIT_FILE).read_bytes()  # the evidence stays


def test_unreadable_last_line_is_reported(tmp_path):
    (tmp_path / AUDIT_FILE).write_bytes(b'{"n": 0}\n\x00\x00\x00\x00\n')
    damage = AuditLog(tmp_path, max_bytes=1 << 20, keep=2).open()
    assert (damage.kind, damage.bytes) == ("unreadable", 5)


def test_a_disk_that_refuses_writes_raises(tmp_path):
    os.symlink("/dev/full", tmp_path / AUDIT_FILE)
    log = AuditLog(tmp_path, max_bytes=1 << 20, keep=2)
    assert log.open() is None
    with pytest.raises(OSError):
        log.append({"n": 0})
    with pytest.raises(OSError):  # and again: nothing pretends to have written it
        log.append({"n": 1})
    log.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_file_deleted_or_replaced_while_open_is_noticed_and_a_fresh_one_written(tmp_path, caplog, how):
    """Review defect: after `rm audit.jsonl` the records went to the unlinked inode, silently. Before each
    record the open file is compared with the path; a file gone or replaced is reopened, logged, counted."""
    lost = []
    log = AuditLog(tmp_path, max_bytes=1 << 20, keep=2, on_lost=lost.append)
    log.open()
    log.append({"n": 0})
    path = tmp_path / AUDIT_FILE
    if how == "deleted":
        path.unlink()
    else:  # moved away by hand (or a logrotate that is not told) and a new file put in its place
        path.rename(tmp_path / "moved")
        path.write_bytes(b'{"n": "other"}\n')
    with caplog.at_level("ERROR", logger="agent.store.audit"):
        log.append({"n": 1})  # on the disk, in the file the path names, before append returns
    assert read_records(path)[-1] == {"n": 1} and {"n": 0} not in read_records(path)
    assert lost == [how] and [r.levelname for r in caplog.records] == ["ERROR"]
    log.append({"n": 2})
    assert lost == [how] and read_records(path)[-2:] == [{"n": 1}, {"n": 2}]
    log.close()


def test_a_rotation_by_another_writer_is_followed_quietly(tmp_path):
    """`sovd-edge uds` may rotate the file the daemon has open: not a loss, the daemon follows it."""
    lost = []
    daemon = AuditLog(tmp_path, max_bytes=200, keep=2, on_lost=lost.append)
    daemon.open()
    daemon.append({"n": 0, "pad": "x" * 100})
    local = AuditLog(tmp_path, max_bytes=200, keep=2)
    local.open()
    local.append({"n": 1, "pad": "x" * 100})  # over 200 bytes: rotates
    local.close()
    daemon.append({"n": 2})
    daemon.close()
    assert lost == [] and [r["n"] for r in read_records(tmp_path / AUDIT_FILE)] == [1, 2]
    assert [r["n"] for r in read_records(tmp_path / f"{AUDIT_FILE}.1")] == [0]


# ---- the trail: what each mutating command leaves, in the file and in the outbox ------------------------

@pytest.fixture
def trail(tmp_path):
    config = load_config(DATA / "vehicle.yaml")
    config = config.__class__(**{**config.__dict__, "state_dir": tmp_path})
    store = Store(tmp_path / "agent.db")
    damaged, errors = [], []
    trail = AuditTrail(config, Topics("sovd", "V1"), store.get, on_damage=damaged.append,
                       on_error=lambda: errors.append(1))
    yield trail, store, damaged, errors
    trail.close()
    store.close()


def entry(command_id, state="started", signer="backend-1", command="reset"):
    return Entry(command_id, state, {"id": command_id, "component": "engine", "command": command,
                                     "params": {"type": "soft"}}, "r", None, 1.0, None, 1, None, signer)


def events(store):
    found = [json.loads(p.message.payload) for p in store.pending(0, 100)]
    for event in found:
        assert not list(VALIDATORS["Event"].iter_errors(event)), event
    return found


def test_started_and_finished_records_and_events(trail):
    audit, store, _, _ = trail
    audit.open(store.batch())
    batch = store.batch()
    batch.add_command(entry("c-1", state="queued"))
    batch.commit()
    command = Command("c-1", "engine", "reset", Reset(1), 1.0)
    batch = store.batch()
    audit.started(command, batch)
    batch.commit()
    result = Result("c-1", "engine", "reset", Outcome.failure(Status.FAILED, ErrorCode.NEGATIVE_RESPONSE, "NRC 0x22"),
                    1.0, 2.0, 2.5)
    batch = store.batch()
    audit.finished(entry("c-1"), result, batch)
    batch.commit()
    started, finished = read_records(audit.log.path)
    assert started["phase"] == "started" and started["who"] == "backend-1" and started["params"] == {"type": "soft"}
    assert (finished["phase"], finished["status"], finished["error"]["code"], finished["duration_ms"]) == \
        ("finished", "failed", "negative_response", 500)
    assert [(e["type"], e["phase"]) for e in events(store)] == [("audit", "started"), ("audit", "finished")]


def test_reads_and_commands_that_never_started_leave_nothing(trail):
    audit, store, _, _ = trail
    audit.open(store.batch())
    batch = store.batch()
    audit.started(Command("r-1", "engine", "read_data", Reset(1), 1.0), batch)
    never = Result("c-2", "engine", "reset", Outcome.failure(Status.REJECTED, ErrorCode.BUSY, "full"), 1.0, None, 2.0)
    audit.finished(entry("c-2", state="queued"), never, batch)
    batch.commit()
    assert read_records(audit.log.path) == [] and events(store) == []


def test_unsigned_commands_are_recorded_as_unsigned(trail):
    audit, store, _, _ = trail
    audit.open(store.batch())
    batch = store.batch()
    batch.add_command(entry("c-3", state="queued", signer=None))
    batch.commit()
    audit.started(Command("c-3", "engine", "reset", Reset(1), 1.0), store.batch())
    assert read_records(audit.log.path)[0]["who"] == "unsigned"


def test_damage_is_evented_counted_and_recorded_once(trail, tmp_path):
    audit, store, damaged, _ = trail
    (tmp_path / AUDIT_FILE).write_bytes(b'{"n": 0}\n{"n": 1')
    batch = store.batch()
    assert audit.open(batch).kind == "truncated"
    batch.commit()
    assert [e["type"] for e in events(store)] == ["audit_log_damaged"] and len(damaged) == 1
    assert read_records(audit.log.path)[-1]["phase"] == "damaged"
    audit.close()
    assert audit.open(store.batch()) is None  # the next start does not report it again


def test_a_start_that_cannot_be_recorded_raises_and_is_counted(trail, tmp_path):
    audit, store, _, errors = trail
    os.symlink("/dev/full", tmp_path / AUDIT_FILE)
    audit.open(store.batch())
    with pytest.raises(AuditUnavailableError, match="cannot be written"):
        audit.started(Command("c-4", "engine", "reset", Reset(1), 1.0), store.batch())
    result = Result("c-4", "engine", "reset", Outcome.completed(), 1.0, 1.5, 2.0)
    batch = store.batch()
    audit.finished(entry("c-4"), result, batch)  # an outcome that cannot be written is logged, never raised
    batch.commit()
    assert len(errors) == 2 and [e["phase"] for e in events(store)] == ["finished"]
