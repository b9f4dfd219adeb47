"""Which message the broker cuts our connections on (agent/fleet/cuts.py), and the link around it.

The judge and the limit it learns are plain logic; `first_in_line` reads a real paho client's session
(messages published while not connected wait there, in order, as they would be resent). The link's
tests run against a real Mosquitto: one with an unannounced `message_size_limit` that cuts the
connection on a message over it, as the failure happens in the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from agent.bus.owner import wait_until
from agent.devtools.local_broker import LocalBroker
from agent.fleet.cuts import MIN_LEARNED_PACKET, STRIKES, CutJudge, first_in_line, learned_limit
from agent.fleet.link import MqttLink
from agent.fleet.packets import PacketTooLargeError, packet_size
from agent.fleet.topics import Topics
from agent.store.sqlite import Outgoing

PROTOCOL_ERROR = 0x82


def test_the_same_message_first_in_line_when_strikes_connections_are_cut_before_any_puback_is_struck():
    judge = CutJudge()
    for _ in range(STRIKES - 1):
        judge.connected()
        assert judge.lost(7, PROTOCOL_ERROR, short=False) is None
    judge.connected()
    assert judge.lost(7, PROTOCOL_ERROR, short=False) == 7
    judge.connected()
    assert judge.lost(7, PROTOCOL_ERROR, short=False) is None  # counted afresh after a strike


def test_a_puback_another_message_first_or_a_cut_for_no_message_starts_the_count_again():
    judge = CutJudge()
    judge.connected()
    judge.lost(7, PROTOCOL_ERROR, short=False)
    judge.connected()
    judge.acknowledged()  # something of ours went through on this connection: not a strike
    assert judge.lost(7, PROTOCOL_ERROR, short=False) is None
    for first in (7, 7, 8, 8):  # another message first in line counts from 1
        judge.connected()
        assert judge.lost(first, PROTOCOL_ERROR, short=False) is None
    judge.connected()
    assert judge.lost(8, None, short=False) is None  # a keepalive timeout, a network loss: not the message's doing
    for _ in range(STRIKES - 1):
        judge.connected()
        assert judge.lost(8, None, short=True) is None  # cut within seconds, no reason code: a strike
    judge.connected()
    assert judge.lost(8, None, short=True) == 8
    judge.connected()
    assert judge.lost(None, PROTOCOL_ERROR, short=True) is None  # nothing in flight: nobody to blame


def test_the_limit_learned_is_half_the_struck_size_never_below_the_floor_and_only_ever_lower():
    assert learned_limit(8400, None) == 4200
    assert learned_limit(8400, 4000) is None  # what is kept to already is lower
    assert learned_limit(9000, 6000) == 4500
    assert learned_limit(6000, 4500) == MIN_LEARNED_PACKET
    assert learned_limit(MIN_LEARNED_PACKET + 100, None) == MIN_LEARNED_PACKET
    assert learned_limit(MIN_LEARNED_PACKET, None) is None  # a small message is not cut for its size


def test_first_in_line_is_the_oldest_unacknowledged_qos1_message_paho_holds_skipping_the_status():
    """paho (not connected) keeps what it is given and resends it in that order on the next connection."""
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="cuts-test",
                         protocol=mqtt.MQTTv5)
    status = client.publish("v/status", b"online", qos=1, retain=True).mid
    first = client.publish("v/state/engine", b"x" * 5000, qos=1, retain=True).mid
    client.publish("v/responses/a", b"{}", qos=1)
    state = ("v/state/engine", b"x" * 5000)
    assert first_in_line(client, {status}) == (first, packet_size(*state, None), "v/state/engine")
    assert first_in_line(client, set()) == (status, packet_size("v/status", b"online", None), "v/status")
    assert first_in_line(object(), set()) is None  # a paho without these internals: logged, nobody struck


@contextlib.contextmanager
def own_link(tmp_path, mqtt_vehicle, extra: str = "", **callbacks):
    """A link (the agent's, alone) to a Mosquitto of the test's own with `extra` settings, connected; yields
    (link, topics, PUBACKs as (mid, code), the broker). `callbacks` go to MqttLink (on_struck, ...)."""
    broker = LocalBroker(tmp_path / "broker", extra=extra).start()
    mqtt_config = dataclasses.replace(mqtt_vehicle.mqtt, broker=broker.url)
    topics = Topics(mqtt_config.prefix, mqtt_vehicle.vehicle)
    acks: list[tuple[int, int]] = []
    link = MqttLink(mqtt_config, topics, f"cuts-{uuid.uuid4().hex[:8]}",
                    status=lambda state: json.dumps({"state": state}).encode(), on_command=lambda incoming: None,
                    on_published=lambda mid, code: acks.append((mid, code)), on_connection=lambda up: None,
                    **callbacks)
    link.start()
    try:
        assert link.wait_connected(10), link.last_error
        yield link, topics, acks, broker
    finally:
        link.stop()
        broker.stop()


@pytest.fixture
def size_limited(tmp_path, mqtt_vehicle):
    """own_link on a Mosquitto with an unannounced `message_size_limit` of 4096; yields (link, topics,
    PUBACKs as (mid, code), struck mids)."""
    struck: list[int] = []
    with own_link(tmp_path, mqtt_vehicle, "message_size_limit 4096\n", on_struck=struck.append) as (link, topics,
                                                                                                   acks, _):
        yield link, topics, acks, struck


def test_a_message_the_broker_cuts_every_connection_on_is_dropped_and_its_publisher_told(size_limited):
    """Whoever published it (here: nobody but the test, as the telemetry lane publishes a state straight
    to the link): after STRIKES cut connections it is dropped from paho's session, `on_struck` names it,
    a limit under its size is kept to from then on, and the link settles. Once, only the outbox judged
    cuts, and only among its own messages: a state over the limit cut every connection for ever."""
    link, topics, acks, struck = size_limited
    big = Outgoing(topics.state("engine"), b"x" * 8000, retain=True)
    mid = link.publish(big)
    assert wait_until(lambda: struck == [mid], 30)
    assert link.broker_max_packet == max(MIN_LEARNED_PACKET, packet_size(big.topic, big.payload, None) // 2)
    with pytest.raises(PacketTooLargeError):
        link.publish(big)  # the same again is made smaller by its publisher, or set aside
    assert link.wait_connected(10)
    reconnects = link.stats.reconnects
    small = link.publish(Outgoing(topics.state("engine"), b"y" * 1000, retain=True))
    assert wait_until(lambda: small in [m for m, code in acks if code < 0x80], 10)  # 0x10: nobody subscribed
    assert link.stats.reconnects == reconnects and mid not in [m for m, _ in acks]


def test_the_publisher_notes_a_mid_before_its_puback_can_be_handled(size_limited):
    """paho may have the PUBACK back before its publish returns to a descheduled thread (here: made to
    wait 0.3 s right after paho wrote the packet). Once, a PUBACK for a mid the outbox had not noted yet
    was dropped, and the message stayed in flight for the life of the process: it took a place in the
    broker's Receive Maximum for good, and once all of them were taken nothing more was published."""
    link, topics, acks, _ = size_limited
    assert wait_until(lambda: acks, 5)  # the status's: nothing else in flight
    noted: set[int] = set()
    seen_noted: list[bool] = []
    link._on_published = lambda mid, code: seen_noted.append(mid in noted)

    def slow_note(mid: int) -> None:
        time.sleep(0.3)
        noted.add(mid)

    threads = [threading.Thread(target=link.publish, args=(Outgoing(topics.responses(f"r{n}"), b"{}"), slow_note))
               for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert wait_until(lambda: len(seen_noted) == 3, 10)
    assert seen_noted == [True, True, True]


@pytest.fixture
def plain_link(tmp_path, mqtt_vehicle):
    """own_link on a Mosquitto without limits; yields (link, topics, PUBACKs as (mid, code), the broker)."""
    with own_link(tmp_path, mqtt_vehicle) as parts:
        yield parts


def test_only_the_loop_thread_writes_to_the_broker_socket(plain_link):
    """The outbox, the telemetry lane, intake and the workers publish from their own threads. paho (run by
    our own `loop()` calls, not `loop_start()`) wrote each packet on the publishing thread, concurrently with
    the loop thread writing what a partial write left: the bytes of two packets interleaved, and Mosquitto
    cut the connection ("disconnected due to malformed packet", seen under load with large responses), which
    the cut judge then counts against the innocent message first in line. A publisher whose write failed
    also ran the disconnect callbacks holding paho's message lock while the loop thread, in its own
    disconnect callback, waited for that lock (a deadlock). paho's socket write is spied on (the real write
    still happens) to see which thread makes it: only the loop thread may."""
    link, topics, acks, _ = plain_link
    assert wait_until(lambda: acks, 5)  # the status's
    writers: set[str] = set()
    client = link._client
    send = client._sock_send

    def spy(buf: bytes) -> int:
        writers.add(threading.current_thread().name)
        return send(buf)

    client._sock_send = spy
    publishers = [threading.Thread(target=lambda k=k: [link.publish(Outgoing(topics.responses(f"r{k}-{n}"),
                                                                             b"x" * 200_000)) for n in range(5)],
                                   name=f"publisher-{k}") for k in range(3)]
    for thread in publishers:
        thread.start()
    for thread in publishers:
        thread.join(30)
    assert wait_until(lambda: len(acks) == 16, 30), len(acks)
    assert writers == {"mqtt-loop"}
    assert link.stats.reconnects == 0


def test_a_clean_stop_still_says_disconnect_to_the_broker(plain_link):
    """The DISCONNECT of a clean stop is written by the loop thread, or by the stopping thread once the loop
    thread is gone: the broker sees a clean disconnect, not a lost connection (its Last Will)."""
    link, _, _, broker = plain_link
    link.stop()
    assert wait_until(lambda: f"Client {link.client_id} disconnected." in broker.log_file.read_text(), 5), \
        broker.log_file.read_text()[-500:]


def test_messages_held_over_a_learned_limit_are_withdrawn_at_once_not_cut_on_one_by_one(size_limited):
    """Two messages over the broker's unannounced limit were handed to paho before any cut (a response and
    its neighbour, a state and a telemetry batch). Once the first is struck and a limit learned, the second
    is over it too: it was kept in paho's session and cut STRIKES more connections before it was struck in
    its turn (every response waited meanwhile). Now it is withdrawn with the first and handed back to its
    publisher (here: nobody, so the link logs it), to be made smaller or set aside as if the broker had
    announced the limit."""
    link, topics, _, struck = size_limited
    withdrawn: list[tuple[int, int, int]] = []
    link._on_too_large = lambda mid, size, limit: bool(withdrawn.append((mid, size, limit)))
    first = link.publish(Outgoing(topics.state("engine"), b"x" * 8000, retain=True))
    second = link.publish(Outgoing(topics.responses("r1"), b"y" * 6000))
    # struck, then withdrawn, both on the loop thread a few ms apart: wait for the second (a CI run once
    # looked between the two and found nothing withdrawn yet)
    assert wait_until(lambda: struck == [first] and withdrawn, 30)
    limit = link.broker_max_packet
    assert withdrawn == [(second, packet_size(topics.responses("r1"), b"y" * 6000, None), limit)]
    assert link.wait_connected(10)
    assert link.stats.reconnects == STRIKES
    assert not wait_until(lambda: link.stats.reconnects > STRIKES, 2)


def test_a_struck_message_nobody_tracks_is_logged_as_lost(size_limited, caplog):
    """A message sent around the store (an event or response while the store fails) is tracked by neither
    the outbox nor the lane: when the link struck it, nobody said it was lost (no log line, no count)."""
    link, topics, _, struck = size_limited
    big = Outgoing(topics.events, b"x" * 8000)
    mid = link.publish(big)
    with caplog.at_level("ERROR", logger="agent.fleet.link"):
        assert wait_until(lambda: struck == [mid], 30)
    lost = [r for r in caplog.records if r.levelname == "ERROR" and getattr(r, "topic", None) == topics.events]
    assert len(lost) == 1 and lost[0].reason == "connection_dropped" and link.stats.dropped == 1


def test_a_message_held_over_the_limit_a_new_connection_announces_is_handed_back_not_resent(tmp_path,
                                                                                           mqtt_vehicle):
    """paho holds a message from before (published while disconnected, or in flight when the connection
    dropped) that is larger than the Maximum Packet Size the broker announces on the new connection: paho
    would resend it first thing, the broker would cut the connection (0x95), and after STRIKES cuts it was
    set aside instead of being cut into chunks. It is handed back to its publisher before paho resends."""
    broker = LocalBroker(tmp_path / "broker", extra="max_packet_size 4096\n").start()
    mqtt_config = dataclasses.replace(mqtt_vehicle.mqtt, broker=broker.url)
    topics = Topics(mqtt_config.prefix, mqtt_vehicle.vehicle)
    withdrawn: list[tuple[int, int, int]] = []
    link = MqttLink(mqtt_config, topics, f"cuts-{uuid.uuid4().hex[:8]}",
                    status=lambda state: json.dumps({"state": state}).encode(), on_command=lambda incoming: None,
                    on_published=lambda mid, code: None, on_connection=lambda up: None,
                    on_too_large=lambda mid, size, limit: bool(withdrawn.append((mid, size, limit))))
    big = Outgoing(topics.responses("big"), b"x" * 8000)
    mid = link.publish(big)  # not connected yet: paho keeps it for the connection
    link.start()
    try:
        assert link.wait_connected(10), link.last_error
        assert wait_until(lambda: withdrawn, 5)
        assert withdrawn == [(mid, packet_size(big.topic, big.payload, None), 4096)]
        assert not wait_until(lambda: link.stats.reconnects > 0, 2)  # no cut: nothing over the limit was sent
    finally:
        link.stop()
        broker.stop()


@pytest.mark.parametrize("in_flight", [True, False], ids=["a-message-in-flight", "nothing-in-flight"])
def test_a_connection_we_drop_for_a_failed_setup_strikes_no_message_and_is_no_takeover(tmp_path, mqtt_vehicle,
                                                                                      monkeypatch, caplog, in_flight):
    """A setup that fails on every connection (a bug building the online status, here) makes the link drop
    each connection itself within moments of the broker accepting it. Those drops were judged like the
    broker's: with a message first in line and no PUBACK, STRIKES of them struck that message (set aside as
    refused, and the packet limit halved); with nothing in flight, FLAPS of them were logged as another agent
    taking the session over, and the reconnects slowed to TAKEOVER_BACKOFF_S. Our own drop says nothing of
    a message or of another client, as a stop's does not. Backoffs shortened so that many reconnects fit."""
    import socket

    import agent.fleet.link as link_module
    from agent.fleet.takeover import FLAPS

    monkeypatch.setattr(link_module, "BACKOFF_MIN_S", 0.02)
    monkeypatch.setattr(link_module, "BACKOFF_MAX_S", 0.05)
    struck: list[int] = []
    with own_link(tmp_path, mqtt_vehicle, on_struck=struck.append) as (link, topics, acks, _):
        assert wait_until(lambda: acks, 5)  # the status's PUBACK: nothing of ours in flight

        def broken(state: str) -> bytes:
            raise RuntimeError("a bug building the status")

        link._status = broken
        reconnects = link.stats.reconnects
        link._client.socket().shutdown(socket.SHUT_RDWR)
        if in_flight:
            link.publish(Outgoing(topics.responses("r1"), b"{}"))  # never acknowledged: every setup fails
        assert wait_until(lambda: link.stats.reconnects >= reconnects + max(STRIKES, FLAPS) + 2, 20)
        assert struck == [] and link.broker_max_packet is None
        assert link._takeover.in_a_row == 0
        assert not any("took over" in r.getMessage() or "takes over" in r.getMessage() for r in caplog.records)
