"""Upgrade and rollback: a store written by an older agent opened by this one (its commands run once, its
finals are remembered, its outbox goes out), and a store written by a newer agent refused with a clear error.

The older stores are built with the exact tables and statements of the older agents (copied from the
history of agent/store: the first agent's store, and the one just before `keep_until`), on a real
SQLite file, then opened by this agent's real Service on the real broker and simulator.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agent.fleet.caller import Caller
from agent.store.schema import SCHEMA_VERSION, NewerStoreError
from agent.store.sqlite import Store
from agent.system.service import Service
from agent.wire import messages as m
from agent.wire.command import Outcome, Result

ROOT = Path(__file__).parent.parent

# The first agent's store (agent/mqtt/store.py of the first MQTT link): no signer, no keep_until, no refused.
FIRST_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('queued', 'started', 'final')),
    body TEXT NOT NULL,
    reply_topic TEXT NOT NULL,
    correlation BLOB,
    received_at REAL NOT NULL,
    expires_at REAL,
    seq INTEGER NOT NULL DEFAULT 0,
    final_message TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_state ON ledger (state, updated_at);
CREATE TABLE IF NOT EXISTS outbox (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    correlation BLOB,
    created_at REAL NOT NULL
);
"""
# The agent with signed commands but before `keep_until` (agent/store/sqlite.py before the byte bound held
# unexpired ids): the signer column, the refused and fault_sets tables.
SIGNER_SCHEMA = FIRST_SCHEMA.replace("updated_at REAL NOT NULL\n);",
                                     "updated_at REAL NOT NULL,\n    signer TEXT\n);") + """
CREATE TABLE IF NOT EXISTS refused (
    n INTEGER PRIMARY KEY,
    command_id TEXT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    correlation BLOB,
    created_at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fault_sets (
    component TEXT NOT NULL,
    dtc INTEGER NOT NULL,
    status INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (component, dtc)
);
"""


def old_store(path: Path, schema: str) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(schema)
    return db


def add_command(db: sqlite3.Connection, cid: str, state: str, body: dict, reply_topic: str,
                final: dict | None = None, expires_at: float | None = None, signer: str | None = None) -> None:
    """As the older agents' Batch.add_command and set_state wrote a row (a final kept its body then)."""
    now = time.time()
    columns = "id, state, body, reply_topic, correlation, received_at, expires_at, seq, final_message, updated_at"
    values = [cid, state, json.dumps(body), reply_topic, None, now, expires_at, 2 if final else 0,
              json.dumps(final) if final else None, now]
    if signer is not None:
        columns += ", signer"
        values.append(signer)
    db.execute(f"INSERT INTO ledger ({columns}) VALUES ({', '.join('?' * len(values))})", values)


def read_vin(cid: str) -> dict:
    return {"id": cid, "component": "engine", "command": "read_data", "params": {"data": "vin"}}


def final_of(cid: str) -> dict:
    now = time.time()
    result = Result(cid, "engine", "read_data", Outcome.completed({"vin": {"value": "OLDVIN", "raw": "00"}}),
                    now - 1, now - 1, now)
    return m.response_message(result, seq=2)


@pytest.mark.parametrize("schema", [FIRST_SCHEMA, SIGNER_SCHEMA], ids=["first-agent", "before-keep-until"])
def test_an_older_agents_store_runs_its_queued_command_once_and_remembers_its_finals(mqtt_vehicle, sim,
                                                                                      backend: Caller, schema):
    state = mqtt_vehicle.state_dir
    topics = backend.topics
    ids = {name: f"old-{name}-{uuid.uuid4().hex[:6]}" for name in ("queued", "started", "final", "unsent")}
    db = old_store(state / "agent.db", schema)
    add_command(db, ids["queued"], "queued", read_vin(ids["queued"]), topics.responses(ids["queued"]))
    add_command(db, ids["started"], "started", read_vin(ids["started"]), topics.responses(ids["started"]))
    add_command(db, ids["final"], "final", read_vin(ids["final"]), topics.responses(ids["final"]),
                final=final_of(ids["final"]))
    unsent = final_of(ids["unsent"])
    add_command(db, ids["unsent"], "final", read_vin(ids["unsent"]), topics.responses(ids["unsent"]), final=unsent)
    db.execute("INSERT INTO outbox (command_id, topic, payload, correlation, created_at) VALUES (?, ?, ?, ?, ?)",
               (ids["unsent"], topics.responses(ids["unsent"]), m.encode(unsent), None, time.time()))
    db.close()

    svc = Service(mqtt_vehicle)
    svc.start()
    try:
        assert backend.final(ids["queued"])["status"] == "completed"
        assert backend.final(ids["started"])["status"] == "interrupted"
        assert backend.final(ids["unsent"]) == unsent  # the old outbox row goes out as it was stored
        backend.send(read_vin(ids["final"]))  # the backend resends a command the old agent finished
        again = backend.wait_for(lambda s: s.topic == topics.responses(ids["final"]), 10)[0].json()
        assert again["duplicate"] is True and again["status"] == "completed"
    finally:
        svc.stop()
    svc = Service(mqtt_vehicle)  # and a second start of the new agent sends none of it again
    svc.start()
    try:
        assert svc.link.wait_connected(10)
        backend.send(read_vin("probe-" + ids["queued"]))
        backend.final("probe-" + ids["queued"])
    finally:
        svc.stop()
    for name in ("queued", "started", "unsent"):
        finals = [r for r in backend.replies(ids[name]) if r.get("final") and not r.get("duplicate")]
        assert len(finals) == 1, (name, finals)


def test_an_older_agents_signed_command_that_ran_keeps_its_id_as_this_agents_would(tmp_path):
    """A store of the agent before `keep_until`: a signed command that ran and whose signed expiry has not
    passed must not be forgotten by the byte bound after the upgrade (its captured envelope would run again)."""
    path = tmp_path / "agent.db"
    db = old_store(path, SIGNER_SCHEMA)
    cid = "old-signed"
    add_command(db, cid, "final", {}, "replies/x", final=final_of(cid), expires_at=time.time() + 3000,
                signer="fleet-key")
    add_command(db, "old-plain", "final", {}, "replies/x", final=final_of("old-plain"))
    db.close()
    store = Store(path)
    try:
        trim = store.trim_ledger_bytes(1, time.time())
        assert store.get(cid) is not None and trim.over_bound
        assert store.get("old-plain") is None  # an unsigned one without a hold goes, as it always did
        assert store.prune_ledger(60, time.time() + 86400, time.time()) == 0  # nor does retention forget it
    finally:
        store.close()


def newer_store(path: Path, version: int | None = None, extra_column: bool = False) -> None:
    """A store this agent wrote, then touched the way a newer agent might: a column of its own, its version."""
    store = Store(path)
    store.close()
    db = sqlite3.connect(path, isolation_level=None)
    if extra_column:
        db.execute("ALTER TABLE ledger ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
    if version is not None:
        db.execute(f"PRAGMA user_version = {version}")
    db.close()


def test_a_newer_agents_extra_ledger_column_does_not_break_reading_the_ledger(tmp_path):
    path = tmp_path / "agent.db"
    newer_store(path, extra_column=True)
    db = sqlite3.connect(path, isolation_level=None)
    add_command(db, "newer-queued", "queued", read_vin("newer-queued"), "replies/x")
    db.close()
    store = Store(path)
    try:
        assert [e.id for e in store.entries("queued")] == ["newer-queued"]
        assert store.get("newer-queued").body == read_vin("newer-queued")
    finally:
        store.close()


def test_a_store_stamped_by_this_agent_carries_its_schema_version(tmp_path):
    path = tmp_path / "agent.db"
    Store(path).close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    newer_store(path, version=0)  # a store of an agent before the version: brought up to it
    Store(path).close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_store_of_a_newer_agent_is_refused_untouched(tmp_path):
    path = tmp_path / "agent.db"
    newer_store(path, version=SCHEMA_VERSION + 1)
    before = path.read_bytes()
    with pytest.raises(NewerStoreError) as raised:
        Store(path)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(raised.value) and str(path) in str(raised.value)
    assert path.read_bytes() == before  # never migrated, moved aside or written


def test_sovd_edge_run_exits_65_without_a_traceback_on_a_newer_agents_store(tmp_path):
    """A rollback onto a store a newer agent wrote: one clear line and EX_DATAERR, which the unit does not
    restart on (a restart cannot help; installing the newer agent again, or moving the store aside, does)."""
    from mqtt_support import daemon_files

    config = daemon_files(tmp_path, "mqtt://127.0.0.1:1", "VROLLBACK", "rollback")
    state = tmp_path / "state"
    newer_store(state / "agent.db", version=SCHEMA_VERSION + 1)
    done = subprocess.run([sys.executable, "-m", "agent", "run", "-c", str(config), "--state-dir", str(state)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 65, done.stderr
    assert "newer agent" in done.stderr and "Traceback" not in done.stderr


def test_doctor_fails_on_a_newer_agents_store_and_passes_an_older_ones(tmp_path):
    from agent.system.doctor import FAIL, OK, store_check

    newer_store(tmp_path / "newer" / "agent.db", version=SCHEMA_VERSION + 1)
    check = store_check(tmp_path / "newer")
    assert check.result == FAIL and "newer agent" in check.detail and "65" in check.detail
    old_store(tmp_path / "older" / "agent.db", FIRST_SCHEMA).close()
    assert store_check(tmp_path / "older").result == OK


def test_a_plan_an_older_agent_stored_collects_after_the_upgrade_and_its_batch_numbers_carry_on(mqtt_vehicle, sim,
                                                                                                 backend: Caller):
    """The collection tables have not changed since they came (agent/store/collection.py): a plan the agent
    before `keep_until` applied and stored, with its batch number, collects under this one without the broker
    sending it again."""
    from agent.store.collection import SCHEMA as COLLECTION_SCHEMA

    db = old_store(mqtt_vehicle.state_dir / "agent.db", SIGNER_SCHEMA)
    for statement in COLLECTION_SCHEMA:
        db.execute(statement)
    body = {"name": "kept", "version": 4, "signals": [{"component": "engine", "data": ["engine_speed"],
                                                      "every_ms": 100}],
            "batch": {"max_age_ms": 300, "max_samples": 50}}
    db.execute("INSERT INTO plans (name, version, body, seq, updated_at) VALUES (?, ?, ?, ?, ?)",
               ("kept", 4, json.dumps(body), 41, time.time()))
    db.close()
    svc = Service(mqtt_vehicle)
    svc.start()
    try:
        topic = f"{backend.topics.base}/telemetry"
        batch = backend.wait_for(lambda s: s.topic == topic, 15)[0].json()
        assert batch["plan"] == "kept" and batch["version"] == 4 and batch["seq"] == 42
    finally:
        svc.stop()


def test_a_store_at_this_version_missing_a_table_gets_it_at_open(tmp_path):
    """schema.py lets an agent add a table (or a column) an older agent may ignore without raising
    SCHEMA_VERSION: the newer agent then meets a store stamped with its own version that lacks it. Opening
    it must create what is missing, or every use of that table fails for the agent's whole life."""
    path = tmp_path / "agent.db"
    Store(path).close()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP TABLE fault_sets")  # as an agent of this version before fault_sets left it
    db.execute("ALTER TABLE ledger DROP COLUMN keep_until")
    db.close()
    store = Store(path)
    try:
        assert store.fault_set("engine") == {}
        assert "keep_until" in {row[1] for row in store.read(
            "test", lambda db: db.execute("PRAGMA table_info(ledger)").fetchall())}
    finally:
        store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_complete_store_at_this_version_opens_read_only(tmp_path):
    """The check for what is missing only reads: a complete store of this version is opened without a
    write (a read-only store fails at its first write, not at open, as before versions)."""
    path = tmp_path / "agent.db"
    Store(path).close()
    before = path.read_bytes()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    from agent.store.schema import migrate
    migrate(db, str(path))  # raises "attempt to write a readonly database" if it tried to write
    db.close()
    assert path.read_bytes() == before


@pytest.mark.parametrize("version", [-1, -(2 ** 31)])
def test_doctor_reads_a_negative_user_version_as_run_does(tmp_path, version):
    """PRAGMA user_version is a signed 32-bit integer. `run` brings a store with a negative one up to its
    version (it is not above SCHEMA_VERSION); doctor read the header's bytes unsigned and said a newer agent
    wrote it (4294967295) and that run exits 65, which it does not."""
    from agent.system.doctor import FAIL, store_check

    newer_store(tmp_path / "agent.db", version=version)
    check = store_check(tmp_path)
    assert check.result != FAIL, check.detail
    Store(tmp_path / "agent.db").close()  # and run indeed opens it


def test_doctor_sees_a_newer_agents_version_still_in_the_wal(tmp_path):
    """A newer agent stamped its version and the device lost power (or it was killed) before a checkpoint
    copied page 1 back into the database file: the header doctor reads still says this agent's version, but
    SQLite reads the WAL too, and run refuses the store with 65. Doctor said OK. The WAL's last committed
    page 1 is the store's header."""
    from agent.system.doctor import FAIL, store_check

    path = tmp_path / "agent.db"
    Store(path).close()
    newer = sqlite3.connect(path, isolation_level=None)  # held open: nothing checkpoints its WAL
    newer.execute("PRAGMA wal_autocheckpoint=0")
    newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    try:
        assert path.with_name("agent.db-wal").stat().st_size > 0
        check = store_check(tmp_path)
        assert check.result == FAIL and f"schema version {SCHEMA_VERSION + 1}" in check.detail, check.detail
        with pytest.raises(NewerStoreError):
            Store(path)  # as run finds it
    finally:
        newer.close()
