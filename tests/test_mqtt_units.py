"""Pure pieces of the fleet link and the SQLite store, on a temp-dir database."""

import json
import time

import pytest

from agent.fleet.topics import Topics, is_publishable
from agent.store.sqlite import Entry, Outgoing, Store
from agent.wire import messages as m
from agent.wire.decode import Undecodable, decode_command, readable_id


def test_topics_built_in_one_place():
    t = Topics("sovd", "VIN1")
    assert (t.commands, t.status, t.events, t.responses("c-1")) == (
        "sovd/VIN1/commands", "sovd/VIN1/status", "sovd/VIN1/events", "sovd/VIN1/responses/c-1")
    assert is_publishable("replies/x") and not is_publishable("a/+/b") and not is_publishable("a/#")
    assert not is_publishable("")


@pytest.mark.parametrize(("payload", "reason", "command_id"), [
    (b"nope", "not JSON", None),
    (b"\xff\xfe", "not UTF-8", None),
    (b"[1]", "JSON list, not an object", None),
    (json.dumps({"id": "big", "pad": "x" * 70000}).encode(), "limit is 65536", "big"),
    (json.dumps({"id": "bad id", "pad": "x" * 70000}).encode(), "limit is 65536", None),
])
def test_decode_command_failures(payload, reason, command_id):
    result = decode_command(payload)
    assert isinstance(result, Undecodable) and reason in result.reason and result.command_id == command_id


def test_decode_command_ok_and_readable_id():
    body = decode_command(b'{"id": "c-1", "x": 1}')
    assert body == {"id": "c-1", "x": 1} and readable_id(body) == "c-1"
    assert readable_id({"id": 5}) is None and readable_id({"id": "a b"}) is None


def test_split_result_small_is_untouched():
    final = {"id": "c", "component": "e", "command": "read_data", "status": "completed", "final": True,
             "seq": 2, "result": {"values": {"x": 1}}}
    assert m.split_result(final, 1024) == [final]


def test_split_result_chunks_and_reassembles_unicode():
    result = {"values": {"text": "ä€𝄞" * 3000, "n": list(range(500))}}
    final = {"id": "c", "component": "e", "command": "read_data", "status": "completed", "final": True,
             "seq": 2, "result": result, "duration_ms": 5}
    messages = m.split_result(final, 2048)
    chunks, closing = messages[:-1], messages[-1]
    assert all(len(m.encode(x)) <= 2048 for x in messages)
    assert [c["seq"] for c in chunks] == list(range(2, 2 + len(chunks)))
    assert closing["seq"] == 2 + len(chunks) and closing["chunks"] == len(chunks) and "result" not in closing
    assert closing["status"] == "completed" and closing["final"] is True and closing["duration_ms"] == 5
    assert json.loads("".join(c["chunk"]["data"] for c in chunks)) == result


def entry(command_id, state="queued", seq=1, final=None):
    return Entry(command_id, state, {"id": command_id}, f"r/{command_id}", b"corr", 1.0, None, seq, final)


def test_store_ledger_and_outbox_survive_reopen(tmp_path):
    store = Store(tmp_path / "agent.db")
    batch = store.batch()
    batch.add_command(entry("a"))
    batch.publish(Outgoing("r/a", b"accepted", b"corr", "a"))
    batch.publish(Outgoing("r/a", b"second", None, "a"))
    batch.commit()
    store.close()
    reopened = Store(tmp_path / "agent.db")
    assert reopened.get("a").state == "queued" and reopened.get("a").correlation == b"corr"
    pending = reopened.pending(0, 10)
    assert [p.message.payload for p in pending] == [b"accepted", b"second"]
    reopened.acknowledge([pending[0].n])
    reopened.flush()  # the delete rides the next commit: made now
    assert [p.message.payload for p in reopened.pending(0, 10)] == [b"second"]
    assert reopened.pending(pending[1].n, 10) == []
    batch = reopened.batch()
    batch.set_state("a", "final", seq=3, final_message={"status": "completed"})
    batch.commit()
    assert reopened.get("a").final_message == {"status": "completed"} and reopened.get("a").seq == 3
    reopened.close()


def test_store_rolls_back_a_failed_batch(tmp_path):
    store = Store(tmp_path / "agent.db")
    batch = store.batch()
    batch.add_command(entry("a"))
    batch.add_command(entry("a"))  # duplicate primary key: the whole batch must not land
    with pytest.raises(Exception, match="UNIQUE"):
        batch.commit()
    assert store.get("a") is None
    store.close()


def test_outbox_trim_by_count_and_age_and_ledger_prune(tmp_path):
    store = Store(tmp_path / "agent.db")
    batch = store.batch()
    for i in range(12):
        batch.publish(Outgoing("t", str(i).encode()))
    batch.add_command(entry("old", state="final"))
    batch.add_command(entry("live", state="started"))
    batch.commit()
    assert store.trim_outbox(max_messages=10, max_age_s=3600, now=time.time()) == 2
    assert store.pending(0, 100)[0].message.payload == b"2"  # the oldest went first
    assert store.outbox_stats()[0] == 10
    assert store.trim_outbox(max_messages=10, max_age_s=60, now=time.time() + 120) == 10
    assert store.prune_ledger(retention_s=60, now=time.time() + 120) == 1
    assert store.get("old") is None and store.get("live") is not None  # unfinished ids are never pruned
    store.close()


def test_guarded_callback_failure_is_counted_and_link_keeps_serving(service, backend):
    calls = {"n": 0}
    real = service.intake.put

    def flaky(incoming):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom in a callback")
        real(incoming)

    service.link._on_command = flaky
    first = {"id": "lost-in-callback", "component": "engine", "command": "read_data", "params": {"data": "vin"}}
    backend.send(first)
    time.sleep(0.3)
    assert service.link.stats.callback_errors == 1 and service.link.alive
    second = {"id": "after-callback", "component": "engine", "command": "read_data", "params": {"data": "vin"}}
    backend.send(second)
    assert backend.final("after-callback")["status"] == "completed"


def test_outbox_drop_is_counted_and_logged(service, caplog):
    batch = service.store.batch()
    for i in range(30):
        batch.publish(Outgoing("nowhere/x", str(i).encode()))
    batch.commit()
    service.outbox._config = type(service.outbox._config)(outbox_max_messages=10, outbox_max_age_s=3600)
    service.link._client.disconnect()  # keep them pending while the bound is applied
    time.sleep(0.2)
    service.outbox._maintain()
    assert service.outbox.dropped >= 20
    assert any("dropped" in r.getMessage() for r in caplog.records)


def test_the_paho_internals_the_link_relies_on_exist_in_the_installed_paho():
    """The link reaches into paho's client (its in-flight table and lock, the packet being read, keep-alive
    bookkeeping) where paho has no public hook; each use falls back with a log line, so a paho release that
    renamed one would quietly disable a protection. The names are read from the agent's own source, so a new
    use is checked too."""
    import re
    from pathlib import Path

    import paho.mqtt.client as mqtt

    used: set[str] = set()
    for path in (Path(__file__).resolve().parent.parent / "agent" / "fleet").glob("*.py"):
        text = path.read_text()
        used |= set(re.findall(r"(?:\bclient|_client)\.(_[a-z][a-z_]*)", text))
        used |= set(re.findall(r'getattr\((?:self\.)?_?client, "(_[a-z_]+)"', text))
    assert {"_out_messages", "_out_message_mutex", "_sock_recv", "_in_packet"} <= used  # the reading works
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5)
    assert [name for name in sorted(used) if not hasattr(client, name)] == []
