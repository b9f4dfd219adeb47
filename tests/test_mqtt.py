"""Protocol v1 through a real Mosquitto, agent in-process (so the simulator's counters are visible)."""

import json
import logging
import time
import uuid

import pytest

from agent.bus.owner import wait_until
from agent.devtools.sim.config import fault_from_dict
from agent.fleet.caller import Caller

ALL_COMMANDS = [
    ("read_data", {"data": ["vin", "engine_speed"]}),
    ("read_faults", {"snapshots": True}),
    ("set_session", {"session": "extended"}),
    ("security_access", {"level": 1}),
    ("write_data", {"data": "idle_mode", "value": "high"}),
    ("operation", {"routine": "self_test", "action": "start"}),
    ("io_control", {"data": "engine_speed", "control": "freeze"}),
    ("tester_present", {}),
    ("raw", {"request": "22F40D"}),
    ("clear_faults", {}),
    ("reset", {"type": "soft"}),
]


def new_id():
    return f"c-{uuid.uuid4().hex[:10]}"


def command(component="engine", name="read_data", params=None, **fields):
    body = {"id": new_id(), "component": component, "command": name,
            "params": {"data": "vin"} if params is None else params}
    body.update(fields)
    return body


def test_status_online_retained(service, backend, mqtt_vehicle):
    status = [s for s in backend.seen if s.topic == backend.topics.status][-1]
    body = status.json()
    assert body["state"] == "online" and body["protocol"] == 1
    assert body["components"] == ["engine", "body", "gateway", "camera"]
    # A backend that subscribes after the agent came online gets the status from the broker's retained
    # copy, flagged as retained: that is what makes it "retained", not that some status was seen.
    with Caller(mqtt_vehicle.mqtt, mqtt_vehicle.vehicle) as late:
        late.subscribe(late.topics.status)
        (seen,) = late.wait_for(lambda s: s.topic == late.topics.status, 10)
        assert seen.retained and seen.json()["state"] == "online"


def test_every_command_end_to_end(service, backend, sim):
    for name, params in ALL_COMMANDS:
        body = command(name=name, params=params)
        backend.send(body)
        final = backend.final(body["id"])
        assert final["status"] == "completed", final
        replies = backend.replies(body["id"])
        assert [r["seq"] for r in replies] == [1, 2] and replies[0]["status"] == "accepted"
    assert sim.ecu("engine").server.resets == 1


def test_a_long_command_gets_its_accepted_while_it_runs(service, backend, sim):
    """The `accepted` of a command that starts at once may wait for its final (intake.ACCEPTED_GRACE_S),
    but no longer: a command still running seconds later has had it long before its final."""
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "pending": 150})])  # ~3 s
    body = command(params={"data": "vin"})
    backend.send(body)
    (accepted,) = backend.wait_replies(body["id"], 1, timeout=10)
    assert accepted["status"] == "accepted" and accepted["seq"] == 1
    assert [r["status"] for r in backend.replies(body["id"])] == ["accepted"]  # its final is seconds away
    assert backend.final(body["id"], timeout=15)["seq"] == 2


def test_mqtt5_response_topic_and_correlation(service, backend):
    body = command()
    backend.send(body, response_topic="replies/backend-7", correlation=b"\x01corr")
    final = backend.final(body["id"], topic="replies/backend-7")
    assert final["result"] == {"values": {"vin": "TEST0VEHICLE00001"}}
    seen = [s for s in backend.seen if s.topic == "replies/backend-7"]
    assert len(seen) == 1 and seen[0].correlation == b"\x01corr"  # the final only (revision 1.1)
    assert backend.replies(body["id"]) == []  # nothing on the default topic


def test_expired_by_expires_at_never_runs(service, backend, sim):
    body = command(expires_at="2020-01-01T00:00:00.000Z")
    backend.send(body)
    final = backend.final(body["id"])
    assert final["status"] == "expired" and final["error"]["code"] == "expired"
    assert final["error"]["message"] == "not started before expires_at"
    assert sim.ecu("engine").received[0x22] == 0


def test_expired_by_message_expiry_interval(service, backend, sim):
    # the first command holds the engine for ~1.4 s (70 x NRC 0x78); the second expires while it waits
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "match": "F190", "pending": 70})])
    slow, quick = command(), command(params={"data": "oil_temp"})
    backend.send(slow)
    backend.send(quick, expiry_s=1)
    slow_final = backend.final(slow["id"])
    assert slow_final["status"] == "completed", slow_final["error"]
    expired = backend.final(quick["id"])
    assert expired["status"] == "expired", expired
    assert expired["error"]["message"] == "not started before its MQTT Message Expiry Interval"  # not expires_at
    assert sim.ecu("engine").server.executed[0x22] == 1


def test_duplicate_of_finished_command_gets_final_again(service, backend, sim):
    body = command()
    backend.send(body)
    first = backend.final(body["id"])
    backend.send(body)
    backend.wait_for(lambda s: s.topic == backend.topics.responses(body["id"]) and b'"duplicate"' in s.payload, 10)
    again = next(r for r in backend.replies(body["id"]) if r.get("duplicate"))
    assert {k: v for k, v in again.items() if k != "duplicate"} == first
    assert sim.ecu("engine").server.executed[0x22] == 1


def test_duplicate_in_flight_gets_its_accepted_again_and_runs_once(service, backend, sim):
    """Protocol 1.1: a repeated id still in progress gets its latest non-final message again, marked
    duplicate; the one final follows when the command ends."""
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "pending": 10})])
    body = command()
    backend.send(body)
    backend.send(body)
    backend.wait_for(lambda s: s.topic == backend.topics.responses(body["id"]) and b'"duplicate"' in s.payload, 10)
    assert backend.final(body["id"])["status"] == "completed"
    replies = backend.replies(body["id"])
    again = [r for r in replies if r.get("duplicate")]
    assert len(again) == 1
    if again[0]["final"] is False:  # still running when the copy came: the same accepted, again
        assert again[0]["status"] == "accepted"
        assert {k: v for k, v in again[0].items() if k != "duplicate"} == replies[0]
    else:  # it had already finished: its final again
        assert again[0]["status"] == "completed"
    assert [r["status"] for r in replies if r["final"] and not r.get("duplicate")] == ["completed"]  # one final
    assert sim.ecu("engine").server.executed[0x22] == 1


@pytest.mark.parametrize(("payload", "field"), [
    ({"id": "bad-1", "component": "engine", "command": "read_data", "params": {"data": 7}}, "params.data"),
    ({"id": "bad-2", "component": "engine", "command": "levitate"}, "command"),
    ({"id": "bad-3", "component": "engine", "command": "read_data", "params": {"data": "vin"}, "x": 1}, "x"),
    ({"id": "bad-4", "component": 5, "command": "read_data"}, "component"),
    ({"id": "bad-5", "component": "engine", "command": "read_data", "timeout_ms": "soon"}, "timeout_ms"),
])
def test_invalid_commands_rejected_naming_the_field(service, backend, payload, field):
    payload = {**payload, "id": f"{payload['id']}-{uuid.uuid4().hex[:6]}"}
    backend.send(payload)
    final = backend.final(payload["id"])
    assert final["status"] == "rejected" and final["error"]["code"] == "invalid_command"
    assert final["error"]["field"] == field and field in final["error"]["message"]


@pytest.mark.parametrize("payload", [
    b"not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b'"a string"', b"{}", b'{"id": "has space"}',
    b"\x00" * 100, b"[" * 60000,  # deep nesting within the size limit (a larger message never reaches the agent)
])
def test_undecodable_messages_become_events_and_agent_keeps_serving(service, backend, payload):
    backend.send(payload)
    backend.wait_for(lambda s: s.topic == backend.topics.events and b"invalid_message" in s.payload, 10)
    body = command()
    backend.send(body)
    assert backend.final(body["id"])["status"] == "completed"


def test_oversize_command_with_readable_id_is_rejected(service, backend):
    body = command(params={"data": "vin", "padding": "x" * 70000})
    backend.send(body)
    final = backend.final(body["id"])
    assert final["error"]["code"] == "invalid_command" and "limit is 65536" in final["error"]["message"]


def test_invalid_message_events_and_their_log_lines_are_rate_limited(service, backend, caplog):
    """Events were limited to N a minute, their WARNING lines were not: a flood of garbage on the command
    topic flooded the journal. The first line after the limit says how many were not logged."""
    def warnings():
        return [r for r in caplog.records if r.levelno == logging.WARNING and "invalid message" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="agent.fleet.answers"):
        for _ in range(15):
            backend.send(b"nope")
        backend.wait_for(lambda s: s.topic == backend.topics.events and b"invalid_message" in s.payload, 10, count=10)
        assert wait_until(lambda: service.intake.stats.invalid.get("undecodable") == 15, 10)
        events = [s for s in backend.seen if s.topic == backend.topics.events and b"invalid_message" in s.payload]
        assert len(events) == 10 and service.intake.stats.events_suppressed == 5
        assert len(warnings()) == 10
        service.intake._event_times = [t - 61 for t in service.intake._event_times]  # a minute passes
        backend.send(b"nope again")
        assert wait_until(lambda: len(warnings()) == 11, 10)
    assert "(5 more since the last one logged" in warnings()[-1].getMessage()


def test_unknown_component_and_policy(service, backend):
    unknown, refused = command(component="warp_core"), command(component="body", name="clear_faults", params={})
    backend.send(unknown)
    backend.send(refused)
    unknown_final = backend.final(unknown["id"])
    assert (unknown_final["status"], unknown_final["error"]["code"]) == ("rejected", "unknown_component")
    final = backend.final(refused["id"])
    assert (final["status"], final["error"]["code"]) == ("rejected", "not_permitted")
    assert [r["status"] for r in backend.replies(refused["id"])] == ["rejected"]  # never `accepted`


def test_full_queue_answers_busy(mqtt_vehicle, sim, backend):
    """`busy` is left for a broker that sends more than the agent can hold: MQTT 3.1.1 has no Receive
    Maximum, and Mosquitto's 20 in flight exceed the 1 command this agent may keep waiting."""
    import dataclasses

    from agent.system.service import Service

    config = dataclasses.replace(mqtt_vehicle, mqtt=dataclasses.replace(mqtt_vehicle.mqtt, protocol="3.1.1",
                                                                        receive_maximum=1, max_waiting_commands=1))
    sim.ecu("engine").set_faults([fault_from_dict({"service": 0x22, "delay_ms": 100})])
    svc = Service(config)
    svc.start()
    try:
        backend.wait_status("online", 10)
        bodies = [command() for _ in range(8)]
        for body in bodies:
            backend.send(body)
        finals = [backend.final(b["id"], timeout=15) for b in bodies]
        assert svc._entries == {}  # the entries kept from admission for the finals: none outlives its command
    finally:
        svc.stop()
    statuses = [f["status"] for f in finals]
    assert statuses.count("rejected") >= 1 and statuses.count("completed") >= 5
    assert all(f["error"]["code"] == "busy" and f["seq"] == 1 for f in finals if f["status"] == "rejected")
    assert sim.ecu("engine").server.executed[0x22] == statuses.count("completed")


def test_large_result_is_chunked_and_reassembles(mqtt_vehicle, sim, backend):
    import dataclasses

    from agent.system.service import Service

    config = dataclasses.replace(mqtt_vehicle, mqtt=dataclasses.replace(mqtt_vehicle.mqtt, max_payload_bytes=2048))
    svc = Service(config)
    svc.start()
    try:
        backend.wait_status("online", 10)
        body = command(params={"data": "big_block"})
        backend.send(body)
        final = backend.final(body["id"])
        replies = backend.replies(body["id"])
        chunks = [r for r in replies if r["status"] == "running"]
        assert final["status"] == "completed" and final["chunks"] == len(chunks) > 1 and "result" not in final
        assert [c["chunk"]["index"] for c in chunks] == list(range(len(chunks)))
        assert [r["seq"] for r in replies] == list(range(1, len(replies) + 1))
        assert all(len(json.dumps(r)) <= 2048 for r in replies)
        result = json.loads("".join(c["chunk"]["data"] for c in chunks))
        assert bytes.fromhex(result["values"]["big_block"]["raw"]) == bytes(i & 0xFF for i in range(4095))
    finally:
        svc.stop()


def test_clean_stop_publishes_offline(mqtt_vehicle, sim, backend):
    from agent.system.service import Service
    from agent.wire.timefmt import parse_rfc3339

    svc = Service(mqtt_vehicle)
    svc.start()
    online = backend.wait_status("online", 10).json()
    before = time.time()
    svc.stop()
    offline = backend.wait_status("offline", 10).json()
    # `since` of a clean stop is when the agent went offline, not when it started (ms resolution)
    assert parse_rfc3339(online["since"]) == pytest.approx(svc.started_at, abs=0.001)
    assert before - 0.001 <= parse_rfc3339(offline["since"]) <= time.time()


def test_mqtt_3_1_1_with_reply_to(legacy):
    _, backend = legacy
    body = command(reply_to="legacy/replies/42")
    backend.send(body)
    final = backend.final(body["id"], topic="legacy/replies/42")
    assert final["result"] == {"values": {"vin": "TEST0VEHICLE00001"}}
    plain = command(params={"data": "oil_temp"})
    backend.send(plain)
    assert backend.final(plain["id"])["status"] == "completed"


def test_bus_failure_publishes_bus_state_events_and_bus_error(mqtt_vehicle, sim, backend):
    from test_bus_recovery import Faults, FaultyBus

    from agent.system.service import Service

    faults = Faults()
    svc = Service(mqtt_vehicle, bus_factory=lambda: FaultyBus(faults, channel=mqtt_vehicle.bus.channel, fd=True))
    svc.start()
    try:
        backend.wait_status("online", 10)
        faults.send = 2  # two failed sends in a row: one alone is retried
        body = command()
        backend.send(body)
        assert backend.final(body["id"])["error"]["code"] == "bus_error"
        events = backend.wait_for(lambda s: s.topic == backend.topics.events and b"bus_state" in s.payload, 10,
                                  count=2)
        states = [(e.json()["previous"], e.json()["state"]) for e in events]
        assert states == [("unknown", "stopped"), ("stopped", "unknown")]
        again = command()
        backend.send(again)
        assert backend.final(again["id"])["status"] == "completed"
    finally:
        svc.stop()


def test_a_final_the_store_refuses_goes_out_after_what_was_stored_before_it(service, backend):
    """A final whose commit fails (SQLITE_FULL) goes straight to the link; what its command stored
    earlier and no thread has handed over yet (its `accepted`: the intake now hands the command to its
    worker before it wakes the outbox) goes first. Once, the final went out ahead of its `accepted`."""
    from agent.store.sqlite import Entry, Outgoing
    from agent.wire.command import Outcome, Result
    from agent.wire.messages import accepted_message, encode

    assert service.link.wait_connected(10)
    service.outbox._next_wait = lambda: 60.0  # the outbox thread reads the store only when woken
    passed = service.outbox.heartbeat
    service.outbox.wake()
    assert wait_until(lambda: service.outbox.heartbeat != passed, 5)  # it is back in its (now long) wait
    command_id = new_id()
    reply_topic = backend.topics.responses(command_id)
    body = {"id": command_id, "component": "engine", "command": "read_data", "params": {"data": "vin"}}
    entry = Entry(command_id, "started", body, reply_topic, None, time.time(), None, 1, None)
    batch = service.store.batch()  # as the intake's commit leaves it: recorded, `accepted` stored, not yet sent
    batch.add_command(entry)
    batch.publish(Outgoing(reply_topic, encode(accepted_message(command_id, "engine", "read_data", entry.received_at)),
                          None, command_id))
    batch.commit()
    pages = service.store._db.execute("PRAGMA page_count").fetchone()[0]
    service.store._db.execute(f"PRAGMA max_page_count = {pages}")  # the next write that needs a page: SQLITE_FULL
    try:
        now = time.time()
        service._finish(entry, Result(command_id, "engine", "read_data", Outcome.completed({"vin": "x" * 60_000}),
                                      entry.received_at, now, now))
        assert service.store.deferred == 1  # the final's commit failed: it went around the outbox
        backend.final(command_id, 10)
        statuses = [r["status"] for r in backend.wait_replies(command_id, 2, 10)]
        assert statuses == ["accepted", "completed"]
    finally:
        service.store._db.execute("PRAGMA max_page_count = 1073741823")



def test_a_final_the_store_refuses_waits_for_an_outbox_pass_under_way(service, backend):
    """As above, but the outbox thread is mid-pass (here: settling PUBACKs, held up by the test as a slow
    SD card would) when the final's commit fails. The final's hand-over cannot take the pass at once: it
    waits for it, then hands over the held `accepted`, then publishes the final. Once, it only woke the
    outbox thread and published the final straight away: the backend had the final before its `accepted`."""
    import threading

    from agent.store.sqlite import Entry, Outgoing
    from agent.wire.command import Outcome, Result
    from agent.wire.messages import accepted_message, encode

    assert service.link.wait_connected(10)
    outbox = service.outbox
    inside, go = threading.Event(), threading.Event()
    settle = outbox._settle_acks

    def slow_settle():
        inside.set()
        go.wait(10)
        settle()

    command_id = new_id()
    reply_topic = backend.topics.responses(command_id)
    body = {"id": command_id, "component": "engine", "command": "read_data", "params": {"data": "vin"}}
    entry = Entry(command_id, "started", body, reply_topic, None, time.time(), None, 1, None)
    batch = service.store.batch()  # as the intake's commit leaves it when the command starts at once
    batch.add_command(entry)
    batch.publish(Outgoing(reply_topic, encode(accepted_message(command_id, "engine", "read_data", entry.received_at)),
                          None, command_id))
    batch.commit()
    outbox.send_soon(60.0)  # held: only a hand-over takes it
    outbox._settle_acks = slow_settle
    outbox.published(-1)  # a PUBACK (of nothing of ours) wakes the outbox thread into a pass that settles it
    assert inside.wait(5)
    pages = service.store._db.execute("PRAGMA page_count").fetchone()[0]
    service.store._db.execute(f"PRAGMA max_page_count = {pages}")  # the next write that needs a page: SQLITE_FULL
    try:
        now = time.time()
        finishing = threading.Thread(target=service._finish, args=(entry, Result(
            command_id, "engine", "read_data", Outcome.completed({"vin": "x" * 60_000}), entry.received_at, now, now)))
        finishing.start()
        assert wait_until(lambda: service.store.deferred == 1, 5)  # the final's commit failed: it goes around
        go.set()
        finishing.join(10)
        assert not finishing.is_alive()
        statuses = [r["status"] for r in backend.wait_replies(command_id, 2, 10)]
        assert statuses == ["accepted", "completed"]
    finally:
        go.set()
        outbox._settle_acks = settle
        service.store._db.execute("PRAGMA max_page_count = 1073741823")
