"""The store under storage trouble, on a real SQLite file: SQLite's own error comes out (never one from
a ROLLBACK after it), it is counted, `trouble` says so until a write works again, deferred writes land
then; and the byte bounds of the ledger and the outbox.

A full disk is made two ways: `PRAGMA max_page_count` lets SQLite itself answer SQLITE_FULL (a real
error from SQLite's own code path, no mock), and a small tmpfs (in test_intake_isolation.py).
"""

import time

import pytest

from agent.store.sqlite import Entry, Outgoing, Store, StoreError


def entry(command_id, state="queued", body=None, final=None):
    return Entry(command_id, state, body if body is not None else {"id": command_id, "pad": "x" * 200},
                 f"r/{command_id}", None, 1.0, None, 1, final)


def fill_up(store: Store) -> None:
    """No page beyond the ones the database has now: the next write that needs one gets SQLITE_FULL."""
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def free_up(store: Store) -> None:
    store._db.execute("PRAGMA max_page_count = 1073741823")


def big_batch(store: Store, prefix: str, n: int = 50):
    batch = store.batch()
    for i in range(n):
        batch.add_command(entry(f"{prefix}-{i}"))
        batch.publish(Outgoing("t", b"y" * 2000, None, f"{prefix}-{i}"))
    return batch


def test_a_full_disk_is_reported_as_sqlite_full_and_counted(tmp_path):
    errors = []
    store = Store(tmp_path / "agent.db", on_error=errors.append)
    fill_up(store)
    with pytest.raises(StoreError) as info:
        big_batch(store, "a").commit()
    err = info.value
    assert err.code == "SQLITE_FULL" and err.unavailable and err.operation == "write"
    assert "database or disk is full" in str(err)  # SQLite's error, not "cannot rollback"
    assert errors == [err] and store.errors == {"write": 1}
    assert store.trouble is not None and "SQLITE_FULL" in store.trouble.error
    assert store.get("a-0") is None  # nothing of the failed batch landed
    free_up(store)
    big_batch(store, "b").commit()
    assert store.trouble is None and store.get("b-49") is not None
    store.close()


def test_a_bad_row_fails_alone_and_is_not_storage_trouble(tmp_path):
    store = Store(tmp_path / "agent.db")
    batch = store.batch()
    batch.add_command(entry("same"))
    batch.add_command(entry("same"))
    with pytest.raises(StoreError) as info:
        batch.commit()
    assert not info.value.unavailable and info.value.code.startswith("SQLITE_CONSTRAINT")
    assert store.trouble is None and store.errors == {"write": 1}
    store.close()


def test_deferred_writes_land_once_the_store_takes_writes_again(tmp_path):
    store = Store(tmp_path / "agent.db")
    seeded = store.batch()
    seeded.add_command(entry("c-1"))
    seeded.commit()
    fill_up(store)
    final = store.batch()
    final.publish(Outgoing("r/c-1", b"z" * 20_000, None, "c-1"))
    final.set_state("c-1", "final", seq=2, final_message={"status": "completed"})
    with pytest.raises(StoreError):
        final.commit(defer=True)
    assert store.deferred == 1 and store.get("c-1").state == "queued"
    with pytest.raises(StoreError):
        store.retry_deferred()  # still full: still waiting
    assert store.deferred == 1
    free_up(store)
    store.acknowledge([12345])  # any write stores what waited first (a delete rides the next commit:
    store.flush()               # this one, made now)
    assert store.deferred == 0 and store.get("c-1").state == "final"
    assert [p.message.payload[:1] for p in store.pending(0, 10)] == [b"z"]
    store.close()


def test_a_finished_command_keeps_its_id_and_outcome_not_its_body(tmp_path):
    store = Store(tmp_path / "agent.db")
    batch = store.batch()
    batch.add_command(entry("c-1", body={"id": "c-1", "params": {"pad": "x" * 50_000}}))
    batch.commit()
    before = store.ledger_bytes()
    batch.set_state("c-1", "final", seq=2, final_message={"status": "rejected"})
    batch.commit()
    kept = store.get("c-1")
    assert kept.body == {} and kept.final_message == {"status": "rejected"} and kept.seq == 2
    assert before > 50_000 > store.ledger_bytes()
    batch.forget("c-1")
    batch.commit()
    assert store.get("c-1") is None
    store.close()


def test_ledger_byte_bound_forgets_the_oldest_finished_ids_never_unfinished_ones(tmp_path):
    store = Store(tmp_path / "agent.db")
    for i in range(40):
        batch = store.batch()
        batch.add_command(entry(f"f-{i:02d}", state="final", body={}, final={"r": "x" * 1000}))
        batch.commit()
        time.sleep(0.001)  # distinct updated_at: an order to forget in
    batch = store.batch()
    batch.add_command(entry("running", state="started", body={"pad": "y" * 30_000}))
    batch.commit()
    total = store.ledger_bytes()
    assert total > 70_000
    forgotten = store.trim_ledger_bytes(40_000, time.time()).forgotten
    assert store.ledger_bytes() <= 40_000 and forgotten >= 30
    assert store.get("running") is not None  # unfinished: never forgotten
    assert store.get("f-39") is not None and store.get("f-00") is None  # the oldest went first
    trimmed = store.trim_ledger_bytes(10, time.time())
    assert trimmed.forgotten == 40 - forgotten and store.get("running") is not None
    assert trimmed.over_bound  # what it must hold alone is over the bound: said so
    store.close()


def test_outbox_byte_bound_drops_the_oldest(tmp_path):
    store = Store(tmp_path / "agent.db")
    batch = store.batch()
    for i in range(20):
        batch.publish(Outgoing("t", bytes([i]) * 10_000))
    batch.commit()
    assert store.trim_outbox_bytes(55_000) == 15
    assert [p.message.payload[0] for p in store.pending(0, 100)] == [15, 16, 17, 18, 19]
    assert store.trim_outbox_bytes(55_000) == 0
    store.close()


def finished(store: Store, command_id: str, status: str, keep_until: float | None = None, pad: int = 1000,
             signer: str | None = None) -> None:
    """A command recorded (with how long a resend could still be accepted) and then finished with `status`."""
    batch = store.batch()
    batch.add_command(Entry(command_id, "queued", {"id": command_id}, f"r/{command_id}", None, 1.0, keep_until, 1,
                            None, signer=signer, keep_until=keep_until))
    batch.set_state(command_id, "final", seq=2, final_message={"status": status, "pad": "x" * pad})
    batch.commit()
    time.sleep(0.001)  # distinct updated_at: an order to forget in


def test_ledger_byte_bound_never_forgets_a_command_that_ran_and_could_still_be_accepted(tmp_path):
    """Review defect: flooding the ledger forgot a signed command's id inside its expires_at window, and the
    captured envelope ran again. What ran and could still be accepted is held until its expiry has passed."""
    store = Store(tmp_path / "agent.db")
    wall = 1_000_000.0
    finished(store, "signed-ran", "completed", keep_until=wall + 600)
    finished(store, "signed-ran-expired", "completed", keep_until=wall - 1)
    finished(store, "signed-rejected", "rejected", keep_until=wall + 600)  # never ran: nothing to replay
    for i in range(60):
        finished(store, f"flood-{i:02d}", "rejected")
    trimmed = store.trim_ledger_bytes(64 * 1024 // 4, wall)
    assert trimmed.forgotten >= 45 and store.ledger_bytes() <= 64 * 1024 // 4 and not trimmed.over_bound
    assert store.get("signed-rejected") is None  # the oldest that never ran went first
    assert store.get("signed-ran") is not None and store.get("signed-ran-expired") is not None
    trimmed = store.trim_ledger_bytes(10, wall)
    assert trimmed.over_bound and store.get("signed-ran") is not None  # held, and said so
    assert store.get("signed-ran-expired") is None  # its expiry has passed: an ordinary finished id
    assert store.trim_ledger_bytes(10, None).forgotten == 0  # a clock that cannot be trusted judges no expiry
    assert store.trim_ledger_bytes(10, wall + 601).forgotten == 1 and store.get("signed-ran") is None
    store.close()


def test_a_signed_command_that_expired_before_it_ran_is_held_until_its_signed_expiry(tmp_path):
    """Review defect: a signed command accepted with expires_at 10 min ahead and an MQTT Message Expiry
    Interval of 30 s (outside the signature) waited in its component's queue and ended `expired`. As a
    command that never ran, the byte bound forgot it first; a flood of plain reads (allowed unsigned under
    `mutating`) pushes the ledger over its bound, and the captured envelope, replayed without the expiry
    interval, then ran: after the backend was told it expired (and had likely sent it again under a new id).
    A signed id is held until its signed expiry whatever its end; unsigned ones that never ran go first."""
    store = Store(tmp_path / "agent.db")
    wall = 1_000_000.0
    finished(store, "signed-expired", "expired", keep_until=wall + 600, signer="backend-1")
    finished(store, "signed-rejected", "rejected", keep_until=wall + 600, signer="backend-1")
    finished(store, "plain-expired", "expired", keep_until=wall + 600)  # a replay is no attack: anyone may send it
    for i in range(60):
        finished(store, f"flood-{i:02d}", "completed")
    trimmed = store.trim_ledger_bytes(64 * 1024 // 4, wall)
    assert trimmed.forgotten >= 45 and not trimmed.over_bound
    assert store.get("plain-expired") is None
    assert store.get("signed-expired") is not None and store.get("signed-rejected") is not None
    assert store.prune_ledger(0.0, time.time() + 10, wall) >= 1
    assert store.get("signed-expired") is not None  # retention holds it too
    assert store.trim_ledger_bytes(10, wall + 601).forgotten >= 2 and store.get("signed-expired") is None
    store.close()


def test_ledger_byte_bound_forgets_ids_that_never_ran_before_ids_that_ran(tmp_path):
    store = Store(tmp_path / "agent.db")
    finished(store, "ran-old", "completed")
    finished(store, "ran-failed", "failed")
    finished(store, "rejected-new", "rejected")
    finished(store, "expired-new", "expired")  # never started either
    finished(store, "ran-new", "completed")
    per_row = store.ledger_bytes() // 5
    trimmed = store.trim_ledger_bytes(per_row * 3 + per_row // 2, 0.0)
    assert trimmed.forgotten == 2
    assert [cid for cid in ("ran-old", "ran-failed", "rejected-new", "expired-new", "ran-new")
            if store.get(cid) is not None] == ["ran-old", "ran-failed", "ran-new"]
    assert store.trim_ledger_bytes(per_row * 2 + per_row // 2, 0.0).forgotten == 1
    assert store.get("ran-old") is None and store.get("ran-failed") is not None  # then the oldest that ran
    store.close()


def test_what_the_bound_must_hold_beyond_it_is_reported_not_forgotten(tmp_path):
    store = Store(tmp_path / "agent.db")
    for i in range(10):
        finished(store, f"held-{i}", "completed", keep_until=500.0)
    trimmed = store.trim_ledger_bytes(1000, 100.0)
    assert trimmed.forgotten == 0 and trimmed.over_bound and trimmed.held_bytes == store.ledger_bytes() > 1000
    assert store.prune_ledger(0, time.time() + 10, 100.0) == 0  # retention does not forget them either
    assert store.prune_ledger(0, time.time() + 10, 501.0) == 10
    store.close()


def test_writes_refused_by_a_damaged_store_are_not_kept(tmp_path):
    """A store SQLite found damaged refuses every later write with its latched error. Raised again and again,
    that one exception's traceback grew by a frame per refused commit round, and each frame held that
    round's writes (their statements, payloads): an agent left damaged (no watchdog to restart it) kept
    every telemetry batch and final it refused, for ever. A real SQLITE_NOTADB: the WAL garbled under it."""
    import gc
    import os

    from agent.store.writer import Write

    db = tmp_path / "agent.db"
    store = Store(db)
    try:
        seeded = store.batch()
        seeded.add_command(entry("c-0"))
        seeded.commit()
        wal = db.with_name(db.name + "-wal")
        with wal.open("r+b") as f:
            f.write(os.urandom(wal.stat().st_size))
        with pytest.raises(StoreError):
            store.get("c-0")
        assert store.damaged is not None
        gc.collect()
        before = {id(o) for o in gc.get_objects() if isinstance(o, Write)}  # other tests' are not this one's
        for i in range(20):
            refused = big_batch(store, f"r{i}", 5)
            with pytest.raises(StoreError) as caught:
                refused.commit()
            assert caught.value.code == "SQLITE_NOTADB"  # still the damage's own error, as SQLite named it
        del refused, caught
        gc.collect()
        kept = [o for o in gc.get_objects() if isinstance(o, Write) and id(o) not in before]
        assert kept == [], f"{len(kept)} refused writes still referenced"
    finally:
        store.damaged = None
        store.close()
