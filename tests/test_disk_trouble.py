"""The agent's state dir under real disk trouble, while it runs: its database file garbled, deleted or
truncated under it, its WAL overwritten. Every case is made on real files (no mock): what SQLite and the
kernel answer is what the agent meets on a failing SD card or at an operator's `rm`.

Promised: the store's failure is `storage_unavailable` for commands (spec rev 1.1), a metric and a log
line naming the path; nothing is acknowledged that was not recorded; a clean stop stays clean.
"""

from __future__ import annotations

import logging
import os
import uuid

import pytest

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
