"""Protocol v1 clauses that no other test pinned down: what the agent's CONNECT asks of the broker (section
Session), and the QoS and retain flag of every kind of message it publishes (section Topics, Collection).

The CONNECT is read from the real Service's paho client by a scripted broker on a real loopback socket
(tests/fake_broker.py): Mosquitto does not show a client's CONNECT flags and properties. The flags test
runs on a real Mosquitto with the simulator on a virtual CAN bus.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from collect_support import plan
from fake_broker import CONNACK, CONNECT, PUBACK, PUBLISH, SUBSCRIBE, Connection, FakeBroker
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config.model import AgentConfig
from agent.fleet.caller import Caller
from agent.system.service import Service
from agent.wire.decode import MAX_COMMAND_BYTES


@dataclasses.dataclass(frozen=True)
class Connect:
    """The fields of a CONNECT packet the protocol's section Session speaks of."""

    level: int
    clean_start: bool
    will_qos: int
    will_retain: bool
    properties: Properties | None
    client_id: str
    will_topic: str
    will_payload: bytes


def _string(body: bytes, at: int) -> tuple[bytes, int]:
    (n,) = struct.unpack("!H", body[at:at + 2])
    return body[at + 2:at + 2 + n], at + 2 + n


def parse_connect(body: bytes) -> Connect:
    """A CONNECT's variable header and payload up to the Will (MQTT 5: 3.1.2-3.1.3; 3.1.1: 3.1.2-3.1.3)."""
    name, at = _string(body, 0)
    assert name == b"MQTT"
    level, flags = body[at], body[at + 1]
    at += 4  # level, flags, keep alive
    properties = None
    if level == 5:
        properties, used = Properties(PacketTypes.CONNECT).unpack(body[at:])
        at += used
    client_id, at = _string(body, at)
    assert flags & 0x04, "the agent registers a Last Will"
    if level == 5:
        _, used = Properties(PacketTypes.WILLMESSAGE).unpack(body[at:])
        at += used
    will_topic, at = _string(body, at)
    will_payload, at = _string(body, at)
    return Connect(level, bool(flags & 0x02), (flags >> 3) & 0x03, bool(flags & 0x20), properties,
                   client_id.decode(), will_topic.decode(), will_payload)


def subscriptions(packet, v5: bool) -> dict[str, int]:
    """The topic filters of a SUBSCRIBE with their options byte (QoS in bits 0-1, retain as published bit 3)."""
    at = 2  # the packet id
    if v5:
        _, used = Properties(PacketTypes.SUBSCRIBE).unpack(packet.body[at:])
        at += used
    found = {}
    while at < len(packet.body):
        topic, at = _string(packet.body, at)
        found[topic.decode()] = packet.body[at] & 0x0F  # without Retain Handling (bits 4-5)
        at += 1
    return found


@pytest.fixture
def fake() -> Iterator[FakeBroker]:
    broker = FakeBroker()
    yield broker
    broker.close()


def _published_mid(packet) -> int:
    """The packet id of a QoS 1 PUBLISH: after its topic."""
    (n,) = struct.unpack("!H", packet.body[:2])
    return int(struct.unpack("!H", packet.body[2 + n:4 + n])[0])


def _pubacks_within(connection: Connection, seconds: float) -> list[int]:
    """The packet ids of the PUBACKs the client sends within `seconds` (its own publishes are acknowledged)."""
    acked: list[int] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            packet = connection.read(left)
        except TimeoutError:
            break
        if packet.kind == PUBACK:
            acked.append(packet.mid)
        elif packet.kind == PUBLISH and packet.flags & 0x06:
            connection.puback(_published_mid(packet))
    return acked


def test_a_command_is_acknowledged_only_once_it_is_recorded(fake, mqtt_vehicle, sim):
    """Section Session: the PUBACK for a command goes only after the command is recorded durably (a crash
    in between makes the broker redeliver it). The intake's commit is held: no PUBACK while it is; once it
    is let go, the PUBACK follows. Scripted broker (Mosquitto does not show when a PUBACK arrives)."""
    config = dataclasses.replace(mqtt_vehicle, mqtt=dataclasses.replace(mqtt_vehicle.mqtt, broker=fake.url))
    svc = Service(config)
    entered, release = threading.Event(), threading.Event()
    commit = svc.store.commit_group

    def held_commit(batches, company=False):
        if threading.current_thread().name == "intake":
            entered.set()
            assert release.wait(10)
        commit(batches, company)

    svc.store.commit_group = held_commit  # type: ignore[method-assign]
    svc.start()
    try:
        connection = fake.accept()
        connection.expect(CONNECT)
        connection.connack()
        while not (packet := connection.expect(PUBLISH)).topic.endswith("/status"):
            pass
        connection.puback(_published_mid(packet))
        body = {"id": f"a-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "tester_present"}
        connection.publish(f"{config.mqtt.prefix}/{config.vehicle}/commands", json.dumps(body).encode(), mid=77)
        assert entered.wait(10)
        assert 77 not in _pubacks_within(connection, 0.5)  # the commit is held: not recorded yet
        release.set()
        deadline = time.monotonic() + 10
        while 77 not in _pubacks_within(connection, 0.2):
            assert time.monotonic() < deadline, "no PUBACK after the command was recorded"
        assert svc.store.get(body["id"]) is not None
        connection.close()
    finally:
        release.set()
        svc.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_agent_connects_with_a_stable_id_a_persistent_session_and_its_limits(fake, mqtt_vehicle, sim, protocol):
    """Section Session: client id `sovd-edge-{vehicle}` by default; MQTT 5 Clean Start = 0 with a Session
    Expiry Interval of 7 days (the default), a Receive Maximum of the configured admission window and a
    Maximum Packet Size just above the largest command (64 KiB) it accepts; MQTT 3.1.1 clean session = 0.
    Section Status: the Last Will is the status document, `offline`, QoS 1, retained, on `status`."""
    config = dataclasses.replace(mqtt_vehicle, mqtt=dataclasses.replace(
        mqtt_vehicle.mqtt, broker=fake.url, protocol=protocol, client_id=None))
    assert config.mqtt.session_expiry_s == 7 * 24 * 3600  # the default the spec names
    svc = Service(config)
    svc.start()
    try:
        connection = fake.accept()
        sent = parse_connect(connection.expect(CONNECT).body)
        connection.send(CONNACK, 0, b"\x00\x00" + (b"\x00" if protocol == "5" else b""))
        subscribed = subscriptions(connection.expect(SUBSCRIBE), protocol == "5")
        connection.close()
    finally:
        svc.stop()
    # QoS 1, so that the broker queues commands while the vehicle is away; MQTT 5: retain as published, so
    # that a retained command is seen as one (and never run)
    assert subscribed[f"{config.mqtt.prefix}/{config.vehicle}/commands"] == (0x09 if protocol == "5" else 0x01)
    assert sent.client_id == f"sovd-edge-{config.vehicle}"
    assert sent.clean_start is False
    assert sent.level == (5 if protocol == "5" else 4)
    if protocol == "5":
        assert sent.properties is not None
        assert sent.properties.SessionExpiryInterval == 7 * 24 * 3600
        assert sent.properties.ReceiveMaximum == config.mqtt.receive_maximum
        assert config.mqtt.receive_maximum <= config.mqtt.max_waiting_commands  # admitted without `busy`
        # just above the largest command: a 64 KiB command with its topic and properties passes, 2x does not
        assert MAX_COMMAND_BYTES + 1024 < sent.properties.MaximumPacketSize < 2 * MAX_COMMAND_BYTES
    assert sent.will_topic == f"{config.mqtt.prefix}/{config.vehicle}/status"
    assert (sent.will_qos, sent.will_retain) == (1, True)
    will = json.loads(sent.will_payload)
    assert will["state"] == "offline" and will["vehicle"] == config.vehicle and will["protocol"] == 1
    assert set(will) == {"state", "vehicle", "agent_version", "protocol", "components", "since"}
    assert will["components"] == [ecu.name for ecu in config.ecus]


class Flags:
    """A raw MQTT 5 subscriber that records each message's QoS and retain flag as the agent published them:
    subscribed at QoS 2 (a message arrives at the QoS it was published with) and retain-as-published (a
    live message keeps its retain flag; Mosquitto clears it otherwise)."""

    def __init__(self, config: AgentConfig) -> None:
        self.base = f"{config.mqtt.prefix}/{config.vehicle}"
        host, port, _ = config.mqtt.host_port_tls
        self._client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
                                   client_id=f"flags-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        self._client.on_message = self._on_message
        self.seen: list[tuple[str, int, bool, bytes]] = []
        self._changed = threading.Condition()
        subscribed = threading.Event()
        self._client.on_subscribe = lambda *args: subscribed.set()
        self._client.connect(host, port)
        self._client.loop_start()
        self._client.subscribe(f"{self.base}/#", options=SubscribeOptions(qos=2, retainAsPublished=True))
        assert subscribed.wait(5)

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.seen.append((message.topic, message.qos, bool(message.retain), bytes(message.payload)))
            self._changed.notify_all()

    def wait(self, kind: str, timeout: float = 15.0) -> list[tuple[int, bool]]:
        """(QoS, retain) of every message seen so far on the vehicle's `kind` topics, once there is one."""
        def matching() -> list[tuple[int, bool]]:
            return [(qos, retain) for topic, qos, retain, _ in self.seen
                    if topic == f"{self.base}/{kind}" or topic.startswith(f"{self.base}/{kind}/")]
        with self._changed:
            assert self._changed.wait_for(lambda: matching(), timeout), f"nothing on {kind}"
            return matching()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def test_every_kind_of_message_goes_out_at_qos_1_retained_only_where_the_spec_says(service, backend, mqtt_vehicle):
    """Section Topics and Collection: responses, events and telemetry QoS 1 not retained; status and
    state QoS 1 retained. A QoS 0 publish, or a retained response, would pass every other test."""
    flags = Flags(mqtt_vehicle)
    try:
        assert flags.wait("status") == [(1, True)]  # the broker's retained copy keeps the published QoS
        body = {"id": f"f-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data",
                "params": {"data": "vin"}}
        backend.send(body)
        assert backend.final(body["id"])["status"] == "completed"
        backend.publish_plan("flags", plan("flags", 1, signals=[{"component": "engine", "data": ["engine_speed"],
                                                                 "every_ms": 100}],
                                           batch={"max_age_ms": 200, "max_samples": 50}))
        assert set(flags.wait("responses")) == {(1, False)}  # accepted and completed
        assert set(flags.wait("events")) == {(1, False)}  # plan_applied
        assert set(flags.wait("telemetry")) == {(1, False)}
        assert set(flags.wait("state")) == {(1, True)}
    finally:
        flags.close()
        backend.publish_plan("flags", None)


def test_the_status_online_and_offline_documents_carry_every_field(mqtt_vehicle, sim, backend: Caller):
    """Section Status: `state`, `vehicle`, `agent_version`, `protocol` 1, `components`, `since`; the
    offline document a clean stop publishes is the same document."""
    svc = Service(mqtt_vehicle)
    svc.start()
    try:
        online = backend.wait_status("online", 10).json()
    finally:
        svc.stop()
    offline = backend.wait_status("offline", 10).json()
    from agent import __version__
    for document in (online, offline):
        assert set(document) == {"state", "vehicle", "agent_version", "protocol", "components", "since"}
        assert (document["vehicle"], document["agent_version"], document["protocol"]) == (
            mqtt_vehicle.vehicle, __version__, 1)
        assert document["components"] == [ecu.name for ecu in mqtt_vehicle.ecus]


@pytest.mark.parametrize("bad", ["response_topic", "reply_to"])
def test_a_bad_reply_topic_is_refused_on_the_default_topic_even_beside_a_good_one(service, backend, sim, bad):
    """Section Delivery guarantees, "Reply topics are checked": a Response Topic or `reply_to` that is one of
    the vehicle's own topics makes the command `rejected`/`invalid_command` *on the default `responses/{id}`
    topic*. With the other of the two a usable topic, the refusal once went there instead."""
    command_id = f"r-{uuid.uuid4().hex[:8]}"
    good, own = f"replies/{command_id}", f"{backend.topics.base}/status"
    body = {"id": command_id, "component": "engine", "command": "read_data", "params": {"data": "vin"},
            "reply_to": own if bad == "reply_to" else good}
    backend.send(body, response_topic=own if bad == "response_topic" else good, correlation=b"c")
    final = backend.final(command_id)  # the default topic
    assert (final["status"], final["error"]["code"], final["error"]["field"]) == ("rejected", "invalid_command", bad)
    assert backend.replies(command_id, topic=good) == []
    assert sim.ecu("engine").server.executed[0x22] == 0


def _padded(body: dict[str, Any], size: int) -> bytes:
    """`body` as JSON of exactly `size` bytes (blanks before its closing brace: the same Command)."""
    raw = json.dumps(body).encode()
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


def test_a_signed_command_of_up_to_64_kib_runs_and_a_larger_one_is_refused_by_its_id(mqtt_vehicle, sim, backend,
                                                                                      tmp_path):
    """Section Command: a Command is at most 64 KiB; section Signed commands: it comes in an envelope with its
    exact bytes in base64, a third larger. The envelope of a 60 KiB Command was over the agent's 64 KiB payload
    limit (and over the Maximum Packet Size it announced): the broker or the agent dropped it with no answer.
    A plain message over 64 KiB is still refused as too large, answered by its id."""
    from signing_support import expires_in, make_keys, security

    keys = make_keys(tmp_path / "keys", "backend-1")
    config = dataclasses.replace(mqtt_vehicle, security=security(keys["backend-1"].config(), mode="mutating"))
    svc = Service(config)
    svc.start()
    try:
        assert svc.link.wait_connected(10), svc.link.last_error
        big = {"id": f"s-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "clear_faults",
               "params": {}, "expires_at": expires_in(600)}
        backend.send(keys["backend-1"].sign(_padded(big, MAX_COMMAND_BYTES)))
        assert backend.final(big["id"])["status"] == "completed"
        over = {**big, "id": f"s-{uuid.uuid4().hex[:8]}"}
        backend.send(keys["backend-1"].sign(_padded(over, MAX_COMMAND_BYTES + 1)))
        refused = backend.final(over["id"])
        assert (refused["status"], refused["error"]["code"]) == ("rejected", "invalid_command")
        assert f"the limit is {MAX_COMMAND_BYTES}" in refused["error"]["message"]
        plain = {"id": f"p-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data",
                 "params": {"data": "vin"}}
        backend.send(_padded(plain, MAX_COMMAND_BYTES + 1))
        refused = backend.final(plain["id"])
        assert (refused["status"], refused["error"]["code"]) == ("rejected", "invalid_command")
        assert sim.ecu("engine").server.executed.get(0x14, 0) == 1
    finally:
        svc.stop()


def test_a_plan_from_mqtt_replaces_the_local_plan_of_the_same_name(mqtt_vehicle, sim, backend):
    """Section Collection: a plan from MQTT with the same name replaces the local one (`collect:` in the
    config); its batches are the MQTT plan's from then on, and it stays after a restart, the local plan
    given again by the config notwithstanding."""
    from collect_support import with_collect

    local = plan("pt", 1, signals=[{"component": "engine", "data": ["engine_speed"], "every_ms": 100}],
                 batch={"max_age_ms": 200, "max_samples": 50})
    config = with_collect(mqtt_vehicle, plans=(local,))
    remote = plan("pt", 2, signals=[{"component": "engine", "data": ["oil_temp"], "every_ms": 100}],
                  batch={"max_age_ms": 200, "max_samples": 50})

    def batch_of(version: int) -> dict[str, Any]:
        return backend.wait_for(lambda s: s.topic == backend.topics.telemetry and s.json()["version"] == version
                                and s.at >= started, 15)[0].json()

    started = time.time()
    svc = Service(config)
    svc.start()
    try:
        assert {s["data"] for s in batch_of(1)["samples"]} == {"engine_speed"}
        backend.publish_plan("pt", remote)
        assert {s["data"] for s in batch_of(2)["samples"]} == {"oil_temp"}
    finally:
        svc.stop()
    started = time.time()
    svc = Service(config)  # the same config, its local plan `pt` version 1 with it
    svc.start()
    try:
        assert {s["data"] for s in batch_of(2)["samples"]} == {"oil_temp"}
        assert svc.collection.collector.plans["pt"].version == 2
    finally:
        svc.stop()
        backend.publish_plan("pt", None)


def test_a_command_of_exactly_64_kib_runs_and_one_byte_more_is_refused(service, backend, sim):
    """Section Command: "at most 64 KiB", through the broker (the Maximum Packet Size the agent announces lets
    the largest command it accepts through) to its result; one byte more is too large, answered by its id."""
    body = {"id": f"k-{uuid.uuid4().hex[:8]}", "component": "engine", "command": "read_data",
            "params": {"data": "vin"}}
    backend.send(_padded(body, MAX_COMMAND_BYTES))
    assert backend.final(body["id"])["status"] == "completed"
    over = {**body, "id": f"k-{uuid.uuid4().hex[:8]}"}
    backend.send(_padded(over, MAX_COMMAND_BYTES + 1))
    refused = backend.final(over["id"])
    assert (refused["status"], refused["error"]["code"]) == ("rejected", "invalid_command")
    assert sim.ecu("engine").server.executed[0x22] == 1
