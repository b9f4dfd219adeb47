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
