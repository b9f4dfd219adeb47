"""The link's MQTT session against an unusual broker: what is acknowledged on which connection, a lost
session, refusals, rogue packets.

Most tests here talk to a scripted fake broker over a real loopback TCP socket (tests/fake_broker.py):
Mosquitto cannot be made to hold a CONNACK back, to answer Session Present 0 on demand or to refuse a
connection with a chosen code. The agent's side is the real link and the real paho client.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator

import pytest
from fake_broker import CONNECT, PUBACK, PUBLISH, SUBSCRIBE, FakeBroker

from agent.bus.owner import wait_until
from agent.config.model import MqttConfig
from agent.fleet.link import MqttLink
from agent.fleet.packets import Incoming
from agent.fleet.topics import Topics


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
