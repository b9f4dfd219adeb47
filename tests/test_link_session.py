"""The link's MQTT session against an unusual broker: what is acknowledged on which connection, a lost
session, refusals, rogue packets.

Most tests here talk to a scripted fake broker over a real loopback TCP socket (tests/fake_broker.py):
Mosquitto cannot be made to hold a CONNACK back, to answer Session Present 0 on demand or to refuse a
connection with a chosen code. The agent's side is the real link and the real paho client.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from fake_broker import CONNECT, PUBACK, PUBLISH, SUBSCRIBE, FakeBroker

from agent.bus.owner import wait_until
from agent.config.model import MqttConfig
from agent.devtools.local_broker import LocalBroker
from agent.fleet.inbound import KEEP_IN
from agent.fleet.link import MqttLink
from agent.fleet.packets import Incoming
from agent.fleet.topics import Topics
from agent.store.sqlite import Outgoing
from agent.system.service import Service


@pytest.fixture
def fake() -> Iterator[FakeBroker]:
    broker = FakeBroker()
    yield broker
    broker.close()


@contextlib.contextmanager
def fake_link(fake: FakeBroker, **config) -> Iterator[tuple[MqttLink, Topics, list[Incoming], list[tuple[int, int]]]]:
    """The agent's link alone on the fake broker (not yet connected: the test answers its CONNECT); yields
    (link, topics, commands received, PUBACKs as (mid, code))."""
    topics = Topics("sovd", f"VF{uuid.uuid4().hex[:10].upper()}")
    commands: list[Incoming] = []
    acks: list[tuple[int, int]] = []
    link = MqttLink(MqttConfig(broker=fake.url, **config), topics, "fake-agent",
                    status=lambda state: json.dumps({"state": state}).encode(), on_command=commands.append,
                    on_published=lambda mid, code: acks.append((mid, code)), on_connection=lambda up: None)
    link.start()
    try:
        yield link, topics, commands, acks
    finally:
        link.stop(timeout=3.0)


def until_status(connection) -> list[int]:
    """The kinds of the packets the client sends after CONNACK, up to and including its online status."""
    while connection.expect(PUBLISH).topic.rsplit("/", 1)[-1] != "status":
        pass
    return [p.kind for p in connection.seen]


def test_a_puback_owed_on_a_lost_connection_is_never_written_on_the_next_one(fake):
    """Intake acknowledges a command once it is recorded; the connection it came on may be gone by then.
    Sent while the link waits for the next CONNACK, that PUBACK went out on the new connection, where its
    packet id may name a message of a new session (Session Present 0) the agent never saw: that one was
    then acknowledged unrecorded, and lost at the next crash. Nothing owed on the old connection may go."""
    with fake_link(fake) as (link, topics, commands, _):
        first = fake.accept()
        first.expect(CONNECT)
        first.connack()
        first.expect(SUBSCRIBE)
        first.publish(topics.commands, b'{"id": "a"}', mid=1)
        assert wait_until(lambda: commands, 10)
        first.close()
        second = fake.accept()
        second.expect(CONNECT)  # the link now waits for the CONNACK
        link.ack(commands[0].mid, commands[0].qos, commands[0].generation)  # recorded only now
        second.connack(session_present=False)
        assert PUBACK not in until_status(second)


@contextlib.contextmanager
def mosquitto_link(broker, topics: Topics, client_id: str,
                   with_plans: bool) -> Iterator[tuple[MqttLink, list[Incoming]]]:
    """The agent's link on the real Mosquitto fixture, connected; yields it and the commands it hands on
    (each acknowledged at once)."""
    commands: list[Incoming] = []

    def command(incoming: Incoming) -> None:
        commands.append(incoming)
        link.ack(incoming.mid, incoming.qos, incoming.generation)

    link = MqttLink(MqttConfig(broker=broker.url), topics, client_id,
                    status=lambda state: json.dumps({"state": state}).encode(), on_command=command,
                    on_published=lambda mid, code: None, on_connection=lambda up: None,
                    on_plan=(lambda name, payload, ack: ack()) if with_plans else None)
    link.start()
    try:
        assert link.wait_connected(10), link.last_error
        yield link, commands
    finally:
        link.stop(timeout=3.0)


@pytest.mark.parametrize("change", ["prefix", "collection"])
def test_only_the_commands_topic_is_taken_for_commands_whatever_the_session_still_subscribes(broker, change):
    """A persistent session outlives the agent's config: after the prefix changed, or collection was turned
    off, the broker still holds the old run's subscriptions (Session Present 1) and delivers on them. A
    message on the old `commands` topic was run as a command, and a collection plan was taken for one
    (answered, or reported as an invalid message, on the vehicle's topics). Only `commands` carries commands."""
    vehicle = f"VS{uuid.uuid4().hex[:10].upper()}"
    client_id = f"session-{uuid.uuid4().hex[:8]}"
    before = Topics("old" if change == "prefix" else "sovd", vehicle)
    now = Topics("sovd", vehicle)
    with mosquitto_link(broker, before, client_id, with_plans=True):
        pass  # subscribed to `before`'s commands and plans; the session stays at the broker
    stray = before.commands if change == "prefix" else now.plans("p1")
    command = b'{"id": "stray", "component": "engine", "command": "read_data", "params": {"data": "vin"}}'
    for run in (1, 2):  # the first stray message drops the stale subscription: the next run gets none
        with mosquitto_link(broker, now, client_id, with_plans=False) as (link, commands):
            publish(broker, (stray, command), (now.commands, b'{"id": "real"}'))  # delivered in this order
            assert wait_until(lambda: commands, 10)
            assert [c.payload for c in commands] == [b'{"id": "real"}']  # only `commands` carries commands
            assert link.stats.stray == (1 if run == 1 else 0)


def publish(broker, *messages: tuple[str, bytes]) -> None:
    """Publishes `messages` in order at QoS 1 from a client of their own, each acknowledged."""
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    host, port, _ = MqttConfig(broker=broker.url).host_port_tls
    sender.connect(host, port)
    sender.loop_start()
    try:
        for topic, payload in messages:
            info = sender.publish(topic, payload, qos=1)
            info.wait_for_publish(30)
            assert info.is_published(), f"the broker did not take a message for {topic}"
    finally:
        sender.loop_stop()
        sender.disconnect()


def test_a_status_the_broker_refuses_is_said_and_counted(tmp_path, mqtt_vehicle, sim, caplog):
    """An ACL that lets the agent connect and take commands but not publish its status: the broker refuses
    the retained `online` with PUBACK 0x87, and the fleet never sees the vehicle online. The link publishes
    the status itself (not through the outbox), and that refusal went unsaid: no log line, no count."""
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite sovd/+/commands\ntopic read sovd/+/status\n"
                   "topic readwrite sovd/+/events\ntopic readwrite sovd/+/responses/#\n")
    broker = LocalBroker(tmp_path / "broker", extra=f"acl_file {acl}\n").start()
    try:
        svc = Service(dataclasses.replace(mqtt_vehicle, mqtt=dataclasses.replace(mqtt_vehicle.mqtt,
                                                                                 broker=broker.url)))
        svc.start()
        try:
            assert svc.link.wait_connected(10), svc.link.last_error
            assert wait_until(lambda: svc.registry.get_sample_value("sovd_publish_refused_total",
                                                                    {"reason": "not_authorized"}) == 1, 10)
        finally:
            svc.stop()
    finally:
        broker.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("agent.fleet")]
    assert any("status" in e and "0x87" in e for e in errors), errors


def test_a_puback_for_a_packet_id_never_sent_settles_nothing_and_keeps_the_link(fake):
    """A rogue PUBACK (a packet id the agent never used): nothing is taken as delivered, the connection stays,
    and the real PUBACK that follows settles the real message."""
    with fake_link(fake) as (link, topics, _, acks):
        connection = fake.accept()
        connection.expect(CONNECT)
        connection.connack()
        status = connection.expect(PUBLISH)  # the online status, after the subscription
        connection.puback(int.from_bytes(status.body[2 + len(status.topic):4 + len(status.topic)], "big"))
        assert wait_until(lambda: acks, 5)
        mid = link.publish(Outgoing(topics.responses("r1"), b"{}"))
        sent = connection.expect(PUBLISH)
        connection.puback(0x1234 if mid != 0x1234 else 0x4321)  # for nothing of ours
        connection.puback(mid)
        assert wait_until(lambda: len(acks) == 2, 5)
        assert acks[1] == (mid, 0) and link.connected and link.stats.reconnects == 0
        assert sent.topic == topics.responses("r1")


@pytest.mark.parametrize("qos", [0, 2])
def test_a_command_published_at_qos_0_or_2_runs_once(service, backend, sim, qos):
    """The commands topic is QoS 1; a backend that publishes at QoS 0 is delivered at QoS 0 (no PUBACK to hold:
    it runs, or is refused `busy`, at once), one at QoS 2 is delivered at the subscription's QoS 1."""
    body = {"id": f"q{qos}-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data",
            "params": {"data": "vin"}}
    backend._client.publish(backend.topics.commands, json.dumps(body).encode(), qos=qos).wait_for_publish(10)
    assert backend.final(body["id"], timeout=10)["status"] == "completed"
    assert sim.ecu("engine").server.executed[0x22] == 1


def test_a_command_larger_than_the_agent_takes_is_cut_to_its_head_as_it_is_read(broker):
    """MQTT 3.1.1 has no Maximum Packet Size to announce, and Mosquitto forwards messages up to 256 MB: paho
    read a huge command whole into memory (then copied it), enough to have a 1 GB Pi's agent killed, and
    redelivered to it after each restart. The link keeps only the head of a packet over KEEP_IN (up to
    which intake still reads the id of a command too large), reads the rest and drops it: the message is
    still decided on its own (too large) and acknowledged. Real Mosquitto, the agent's link alone."""
    topics = Topics("sovd", f"VB{uuid.uuid4().hex[:10].upper()}")
    commands: list[Incoming] = []

    def command(incoming: Incoming) -> None:
        commands.append(incoming)
        link.ack(incoming.mid, incoming.qos, incoming.generation)

    link = MqttLink(MqttConfig(broker=broker.url, protocol="3.1.1"), topics, f"big-{uuid.uuid4().hex[:8]}",
                    status=lambda state: json.dumps({"state": state}).encode(), on_command=command,
                    on_published=lambda mid, code: None, on_connection=lambda up: None)
    link.start()
    try:
        assert link.wait_connected(10), link.last_error
        huge = b'{"id": "huge", "pad": "' + b"x" * (4 * 1024 * 1024) + b'"}'
        publish(broker, (topics.commands, huge), (topics.commands, b'{"id": "next"}'))
        assert wait_until(lambda: len(commands) == 2, 30), ([len(c.payload) for c in commands], link.stats)
        head, after = commands
        assert len(head.payload) <= KEEP_IN and huge.startswith(head.payload[:-1])
        assert after.payload == b'{"id": "next"}' and link.connected and link.stats.reconnects == 0
        assert link.stats.oversize == 1
    finally:
        link.stop(timeout=3.0)


@pytest.mark.parametrize("chunk", [1, 7, 4096, 65536, 1 << 20])
def test_the_head_of_an_oversized_packet_is_kept_and_the_next_packet_read_whole(chunk):
    """keep_heads on a real paho client reading a real socket (a socketpair), the stream written in chunks of
    every size: the oversized PUBLISH keeps exactly its head and last byte, and the one after it is intact."""
    import select
    import socket
    import threading

    from fake_broker import _string, _varint

    from agent.fleet.inbound import keep_heads

    def publish_packet(payload: bytes, mid: int) -> bytes:
        body = _string("t") + mid.to_bytes(2, "big") + payload
        return bytes([0x32]) + _varint(len(body)) + body

    limit = 1000
    big = bytes(range(256)) * 40  # 10240 bytes
    stream = publish_packet(big, 1) + publish_packet(b"next", 2)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311, manual_ack=True)
    got: list[bytes] = []
    sizes: list[int] = []
    client.on_message = lambda c, u, message: got.append(bytes(message.payload))
    keep_heads(client, limit, sizes.append)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours
    pieces = [stream[i:i + chunk] for i in range(0, len(stream), chunk)]
    writer = threading.Thread(target=lambda: [theirs.sendall(piece) for piece in pieces], name="writer")
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            select.select([ours], [], [], 1)
            client._packet_read()
    finally:
        writer.join(5)
        ours.close()
        theirs.close()
    head = limit - 1 - len(_string("t")) - 2
    assert got == [big[:head] + big[-1:], b"next"]
    assert sizes == [len(_string("t")) + 2 + len(big)]


def test_huge_commands_on_mqtt_3_1_1_are_refused_as_too_large_and_the_next_one_runs(legacy):
    """End to end on 3.1.1: a 512 KiB command is answered `rejected`/`invalid_command` with its id (read whole:
    under KEEP_IN), a 4 MiB one is reported as an `invalid_message` Event (its head only: no id readable, as
    before), and the command after them runs."""
    _, backend = legacy
    pad = b'{"id": "%s", "component": "engine", "command": "read_data", "pad": "%s"}'
    backend.send(pad % (b"big-1", b"x" * (512 << 10)))
    backend.send(pad % (b"huge-1", b"x" * (4 << 20)))
    refused = backend.final("big-1", timeout=15)
    assert refused["status"] == "rejected" and refused["error"]["code"] == "invalid_command"
    assert "limit is 65536" in refused["error"]["message"]
    backend.wait_for(lambda s: s.topic == backend.topics.events and b"invalid_message" in s.payload
                     and b"limit is 65536" in s.payload, 15)
    body = {"id": f"after-{uuid.uuid4().hex[:6]}", "component": "engine", "command": "read_data",
            "params": {"data": "vin"}}
    backend.send(body)
    assert backend.final(body["id"], timeout=15)["status"] == "completed"


def test_a_publish_without_a_topic_is_a_stray_message_acknowledged_without_an_error(fake):
    """A PUBLISH with an empty topic name (a broker using a Topic Alias the agent never allowed): not a command,
    acknowledged, and nothing to unsubscribe from (paho refuses an empty filter: once a callback error)."""
    with fake_link(fake) as (link, _topics, commands, _):
        connection = fake.accept()
        connection.expect(CONNECT)
        connection.connack()
        connection.expect(SUBSCRIBE)
        connection.publish("", b'{"id": "x"}', mid=7)
        assert connection.expect(PUBACK).mid == 7
        assert commands == [] and link.stats.stray == 1 and link.stats.callback_errors == 0


@pytest.mark.parametrize("server_keep_alive", [0, 3600])
def test_a_dead_connection_is_noticed_whatever_keep_alive_the_broker_announces(fake, server_keep_alive):
    """A broker may announce a Server Keep Alive of 0 (no keep-alive at all) or far longer than the agent's;
    paho then pinged that rarely or never, and on a network that drops packets silently (a cellular NAT that
    forgot the connection) the agent sat `connected` for hours or for ever while commands queued at the broker.
    A client may ping whenever it likes (MQTT 5, 3.1.2.10): the agent keeps its own interval when it is shorter.
    Scripted broker: it stops answering after the CONNACK."""
    with fake_link(fake, keepalive_s=1) as (link, _, _, _):
        connection = fake.accept()
        connection.expect(CONNECT)
        connection.connack(properties=bytes([0x13]) + server_keep_alive.to_bytes(2, "big"))
        connection.expect(SUBSCRIBE, answer=False)
        assert link.wait_connected(5)
        assert wait_until(lambda: not link.connected, 10), "a silent broker was never noticed"


def test_a_connection_whose_setup_fails_is_made_again_not_kept_half_open(mqtt_vehicle, sim, backend, caplog):
    """An exception while the connection was set up (here: building the online status) was caught by the
    callback guard and the connection kept: paho connected, the agent not, so no PUBACK and no publish went
    out, and the loop's heartbeat stayed fresh for the watchdog. Now it is dropped and made again."""
    svc = Service(mqtt_vehicle)
    status, calls = svc.link._status, []

    def fails_once(state):
        calls.append(state)
        if len(calls) == 1:
            raise RuntimeError("a bug building the status")
        return status(state)

    svc.link._status = fails_once
    svc.start()
    try:
        assert svc.link.wait_connected(20), svc.link.last_error
        backend.wait_status("online", 10)
        body = {"id": f"su-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data",
                "params": {"data": "vin"}}
        backend.send(body)
        assert backend.final(body["id"], timeout=15)["status"] == "completed"
        assert svc.link.stats.callback_errors == 1 and svc.link.stats.reconnects >= 1
        assert any("setting up the MQTT connection failed" in r.getMessage() and r.exc_info for r in caplog.records)
    finally:
        svc.stop()
