"""What the broker says and what it is told: Receive Maximum (a backlog drained, not refused), Maximum
Packet Size both ways, PUBACK reason codes (an ACL that denies the response topic), a broker
`message_size_limit` it does not announce, retained commands, reply topics. Real Mosquitto throughout.
"""

import contextlib
import dataclasses
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from collect_support import plan
from conftest import DATA
from mqtt_support import agent_and_backend

from agent.bus.owner import wait_until
from agent.devtools.local_broker import LocalBroker
from agent.fleet.link import MqttLink
from agent.fleet.packets import packet_size
from agent.fleet.topics import Topics
from agent.store.sqlite import Outgoing
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


def test_a_retained_command_is_reported_once_not_again_on_every_reconnect(mqtt_vehicle, sim, broker, backend):
    """The broker sends retained messages again with every SUBSCRIBE, and the agent subscribes on every
    connection: without Retain Handling 1 each reconnect reported the same retained command again
    (a new `invalid_message` event each time). The connection is cut by a relay in front of Mosquitto."""
    relay = AckHoldingRelay(broker.port)
    config = dataclasses.replace(mqtt_vehicle, mqtt=dataclasses.replace(
        mqtt_vehicle.mqtt, broker=f"mqtt://127.0.0.1:{relay.port}"))
    body = command()
    backend._client.publish(backend.topics.commands, json.dumps(body).encode(), qos=1,
                            retain=True).wait_for_publish(10)
    svc = Service(config)
    svc.start()
    try:
        assert svc.link.wait_connected(10), svc.link.last_error
        backend.wait_for(lambda s: s.topic == backend.topics.events and b'"retained"' in s.payload, 10)
        relay.cut()
        assert wait_until(lambda: relay.connections == 2 and svc.link.connected, 15)
        fresh = command()
        backend.send(fresh)  # sent after the new SUBSCRIBE: anything retained it brought is handled before it
        assert backend.final(fresh["id"])["status"] == "completed"
        events = [s for s in backend.seen if s.topic == backend.topics.events and b'"retained"' in s.payload]
        assert len(events) == 1 and svc.intake.stats.invalid["retained"] == 1
        assert sim.ecu("engine").server.executed[0x22] == 1
    finally:
        svc.stop()
        relay.close()
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


def test_a_state_over_an_unannounced_size_limit_is_set_aside_and_the_states_after_it_fit(special_broker,
                                                                                         mqtt_vehicle, sim):
    """The telemetry lane publishes states straight to the link. A state carrying an ~8 KiB value over
    the broker's unannounced `message_size_limit` cut every connection, and paho resent it first on the
    next one: nothing was published any more, command responses included (the outbox judged cuts
    only among its own messages). Now the link sets it aside after a few cuts, reported like any
    message the broker will not take, keeps later messages under a size the broker takes (the next
    states go without that value), and commands are answered."""
    with on_special_broker(special_broker, mqtt_vehicle, "message_size_limit 4096\n") as (svc, backend):
        backend.publish_plan("big", plan("big", 1, signals=[{"component": "engine", "every_ms": 300,
                                                            "data": ["big_block", "engine_speed"]}],
                                         batch={"max_age_ms": 300, "max_samples": 50}))
        state = backend.topics.state("engine")
        refused = backend.wait_for(lambda s: s.topic == backend.topics.events and b"publish_refused" in s.payload
                                   and state.encode() in s.payload, 60)[0].json()
        assert refused["reason"] == "connection_dropped" and refused["bytes"] > 8192
        trimmed = backend.wait_for(lambda s: s.topic == state and b"truncated" in s.payload, 30)[0].json()
        assert trimmed["truncated"] == ["big_block"] and "engine_speed" in trimmed["values"]
        limit = svc.link.broker_max_packet
        assert limit is not None and limit < refused["bytes"]
        # Messages handed to paho before the limit was learned (a telemetry batch with that value) are
        # struck in their turn (a state published as a connection opens may overtake them): wait for that.
        assert wait_until(lambda: svc.link.connected and not oversize_in_flight(svc.link, limit), 30)
        reconnects = svc.link.stats.reconnects
        body = command()
        backend.send(body)
        assert backend.final(body["id"], timeout=15)["status"] == "completed"
        assert svc.link.stats.reconnects == reconnects  # settled
        assert svc.collection.lane.states_refused >= 1
        assert svc.registry.get_sample_value("sovd_publish_refused_total", {"reason": "connection_dropped"}) >= 1


def oversize_in_flight(link: MqttLink, limit: int) -> bool:
    with link._client._out_message_mutex:
        return any(packet_size(m.topic, m.payload, None) > limit for m in link._client._out_messages.values())


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


def test_a_broker_receive_maximum_of_one_still_gets_every_response(special_broker, mqtt_vehicle, sim):
    """Mosquitto's `max_inflight_messages 1` (an operator's way to have messages delivered in order) is
    announced as Receive Maximum 1: one message of ours at a time, never none. The outbox once kept
    that one place for the link's status message and so had none: no response ever left the store."""
    with on_special_broker(special_broker, mqtt_vehicle, "max_inflight_messages 1\n") as (svc, backend):
        assert svc.link.broker_receive_maximum == 1
        bodies = [command() for _ in range(3)]
        for body in bodies:
            backend.send(body)
        assert [backend.final(b["id"], timeout=15)["status"] for b in bodies] == ["completed"] * 3
        assert wait_until(lambda: svc.store.outbox_stats()[0] == 0, 5)


def _packets(buffer: bytearray) -> Iterator[bytes]:
    """The whole MQTT packets at the front of `buffer`, taken out of it."""
    while len(buffer) >= 2:
        length, shift, i = 0, 0, 1
        while True:
            if i >= len(buffer):
                return
            length |= (buffer[i] & 0x7F) << shift
            shift, i = shift + 7, i + 1
            if not buffer[i - 1] & 0x80:
                break
        if len(buffer) < i + length:
            return
        packet = bytes(buffer[:i + length])
        del buffer[:i + length]
        yield packet


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a recv() on it in another thread
    sock.close()


class AckHoldingRelay:
    """A TCP relay between the agent and Mosquitto that can hold the broker's PUBACKs back (a slow way
    home: Mosquitto itself answers at once, and does not enforce its own Receive Maximum on QoS 1),
    and counts on the wire what the Receive Maximum bounds: the agent's QoS 1 PUBLISHes on this
    connection whose PUBACK it has not been given. One connection at a time; `cut` drops it."""

    def __init__(self, broker_port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._broker_port = broker_port
        self._lock = threading.Lock()
        self._holding = False
        self._held: list[bytes] = []
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self.connections = 0
        self.in_flight = 0
        self.peak = 0
        self._threads = [threading.Thread(target=self._accept, name="relay", daemon=True)]
        self._threads[0].start()

    def hold(self) -> None:
        with self._lock:
            self._holding = True

    def release(self) -> None:
        with self._lock:
            held, self._held, self._holding = self._held, [], False
            self.in_flight -= len(held)
            agent = self._sockets[0] if self._sockets else None
        for packet in held:
            if agent is not None:
                agent.sendall(packet)

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, None
        for sock in sockets or ():
            _close(sock)

    def close(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self._listener.close()
        self.cut()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while True:
            try:
                agent, _ = self._listener.accept()
            except OSError:
                return
            broker = socket.create_connection(("127.0.0.1", self._broker_port))
            with self._lock:
                self.connections += 1
                self.in_flight, self._held, self._sockets = 0, [], (agent, broker)
            for pump in ((agent, broker, self._up), (broker, agent, self._down)):
                self._threads.append(threading.Thread(target=self._pump, args=pump, name="relay", daemon=True))
                self._threads[-1].start()

    def _pump(self, source: socket.socket, target: socket.socket, each) -> None:
        buffer = bytearray()
        try:
            while chunk := source.recv(65536):
                buffer += chunk
                for packet in _packets(buffer):
                    each(packet, target)
        except OSError:
            pass
        finally:
            _close(source)
            _close(target)

    def _up(self, packet: bytes, broker: socket.socket) -> None:
        if packet[0] >> 4 == 3 and (packet[0] >> 1) & 3:  # a PUBLISH with QoS 1 or 2
            with self._lock:
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
        broker.sendall(packet)

    def _down(self, packet: bytes, agent: socket.socket) -> None:
        with self._lock:
            if packet[0] >> 4 == 4:  # PUBACK
                if self._holding:
                    self._held.append(packet)
                    return
                self.in_flight -= 1
        agent.sendall(packet)


@pytest.fixture
def held_acks(special_broker, mqtt_vehicle):
    """A link (the agent's, alone) to a Mosquitto announcing Receive Maximum 3, through AckHoldingRelay;
    yields (link, relay, topics, PUBACKs the link reported) once the status's PUBACK came back."""
    broker = special_broker("max_inflight_messages 3\n")  # announced in CONNACK as Receive Maximum 3
    relay = AckHoldingRelay(broker.port)
    mqtt = dataclasses.replace(mqtt_vehicle.mqtt, broker=f"mqtt://127.0.0.1:{relay.port}")
    topics = Topics(mqtt.prefix, mqtt_vehicle.vehicle)
    acks: list[int] = []
    link = MqttLink(mqtt, topics, f"rm-{uuid.uuid4().hex[:8]}",
                    status=lambda state: json.dumps({"state": state}).encode(), on_command=lambda incoming: None,
                    on_published=lambda mid, code: acks.append(mid), on_connection=lambda up: None)
    link.start()
    try:
        assert link.wait_connected(10), link.last_error
        assert link.broker_receive_maximum == 3
        assert wait_until(lambda: acks, 5)  # the status: nothing of ours in flight now
        yield link, relay, topics, acks
    finally:
        link.stop()
        relay.close()


def _as_the_agent_publishes(link: MqttLink, topics: Topics) -> None:
    """What the outbox fills the window with (Receive Maximum less one for the status), and the states
    the telemetry lane publishes beside it, straight to the link."""
    for n in range(2):
        assert link.publish(Outgoing(topics.responses(f"r{n}"), b'{"n": %d}' % n)) is not None
    for n in range(4):
        assert link.publish(Outgoing(topics.state(f"c{n}"), b'{"n": %d}' % n, retain=True)) is not None


def test_the_link_keeps_within_the_broker_receive_maximum_whoever_publishes(held_acks):
    """The broker's Receive Maximum bounds every QoS 1 message of the connection, not just the outbox's:
    the telemetry lane's states (and the status, a refusal sent around a failing store) share it. What
    exceeds it waits in the link, in order, until PUBACKs make room. Once, the outbox kept within it
    and the lane's states went on top (a broker that enforces it cuts the connection, 0x93)."""
    link, relay, topics, acks = held_acks
    relay.hold()
    _as_the_agent_publishes(link, topics)
    assert wait_until(lambda: relay.in_flight >= 3, 5)
    assert not wait_until(lambda: relay.in_flight > 3, 0.5), relay.in_flight
    relay.release()
    assert wait_until(lambda: len(acks) == 7 and not link._unacked, 10)
    assert relay.peak == 3


def test_what_the_link_resends_on_a_new_connection_keeps_within_the_receive_maximum(held_acks):
    """paho resends everything it holds at once on a new connection; the messages beyond the broker's
    Receive Maximum wait for PUBACKs there too, in order, and all get through."""
    link, relay, topics, _ = held_acks
    relay.hold()
    _as_the_agent_publishes(link, topics)
    assert wait_until(lambda: relay.in_flight >= 3, 5)
    relay.cut()  # the PUBACKs held are lost with the connection
    assert wait_until(lambda: relay.connections == 2 and link.connected, 10)
    assert wait_until(lambda: relay.in_flight >= 3, 5)  # the new status and two of the six resent
    assert not wait_until(lambda: relay.in_flight > 3, 0.5), relay.in_flight
    relay.release()
    assert wait_until(lambda: not link._unacked, 10)
    assert relay.peak == 3
