"""What the broker says and what it is told: Receive Maximum (a backlog drained, not refused), Maximum
Packet Size both ways, PUBACK reason codes (an ACL that denies the response topic), a broker
`message_size_limit` it does not announce, retained commands, reply topics. Real Mosquitto throughout.
"""

import dataclasses
import json
import uuid
from pathlib import Path

import pytest
from conftest import DATA
from mqtt_support import agent_and_backend

from agent.bus.owner import wait_until
from agent.devtools.local_broker import LocalBroker
from agent.system.service import Service


def command(component="engine", name="read_data", params=None, **fields):
    return {"id": f"b-{uuid.uuid4().hex[:10]}", "component": component, "command": name,
            "params": {"data": "vin"} if params is None else params, **fields}


@pytest.fixture
def special_broker(tmp_path):
    """A broker of the test's own, with extra Mosquitto settings (ACLs, size limits)."""
    started = []

    def start(extra: str) -> LocalBroker:
        broker = LocalBroker(tmp_path / f"broker-{len(started)}", extra=extra)
        started.append(broker.start())
        return broker

    yield start
    for broker in started:
        broker.stop()


def on_broker(config, broker):
    return dataclasses.replace(config, mqtt=dataclasses.replace(config.mqtt, broker=broker.url))


def on_special_broker(special_broker, mqtt_vehicle, extra):
    """The agent and a backend (mqtt_support.agent_and_backend) on a broker with `extra` settings."""
    return agent_and_backend(on_broker(mqtt_vehicle, special_broker(extra)))


def test_backlog_queued_while_away_is_drained_not_refused(mqtt_vehicle, sim, backend):
    """200 commands wait at the broker in the agent's persistent session; the agent then starts and
    takes them as it drains its queue of 4 (Receive Maximum and held PUBACKs): none is `busy`."""
    first = Service(mqtt_vehicle)
    first.start()
    assert first.link.wait_connected(10), first.link.last_error
    first.stop()  # the session (and its subscription) stays at the broker
    bodies = [command() for _ in range(200)]
    for body in bodies:
        backend.send(body)
    svc = Service(mqtt_vehicle)
    svc.start()
    try:
        finals = [backend.final(b["id"], timeout=60) for b in bodies]
        waited = svc.intake.parking.parked_total
    finally:
        svc.stop()
    statuses = [f["status"] for f in finals]
    assert statuses.count("completed") >= 195, [f.get("error") for f in finals if f["status"] != "completed"][:3]
    assert not [f for f in finals if f.get("error", {}).get("code") == "busy"]
    assert waited > 0  # the queue of 4 was full: commands did wait, PUBACK held
    assert sim.ecu("engine").server.executed[0x22] == statuses.count("completed")


def test_retained_command_is_never_executed(service, backend, sim):
    body = command()
    info = backend._client.publish(backend.topics.commands, json.dumps(body).encode(), qos=1, retain=True)
    info.wait_for_publish(10)
    try:
        event = backend.wait_for(lambda s: s.topic == backend.topics.events and b'"retained"' in s.payload, 10)[0]
        assert event.json()["type"] == "invalid_message"
        fresh = command()
        backend.send(fresh)
        assert backend.final(fresh["id"])["status"] == "completed"
        assert backend.replies(body["id"]) == []
        assert sim.ecu("engine").server.executed[0x22] == 1
        assert service.intake.stats.invalid["retained"] == 1
    finally:
        backend._client.publish(backend.topics.commands, b"", qos=1, retain=True).wait_for_publish(10)


@pytest.mark.parametrize(("where", "topic"), [
    ("reply_to", "status"), ("reply_to", "commands"), ("response_topic", "events"),
    ("response_topic", "plans/powertrain"), ("reply_to", "state/engine"), ("reply_to", "replies/+"),
])
def test_reply_topic_pointing_at_the_vehicle_itself_is_refused(service, backend, sim, where, topic):
    target = topic if topic.startswith("replies") else f"{backend.topics.base}/{topic}"
    if where == "reply_to":
        body = command(reply_to=target)
        backend.send(body)
    else:
        body = command()
        backend.send(body, response_topic=target)
    final = backend.final(body["id"])  # on the default responses/{id} topic
    assert final["status"] == "rejected" and final["error"]["code"] == "invalid_command"
    assert final["error"]["field"] == where
    assert sim.ecu("engine").server.executed[0x22] == 0


def test_agent_announces_its_limits_and_a_100_mb_command_never_reaches_it(broker, tmp_path, backend, mqtt_vehicle):
    """The agent runs as a process so that its peak RSS can be read; Mosquitto drops the 100 MB command
    for it (Maximum Packet Size), and the next command is answered."""
    import yaml
    from mqtt_support import AgentProcess

    config = yaml.safe_load((DATA / "vehicle.yaml").read_text())
    sim = yaml.safe_load((DATA / "vehicle-sim.yaml").read_text())
    (tmp_path / "sim.yaml").write_text(yaml.safe_dump(sim))
    config.update(vehicle=mqtt_vehicle.vehicle, simulate=[str(tmp_path / "sim.yaml")],
                  state_dir=str(tmp_path / "state"))
    config["bus"]["channel"] = f"big-{uuid.uuid4().hex[:8]}"
    config["metrics"] = {"enabled": False}
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
    agent = AgentProcess(tmp_path / "agent.yaml", broker.url, tmp_path / "state")
    agent.start()
    try:
        huge = command(params={"data": "vin", "padding": "x" * (100 * 1024 * 1024)})
        backend.send(json.dumps(huge).encode())
        after = command()
        backend.send(after)
        assert backend.final(after["id"], timeout=30)["status"] == "completed"
        status = Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines()
        peak_kb = int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
        assert peak_kb < 150 * 1024, f"peak RSS {peak_kb} kB"
        assert backend.replies(huge["id"]) == []  # dropped by the broker, never seen by the agent
        assert agent.terminate() == 0
    finally:
        agent.ensure_stopped()


def test_broker_maximum_packet_size_is_honoured_by_chunking(special_broker, mqtt_vehicle, sim):
    with on_special_broker(special_broker, mqtt_vehicle, "max_packet_size 4096\n") as (svc, backend):
        assert svc.link.broker_max_packet == 4096
        body = command(params={"data": "big_block"})
        backend.send(body)
        final = backend.final(body["id"], timeout=15)
        chunks = [r for r in backend.replies(body["id"]) if r["status"] == "running"]
        assert final["status"] == "completed" and final["chunks"] == len(chunks) > 1
        result = json.loads("".join(c["chunk"]["data"] for c in chunks))
        assert bytes.fromhex(result["values"]["big_block"]["raw"]) == bytes(i & 0xFF for i in range(4095))
        assert svc.link.stats.reconnects == 0


def test_puback_not_authorized_is_set_aside_counted_and_reported(special_broker, tmp_path, mqtt_vehicle, sim,
                                                                   caplog):
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite sovd/+/commands\ntopic readwrite sovd/+/status\n"
                   "topic readwrite sovd/+/events\ntopic read sovd/+/responses/#\n")
    with on_special_broker(special_broker, mqtt_vehicle, f"acl_file {acl}\n") as (svc, backend):
        body = command()
        backend.send(body)
        events = backend.wait_for(lambda s: s.topic == backend.topics.events
                                  and b"publish_refused" in s.payload and body["id"].encode() in s.payload,
                                  15, count=2)  # accepted and completed, both denied
        event = events[0].json()
        assert event["reason"] == "not_authorized" and event["reason_code"] == "0x87"
        assert event["topic"] == backend.topics.responses(body["id"])
        refused = svc.store.refused_messages()
        assert {json.loads(p.message.payload)["status"] for p, _ in refused} == {"accepted", "completed"}
        assert {reason for _, reason in refused} == {"not_authorized"}
        assert svc.store.outbox_stats()[0] == 0 or wait_until(lambda: svc.store.outbox_stats()[0] == 0, 5)
        assert svc.store.get(body["id"]).state == "final"
        value = svc.registry.get_sample_value("sovd_publish_refused_total", {"reason": "not_authorized"})
        assert value == 2
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "set aside" in r.getMessage()]
        assert len(errors) == 2
        assert backend.replies(body["id"]) == []


def test_message_over_an_unannounced_size_limit_does_not_loop_reconnecting(special_broker, mqtt_vehicle, sim):
    """Mosquitto's `message_size_limit` is not announced in CONNACK: the broker cuts the connection on
    the big response. After a few cuts on the same message it is set aside; the link settles."""
    with on_special_broker(special_broker, mqtt_vehicle, "message_size_limit 4096\n") as (svc, backend):
        big = command(params={"data": "big_block"})
        backend.send(big)
        event = backend.wait_for(lambda s: s.topic == backend.topics.events and b"publish_refused" in s.payload,
                                 60)[0].json()
        assert event["reason"] == "connection_dropped" and event["command_id"] == big["id"]
        reconnects = svc.link.stats.reconnects
        after = command()
        backend.send(after)
        assert backend.final(after["id"], timeout=15)["status"] == "completed"
        assert svc.link.stats.reconnects == reconnects  # no loop once it is set aside
        assert svc.link.stats.taken_over == 0  # cuts explained by a message are not taken for a takeover
        assert svc.store.get(big["id"]).state == "final"


def test_commands_left_queued_by_a_crash_wait_for_room_after_the_restart(mqtt_vehicle, sim, backend):
    """20 commands recorded `queued` (e.g. waiting when the agent was SIGKILLed) and a queue of 4: at the
    restart they wait their turn, in order, none refused `busy`."""
    from agent.store.sqlite import Entry, Store

    store = Store(mqtt_vehicle.state_dir / "agent.db")
    bodies = [command() for _ in range(20)]
    batch = store.batch()
    for n, body in enumerate(bodies):
        batch.add_command(Entry(body["id"], "queued", body, backend.topics.responses(body["id"]), None,
                                1000.0 + n, None, 1, None))
    batch.commit()
    store.close()
    svc = Service(mqtt_vehicle)
    svc.start()
    try:
        finals = [backend.final(b["id"], timeout=30) for b in bodies]
    finally:
        svc.stop()
    assert [f["status"] for f in finals] == ["completed"] * 20
    assert [f["seq"] for f in finals] == [2] * 20
    assert sim.ecu("engine").server.executed[0x22] == 20
